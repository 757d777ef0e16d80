"""`python -m bench epoch`: one epoch (or `--steps N`) of real MNIST training, minires's own loop
(fit, called as `minires train` and examples/resnet_mnist.py call it) against the same net in
a plain PyTorch loop: same initial weights, same batches in the same order, same optimizer
and per-step learning rates. The two sides alternate for `--rounds` rounds; the best round
of each is compared. Test accuracy is evaluated after every round (not timed).

Imports numpy, minires, bench.common, bench.step and bench._torch_models; torch is passed in.
"""
import json
import math
import sys
import tempfile
import time

import numpy as np

import minires
from minires import cli, data, models, runtime, train
from minires.run import fit
from bench import common
from bench._torch_models import mirror
from bench.step import sgemm_peak

DIVERGED_ACCURACY = 0.20  # below this test accuracy a run counts as diverged ...
ACCURACY_CHECK_STEPS = 200  # ... once it has trained this many steps (fewer: no verdict)
WARMUP_STEPS = 2  # untimed steps of each side first: JIT cache loads, first-call allocations

# What each --model trains, and how its user-facing job runs it.
RECIPES = {
    "seed": dict(  # minires train's defaults (minires/cli.py)
        what="seed net, as `minires train`: SGD Nesterov momentum 0.9, one-cycle peak "
             f"{cli.DEFAULT_LR['sgd']:g}",
        build=cli.MODELS["seed"], run=dict(optimizer="sgd", lr=cli.DEFAULT_LR["sgd"],
                                           schedule="onecycle"),
        checkpoint_every=500, skip_norms=True),  # minires train's defaults
    "resnet": dict(  # examples/resnet_mnist.py's defaults: depth 14, 16 channels, Adam 1e-2
        what="ResNet-14 (BatchNorm, 16/32/64 channels), as examples/resnet_mnist.py: Adam, "
             "one-cycle peak 0.01",
        build=lambda seed: models.resnet(14, 16, rng=seed),
        run=dict(optimizer="adam", lr=1e-2, schedule="onecycle"),
        checkpoint_every=0, skip_norms=False),  # the example: a checkpoint at the end only
}


class _FirstBatches(data.DataLoader):
    """A DataLoader whose epochs stop after `steps` batches (None: the whole epoch); the
    batches are the first ones of the full, shuffled epoch."""

    def __init__(self, *args, steps=None, **kwargs):
        self.steps = steps
        super().__init__(*args, **kwargs)

    def __len__(self):
        n = super().__len__()
        return n if self.steps is None else min(n, self.steps)


def _optimizer(run, params, total_steps):
    """minires's optimizer and schedule, built by the very functions `minires train` uses."""
    opt = cli.make_optimizer(run, params)
    return opt, cli.make_schedule(run, opt, total_steps)


def _lr_values(run, total_steps):
    """The learning rate of each step 0 .. total_steps - 1 under minires's schedule."""
    _, sched = _optimizer(run, [minires.Parameter(np.zeros(1, np.float32))], total_steps)
    return [sched.lr_at(t) for t in range(total_steps)]


def _job_callbacks(recipe, model):
    """fit's on_step/columns arguments as the recipe's job passes them: `minires train`
    records the seed net's skip gradient norms (x_in, x_res) in metrics.csv every step."""
    if not recipe["skip_norms"]:
        return {}
    norms = train.SkipNorms(getattr(model, "skip", None))
    return {"on_step": norms, "columns": norms.columns}


def _threads(torch):
    return {"minires": runtime.numba_threads() or 1,
            "torch": torch.get_num_threads() if torch is not None else None}


def _cpu_seconds():
    """CPU seconds of this process, all threads (finer-grained than os.times())."""
    return time.process_time()


def _row(side, rnd, steps, images, seconds, busy, test, diverged):
    """One round's result; busy: process CPU seconds / (wall seconds * threads)."""
    return {"round": rnd, "side": side, "steps": steps, "images": images,
            "train_s": round(seconds, 3), "images_per_s": round(images / seconds, 1)
            if seconds > 0 else None,
            "ms_per_step": round(1e3 * seconds / steps, 2) if steps else None,
            "cpu_busy": round(busy, 3), "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "diverged": diverged}


def _busy(cpu, wall, threads):
    return cpu / (wall * threads) if wall > 0 and threads else float("nan")


def _finite(obj):
    """obj with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _verdict(row, planned_steps):
    """The reason a round counts as diverged, or None."""
    if row["diverged"]:
        return row["diverged"]
    if not math.isfinite(row["test_loss"]):
        return f"test loss {row['test_loss']}"
    if planned_steps >= ACCURACY_CHECK_STEPS and row["test_accuracy"] < DIVERGED_ACCURACY:
        return f"test accuracy {100 * row['test_accuracy']:.1f}% < {100 * DIVERGED_ACCURACY:.0f}%"
    return None


def minires_round(ctx, loader, test_loader, rnd):
    """Train a fresh model through minires.train.fit exactly as the recipe's job does
    (metrics.csv every step and its checkpoints, into a temporary folder); evaluate it."""
    recipe, run = ctx["recipe"], ctx["run"]
    model = recipe["build"](ctx["seed"]).to(ctx["device"])
    loader.load_state_dict({"epoch": 0, "batch": 0})
    opt, sched = _optimizer(run, model.parameters(), len(loader))
    diverged, steps, images, seconds = None, 0, 0, float("nan")
    with tempfile.TemporaryDirectory(prefix="bench-epoch-") as out:
        ctx["sync"]()
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        try:
            result = fit(model, loader, opt, sched, epochs=1, out=out,
                         checkpoint_every=recipe["checkpoint_every"], progress=False,
                         hparams=run, **_job_callbacks(recipe, model))
            steps, images, seconds = result["step"], result["images"], result["train_seconds"]
        except train.NonFiniteLoss as err:
            diverged = f"non-finite loss or gradient at step {err.step}"
            steps = max(err.step - 1, 0)
        ctx["sync"]()
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    if diverged:
        seconds, images = wall, steps * loader.batch_size
    test = train.evaluate(model, test_loader)
    return _row("minires", rnd, steps, images, seconds,
                _busy(cpu, wall, ctx["threads"]["minires"]), test, diverged)


def torch_round(ctx, loader, test_loader, rnd, lrs):
    """The same net (mirrored from a fresh minires model: same initial weights) in a plain
    PyTorch loop over the same batches, with the same optimizer and per-step lr; evaluate."""
    torch, dev, recipe = ctx["torch"], ctx["tdev"], ctx["recipe"]
    model = mirror(torch, recipe["build"](ctx["seed"])).to(dev)
    opt = _torch_optimizer(torch, recipe["run"], model.parameters(), lrs[0])
    loss_fn = torch.nn.functional.cross_entropy
    loader.load_state_dict({"epoch": 0, "batch": 0})
    model.train()
    diverged, steps, images = None, 0, 0
    ctx["sync"]()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for x, y in loader:
        for group in opt.param_groups:
            group["lr"] = lrs[steps]
        xb, yb = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()  # as a real loop does (logging): one device sync per step
        steps, images = steps + 1, images + len(y)
        if not math.isfinite(value):
            diverged = f"loss {value} at step {steps}"
            break
    ctx["sync"]()
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    test = _torch_evaluate(torch, model, test_loader, dev)
    return _row("torch", rnd, steps, images, seconds, _busy(cpu, seconds,
                                                             ctx["threads"]["torch"]),
                test, diverged)


def _torch_optimizer(torch, run, params, lr):
    if run["optimizer"] == "sgd":  # as minires.cli.make_optimizer
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if run["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"bench epoch: no PyTorch twin for optimizer {run['optimizer']!r}")


def _torch_evaluate(torch, model, loader, dev):
    """Mean cross-entropy and accuracy over the loader, eval mode, no graph (as
    minires.train.evaluate)."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            yb = torch.from_numpy(y).to(dev)
            logits = model(torch.from_numpy(x).to(dev))
            total += torch.nn.functional.cross_entropy(logits, yb).item() * len(y)
            correct += int((logits.argmax(1) == yb).sum())
            n += len(y)
    model.train()
    return {"loss": total / max(n, 1), "accuracy": correct / max(n, 1)}


def _loaders(args, sets, batch):
    """(minires train, minires test, torch train, torch test) loaders: the torch side reads
    NumPy batches from loaders of the same order (the same objects on the CPU)."""
    (train_set, test_set), device = sets, args.device
    if args.test_limit:
        test_set = tuple(a[:args.test_limit] for a in test_set)
    seed = cli.DEFAULTS["seed"]

    def make(dev):
        return (_FirstBatches(*train_set, batch_size=batch, seed=seed, device=dev,
                              steps=args.steps),
                data.DataLoader(*test_set, batch_size=cli.EVAL_BATCH, shuffle=False,
                                device=dev))
    ours = make(device)
    return ours + (ours if device == "cpu" else make("cpu"))


def _best(rows, side):
    """The fastest non-diverged round of a side (None if it never ran), and the reason the
    side is not compared (a diverged round), or None."""
    mine = [r for r in rows if r["side"] == side]
    bad = next((r["verdict"] for r in mine if r["verdict"]), None)
    ok = [r for r in mine if not r["verdict"]]
    best = min(ok, key=lambda r: r["train_s"]) if ok else (mine[0] if mine else None)
    return best, bad


def run(args, xp, torch, tdev, sync, header):
    """Warm up, alternate the two sides for args.rounds rounds, print the result (text, or one
    JSON object with --json). Returns the process exit code."""
    recipe = RECIPES[args.model]
    batch = args.batch[0]
    sync = sync or (lambda: None)
    peak = sgemm_peak(xp, sync if args.device == "cuda" else None)
    try:  # $MINIRES_DATA, else ~/.cache/minires/mnist (downloaded when missing)
        sets = data.load_mnist("train"), data.load_mnist("test")
    except data.MnistError as err:
        print(f"python -m bench epoch: error: {err}", file=sys.stderr)
        return 1
    mtrain, mtest, ttrain, ttest = _loaders(args, sets, batch)
    with_torch = tdev is not None and not args.no_torch
    ctx = dict(recipe=recipe, run=dict(recipe["run"], model=args.model, batch_size=batch),
               seed=cli.DEFAULTS["seed"], device=args.device, sync=sync, torch=torch,
               tdev=tdev, threads=_threads(torch if with_torch else None))
    if args.only_side is None and not args.in_process:
        rows, warm, threads = _isolated_rounds(args, with_torch)
        ctx["threads"] = threads
    else:
        sides = [args.only_side] if args.only_side else ["minires"] + ["torch"] * with_torch
        rows, warm = _rounds(ctx, args, sets, (mtrain, mtest, ttrain, ttest), sides)
    for r in rows:
        r["verdict"] = _verdict(r, len(mtrain))
    ours, our_bad = _best(rows, "minires")
    theirs, their_bad = _best(rows, "torch")
    ratio, note = None, None
    if not with_torch:
        note = ("PyTorch side skipped (--no-torch)" if args.no_torch else
                "PyTorch not installed (pip install '.[bench]'): minires side only"
                if torch is None else "this PyTorch has no CUDA: minires side only")
    elif ours is None or theirs is None:  # a child process of an isolated run
        note = f"{args.only_side} side only (one process of `bench epoch`)"
    elif our_bad or their_bad:
        note = "; ".join(f"{side} diverged ({why}): times not compared"
                         for side, why in (("minires", our_bad), ("torch", their_bad)) if why)
    else:
        ratio = round(ours["train_s"] / theirs["train_s"], 3)
    info = dict(header)
    info.update({"sgemm peak": f"{peak:.1f} GFLOP/s (1024^3 float32 matmul, this run)",
                 "warm-up": warm})
    if not with_torch:
        info["torch"] = note
    result = {"command": "epoch", "model": args.model, "device": args.device,
              "recipe": recipe["what"], "batch": batch, "steps": len(mtrain),
              "train_images": len(mtrain.labels), "test_images": len(mtest.labels),
              "vector_isa": runtime.vector_isa(), "cpu": runtime.cpu_name(),
              "sgemm_gflops": round(peak, 1),
              "threads": ctx["threads"], "header": info, "rounds": rows,
              "best": {"minires": ours, "torch": theirs}, "ratio": ratio,
              "ratio_note": note}
    if args.json:
        print(json.dumps(_finite(result)))
    else:
        _print_text(result, info)
    return 0


def _rounds(ctx, args, sets, loaders, sides):
    """args.rounds rounds of the given sides in this process, after a warm-up of each;
    returns (rows, warm-up summary)."""
    mtrain, mtest, ttrain, ttest = loaders
    lrs = _lr_values(ctx["run"], max(len(mtrain), 2))
    warm = _warmup(ctx, sets, args.batch[0], lrs, sides)
    rows = []
    for rnd in range(1, args.rounds + 1):
        for side in sides:
            rows.append(minires_round(ctx, mtrain, mtest, rnd) if side == "minires" else
                        torch_round(ctx, ttrain, ttest, rnd, lrs))
            common.settle()
    return rows, warm


def _isolated_rounds(args, with_torch):
    """Each round of each side in a fresh `python -m bench epoch --only-side SIDE` process,
    the sides alternating: a process that has loaded PyTorch's OpenMP runtime beside
    Numba's runs minires's kernels up to twice slower (measured), and a user's job loads
    one engine. Returns (rows, warm-up summary, threads per side)."""
    import subprocess
    argv = [sys.executable, "-m", "bench", "epoch", "--json", "--rounds", "1", "--model",
            args.model, "--batch", str(args.batch[0]), "--device", args.device]
    for flag, value in (("--threads", args.threads), ("--steps", args.steps),
                        ("--test-limit", args.test_limit)):
        argv += [flag, str(value)] if value is not None else []
    rows, warm, threads = [], {}, {"minires": None, "torch": None}
    for rnd in range(1, args.rounds + 1):
        for side in ["minires"] + ["torch"] * with_torch:
            proc = subprocess.run(argv + ["--only-side", side], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench epoch: the {side} process failed:\n"
                                   f"{proc.stderr[-3000:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            row = dict(child["rounds"][0], round=rnd)
            rows.append(row)
            warm.setdefault(side, child["header"]["warm-up"].split(" (")[0])
            threads[side] = child["threads"][side]
    note = f" ({WARMUP_STEPS} steps and a test batch each, untimed, in every fresh process)"
    return rows, ", ".join(warm.values()) + note, threads


def _warmup(ctx, sets, batch, lrs, sides):
    """WARMUP_STEPS untimed steps of each side on the first training images; a summary."""
    n = WARMUP_STEPS * batch
    (images, labels), (test_x, test_y) = sets
    images, labels, test_x, test_y = (images[:n], labels[:n], test_x[:cli.EVAL_BATCH],
                                      test_y[:cli.EVAL_BATCH])
    times = {}
    for side in sides:
        dev = ctx["device"] if side == "minires" else "cpu"
        loader = _FirstBatches(images, labels, batch_size=batch, seed=cli.DEFAULTS["seed"],
                               device=dev)
        test = data.DataLoader(test_x, test_y, cli.EVAL_BATCH, shuffle=False, device=dev)
        t0 = time.perf_counter()
        if side == "minires":
            minires_round(ctx, loader, test, 0)
        else:
            torch_round(ctx, loader, test, 0, lrs)
        times[side] = time.perf_counter() - t0
    return ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + (
        f" ({WARMUP_STEPS} steps and a test batch each, not timed)")


def _pct(v, digits=1):
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _print_text(result, info):
    common.print_header(list(info.items()), False)
    full = -(-result["train_images"] // result["batch"])
    part = "" if result["steps"] == full else f"the first {result['steps']} of "
    print(f"epoch: {result['recipe']}; {part}{full} steps of batch {result['batch']} "
          f"({result['train_images']:,} training images), test set {result['test_images']:,}"
          f" images; threads minires {result['threads']['minires']}, torch "
          f"{result['threads']['torch'] or '-'}")
    cols = ["round", "side", "steps", "train s", "img/s", "ms/step", "CPU busy", "test acc",
            "note"]
    table = [{"round": str(r["round"]), "side": r["side"], "steps": str(r["steps"]),
              "train s": f"{r['train_s']:.2f}", "img/s": f"{r['images_per_s'] or 0:.0f}",
              "ms/step": common.fmt(r["ms_per_step"], 2),
              "CPU busy": _pct(r["cpu_busy"], 0), "test acc": _pct(r["test_accuracy"], 2),
              "note": f"DIVERGED: {r['verdict']}" if r["verdict"] else ""}
             for r in result["rounds"]]
    common.print_table(cols, table, False)
    for side, label in (("minires", "minires"), ("torch", "PyTorch")):
        b = result["best"][side]
        if b is not None:
            print(f"best {label:<8} {b['train_s']:.2f} s training, {b['images_per_s'] or 0:.0f} "
                  f"img/s, CPU busy {_pct(b['cpu_busy'], 0)} of {result['threads'][side]} "
                  f"threads, test accuracy {_pct(b['test_accuracy'], 2)}")
    if result["ratio"] is not None:
        print(f"minires/PyTorch {result['ratio']:.2f}x (training seconds, best round each; "
              f"below 1 = minires faster)")
    else:
        print(f"minires/PyTorch n/a: {result['ratio_note']}")
