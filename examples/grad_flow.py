"""The seed experiment: train the seed net on MNIST for one epoch and record, at every step, the
loss and the gradient norms at x_in (into the residual block) and x_res (over the skip); find
the step where the block path's gradient first overtakes the skip path's.

    python examples/grad_flow.py                    # Adam 3e-3, batch 64, seeds 0 1 2
    python examples/grad_flow.py --skip rezero      # ReZero (also plots alpha); --skip none

Writes grad_flow.csv (one row per seed and step), grad_flow.json (crossover steps, test
accuracy) and grad_flow.png into --out.
"""
import math
import time

import numpy as np

import _common as C  # first: it finds minires in a checkout that is not installed
from minires import models, nn
from minires.tensor import is_grad_enabled
from minires.train import SkipNorms

FIELDS = ("seed", "step", "epoch", "loss", "accuracy", "x_in", "x_res", "alpha")


def crossover(x_in, x_res, window=50):
    """Where the block path's gradient norm first overtakes the skip path's.

    x_in, x_res: per-step norms (same length). Both are smoothed with a centred moving
    average of `window` steps. Returns a dict: step (1-based, or None), status ("crossed",
    "never": x_in stayed at or below x_res, "from_start": x_in was larger from step 1),
    stays_above (after the crossing, the smoothed x_in never fell back to or below x_res) and
    above_from (the step from which x_in stays above to the end; None if it ends below).
    """
    if len(x_in) != len(x_res) or len(x_in) == 0:
        raise ValueError(f"crossover: x_in and x_res must be non-empty and of one length, got "
                         f"{len(x_in)} and {len(x_res)}")
    above = C.moving_average(x_in, window) > C.moving_average(x_res, window)
    below = np.flatnonzero(~above)
    above_from = None if not above[-1] else 1 if below.size == 0 else int(below[-1]) + 2
    if above[0]:
        return {"step": None, "status": "from_start", "stays_above": bool(above.all()),
                "above_from": above_from}
    step = int(np.argmax(above)) + 1 if above.any() else None
    return {"step": step, "status": "never" if step is None else "crossed",
            "stays_above": step is not None and step == above_from, "above_from": above_from}


class InputProbe(nn.Module):
    """Wraps the plain net's block so it records ||dL/dx|| at the block input as (x_in, None)
    per backward, the same `grad_norms` interface as nn.Residual (there is no skip path)."""

    def __init__(self, block):
        super().__init__()
        self.block, self.track_grad_norms, self.grad_norms = block, True, []

    def forward(self, x):
        if is_grad_enabled():
            x = x * 1.0  # a node of our own, so the hook sees only the block's input gradient
            x.register_hook(lambda g: self.grad_norms.append(
                (float(np.linalg.norm(C.host(g).ravel())), None)))
        return self.block(x)


def pytorch_init(model, seed):
    """Redraw every conv and linear weight and bias as PyTorch's default initialisation does:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), about 2.4x smaller than minires's Kaiming normal."""
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bound = 1.0 / math.sqrt(math.prod(m.weight.shape[1:]))
            for p in (m.weight, m.bias):
                if p is not None:
                    p.data[...] = rng.uniform(-bound, bound, p.shape)


def run(args, seed, test):
    """Train one seed; returns (rows: list of per-step dicts, summary dict)."""
    model = models.seed_net(args.channels, skip=args.skip, rng=seed, track_grad_norms=True)
    if args.init == "pytorch":
        pytorch_init(model, seed)
    if args.skip == "none":
        model.skip = InputProbe(model.skip)
    rows = []

    def on_step(r):
        alpha = float(C.host(model.skip.alpha)) if args.skip == "rezero" else None
        rows.append({k: r.get(k) for k in FIELDS} | {"seed": seed, "alpha": alpha})

    start = time.perf_counter()
    norms = SkipNorms(model.skip)  # puts this step's x_in and x_res into the record first
    C.train(model, C.train_loader(args, seed), args, epochs=args.epochs,
            on_step=[norms, on_step], desc=f"seed {seed}")
    seconds = time.perf_counter() - start
    summary = {"seed": seed, "steps": len(rows), "seconds": round(seconds, 1),
               "final_loss": float(np.mean([r["loss"] for r in rows[-args.window:]])),
               "test_accuracy": C.accuracy(model, test)}
    if args.skip != "none":
        x_in, x_res = _column(rows, "x_in"), _column(rows, "x_res")
        ratio = C.moving_average(x_in, args.window) / C.moving_average(x_res, args.window)
        summary |= {"ratio_start": float(ratio[0]), "ratio_end": float(ratio[-1])}
        summary["crossover"] = crossover(x_in, x_res, args.window)
    if args.skip == "rezero":
        summary["alpha_end"] = rows[-1]["alpha"]
    return rows, summary


def _column(rows, key):
    return np.array([r[key] for r in rows], dtype=np.float64)


def describe(s, window):
    """One printed line per seed."""
    line = f"seed {s['seed']}: "
    c = s.get("crossover")
    if c is not None:
        line += f"x_in/x_res {s['ratio_start']:.2f} -> {s['ratio_end']:.2f} (moving average " \
                f"over {window} steps); "
        line += {"crossed": f"the block path overtook the skip path at step {c['step']} of "
                            f"{s['steps']}" + _relapse(c),
                 "never": "the block path did NOT overtake the skip path",
                 "from_start": "the block path was larger from the first step"}[c["status"]]
        line += "; "
    return line + f"test accuracy {100 * s['test_accuracy']:.2f}%, {s['seconds']:.0f} s"


def _relapse(c):
    if c["stays_above"]:
        return ""
    if c["above_from"] is None:
        return " but fell back below it by the end"
    return f" and, after falling back, stayed above from step {c['above_from']}"


def plot(rows, summaries, args, path):
    """Norms (raw and smoothed), their ratio, the loss and (ReZero) alpha vs step."""
    plt = C.pyplot()
    panels = ["norms"] + (["ratio"] if args.skip != "none" else []) + ["loss"] + \
        (["alpha"] if args.skip == "rezero" else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.5 * len(panels)), sharex=True)
    ax = dict(zip(panels, axes))
    for i, s in enumerate(summaries):
        mine = [r for r in rows if r["seed"] == s["seed"]]
        step, color = _column(mine, "step"), f"C{i}"
        ma = {k: C.moving_average(_column(mine, k), args.window)
              for k in ("x_in", "x_res", "loss") if k != "x_res" or args.skip != "none"}
        for key, style in (("x_in", "-"), ("x_res", "--")):
            if key in ma:
                ax["norms"].plot(step, _column(mine, key), style, color=color, alpha=0.15, lw=0.6)
                ax["norms"].plot(step, ma[key], style, color=color, lw=1.4,
                                 label=f"{key}, seed {s['seed']}")
        if "ratio" in ax:
            ax["ratio"].plot(step, ma["x_in"] / ma["x_res"], color=color, label=f"seed {s['seed']}")
            if s["crossover"]["step"] is not None:
                ax["ratio"].axvline(s["crossover"]["step"], color=color, ls=":", lw=1)
        ax["loss"].plot(step, _column(mine, "loss"), color=color, alpha=0.2, lw=0.6)
        ax["loss"].plot(step, ma["loss"], color=color, lw=1.4, label=f"seed {s['seed']}")
        if "alpha" in ax:
            ax["alpha"].plot(step, _column(mine, "alpha"), color=color)
    ax["norms"].set(yscale="log", ylabel="gradient L2 norm",
                    title=f"seed net ({args.skip}, {args.init} init), Adam lr {args.lr:g}, batch "
                          f"{args.batch_size}: solid x_in (into the block), dashed x_res (skip)")
    ax["norms"].legend(fontsize=7, ncol=len(summaries))
    if "ratio" in ax:
        ax["ratio"].axhline(1.0, color="k", lw=0.8)
        ax["ratio"].set(ylabel=f"x_in / x_res ({args.window}-step avg)")
        ax["ratio"].legend(fontsize=7)
    ax["loss"].set(yscale="log", ylabel="training loss")
    if "alpha" in ax:
        ax["alpha"].set(ylabel="ReZero alpha")
    axes[-1].set_xlabel("step")
    C.save_figure(fig, path, dpi=80)  # thousands of noisy raw points: keeps the PNG small


def main(argv=None):
    """Run from the command line (argv: a list of arguments); returns the results."""
    p = C.parser("grad_flow", __doc__.split("\n\n")[0], lr=3e-3)
    p.add_argument("--skip", choices=models.SKIPS, default="residual")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one run per seed (default 0 1 2); --seed is ignored")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--init", choices=("kaiming", "pytorch"), default="kaiming",
                   help="minires's Kaiming-normal weights (default) or PyTorch's default "
                   "uniform ones (the reference PyTorch runs)")
    p.add_argument("--window", type=int, default=50, help="moving-average window in steps")
    args = p.parse_args(argv)
    out, test = C.out_dir(args), C.test_loader(args)
    rows, summaries = [], []
    for seed in args.seeds:
        seed_rows, summary = run(args, seed, test)
        rows += seed_rows
        summaries.append(summary)
        print(describe(summary, args.window), flush=True)
    C.write_csv(out / "grad_flow.csv", rows)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "data", "no_progress")}
    C.write_json(out / "grad_flow.json", {"config": config, "runs": summaries})
    plot(rows, summaries, args, out / "grad_flow.png")
    print(f"wrote {out / 'grad_flow.csv'}, grad_flow.json and grad_flow.png")
    return summaries


if __name__ == "__main__":
    main()
