"""Plain vs residual networks of growing depth, trained briefly on MNIST: final training loss,
test accuracy and the gradient norm at the first layer vs the number of conv layers.

    python examples/depth.py                      # 2, 4, 8, 16 blocks (5 to 33 convs), BN
    python examples/depth.py --no-batch-norm      # the same nets without batch norm

Nets: models.plain_net / models.residual_net (stem conv + `depth` blocks of two 3x3 convs,
14x14, `--channels` wide; the residual net adds relu(x + block(x)) skips, same weights).
Batch norm is on by default, as in He et al.'s plain-vs-residual comparison: the plain net's
training loss then gets worse as it deepens and the residual net's better. Without it, these
Kaiming-initialised residual branches double the activation variance at every block, so the
deepest residual nets start from a huge loss and do not train (see the README's table).
Writes depth.csv (one row per net), depth_curves.csv (loss per step) and depth.png.
"""
import argparse
import time

import numpy as np

import _common as C  # first: it finds minires in a checkout that is not installed
from minires import models

KINDS = {"plain": models.plain_net, "residual": models.residual_net}
MNIST_TRAIN = 60000


def run(args, kind, depth, test):
    """Train one net for --steps steps; returns (summary row, per-step losses)."""
    model = KINDS[kind](depth, args.channels, batch_norm=args.batch_norm, rng=args.seed)
    first = model.stem[0].weight  # the first conv layer
    losses, norms = [], []

    def on_step(r):
        losses.append(r["loss"])
        norms.append(C.grad_norm(first))

    start = time.perf_counter()
    loader = C.train_loader(args, limit=args.steps * args.batch_size)
    C.train(model, loader, args, on_step=on_step, desc=f"{kind:8s} {2 * depth + 1:2d} convs")
    tail = max(1, len(losses) // 10)
    return {"kind": kind, "blocks": depth, "convs": 2 * depth + 1,
            "final_loss": float(np.mean(losses[-tail:])),
            "test_accuracy": C.accuracy(model, test),
            "grad_first_init": norms[0], "grad_first_mean": float(np.mean(norms)),
            "seconds": round(time.perf_counter() - start, 1)}, losses


def plot(rows, curves, args, path):
    """Loss curves, and final loss / test accuracy / first-layer gradient vs depth."""
    plt = C.pyplot()
    from matplotlib.ticker import NullLocator
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    style = {"plain": "-", "residual": "--"}
    window = max(1, args.steps // 20)
    for i, depth in enumerate(args.depths):
        for kind in KINDS:
            loss = C.moving_average(curves[kind, depth], window)
            axes[0, 0].plot(np.arange(1, len(loss) + 1), loss, style[kind], color=f"C{i}",
                            label=f"{kind} {2 * depth + 1} convs")
    axes[0, 0].set(yscale="log", xlabel="step", ylabel=f"training loss ({window}-step avg)",
                   title="solid: plain, dashed: residual")
    axes[0, 0].legend(fontsize=7, ncol=2)
    panels = [(axes[0, 1], "final_loss", "final training loss", "log"),
              (axes[1, 0], "test_accuracy", "test accuracy", "linear"),
              (axes[1, 1], "grad_first_init", "first-layer gradient norm", "log")]
    for ax, key, label, scale in panels:
        for kind in KINDS:
            mine = [r for r in rows if r["kind"] == kind]
            ax.plot([r["convs"] for r in mine], [r[key] for r in mine], style[kind] + "o",
                    label=kind + (" (step 1)" if key == "grad_first_init" else ""))
            if key == "grad_first_init":
                ax.plot([r["convs"] for r in mine], [r["grad_first_mean"] for r in mine],
                        style[kind] + "x", color=ax.lines[-1].get_color(),
                        label=f"{kind} (mean over training)")
        ax.set(xscale="log", yscale=scale, xlabel="conv layers", ylabel=label)
        ax.set_xticks([2 * d + 1 for d in args.depths], [str(2 * d + 1) for d in args.depths])
        ax.xaxis.set_minor_locator(NullLocator())
        low, high = ax.get_ylim()
        if scale == "log" and high < 10 * low:  # under a decade: label the minor ticks too
            ax.yaxis.set_major_formatter("{x:.2g}")
            ax.yaxis.set_minor_formatter("{x:.2g}")
        ax.legend(fontsize=7)
    fig.suptitle(f"plain vs residual, {'with' if args.batch_norm else 'no'} batch norm: "
                 f"{args.steps} steps of Adam lr {args.lr:g}, batch {args.batch_size}")
    fig.tight_layout()
    C.save_figure(fig, path)


def main(argv=None):
    """Run from the command line (argv: a list of arguments); returns the results."""
    p = C.parser("depth", __doc__.split("\n\n")[0], lr=1e-3, test_limit=2000)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16],
                   help="blocks of two convs each (default 2 4 8 16: 5 to 33 conv layers)")
    p.add_argument("--steps", type=int, default=300, help="training steps per net")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm after every conv (default on)")
    args = p.parse_args(argv)
    if args.steps * args.batch_size > MNIST_TRAIN:
        p.error(f"--steps {args.steps} x --batch-size {args.batch_size} exceeds one epoch "
                f"of {MNIST_TRAIN} images")
    out, test = C.out_dir(args), C.test_loader(args)
    rows, curves = [], {}
    for depth in args.depths:
        for kind in KINDS:
            row, curves[kind, depth] = run(args, kind, depth, test)
            rows.append(row)
            print(f"{kind:8s} {row['convs']:2d} convs: final loss {row['final_loss']:.4f}, "
                  f"test accuracy {100 * row['test_accuracy']:.2f}%, first-layer gradient "
                  f"{row['grad_first_init']:.3g} at step 1 ({row['grad_first_mean']:.3g} mean), "
                  f"{row['seconds']:.0f} s", flush=True)
    C.write_csv(out / "depth.csv", rows)
    C.write_csv(out / "depth_curves.csv", [
        {"kind": k, "blocks": d, "step": i + 1, "loss": v}
        for (k, d), losses in curves.items() for i, v in enumerate(losses)])
    plot(rows, curves, args, out / "depth.png")
    print(f"wrote {out / 'depth.csv'}, depth_curves.csv and depth.png")
    return rows


if __name__ == "__main__":
    main()
