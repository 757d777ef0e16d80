"""Train the BasicBlock ResNet (batch norm, projection shortcuts) on MNIST and report the test
accuracy, through minires.run.fit (metrics.csv and checkpoint.npz land in --out too).

    python examples/resnet_mnist.py              # ResNet-14, one epoch, Adam one-cycle 1e-2

Writes resnet_mnist.json (test accuracy, time) and resnet_mnist.png (loss and batch accuracy
per step).
"""
import csv
import math

import numpy as np

import _common as C  # first: it finds minires in a checkout that is not installed
from minires import models, optim
from minires.run import fit


def plot(out, args, test_accuracy):
    """Training loss and batch accuracy per step, read back from fit's metrics.csv."""
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    step = np.array([int(r["step"]) for r in rows])
    window = max(1, len(rows) // 40)
    plt = C.pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, key, scale in ((ax1, "loss", "log"), (ax2, "accuracy", "linear")):
        values = np.array([float(r[key]) for r in rows])
        ax.plot(step, values, color="C0", alpha=0.25, lw=0.6)
        ax.plot(step, C.moving_average(values, window), color="C0")
        ax.set(yscale=scale, ylabel=f"training {key} (batch)")
    ax2.axhline(test_accuracy, color="C3", ls="--", lw=1,
                label=f"test accuracy {100 * test_accuracy:.2f}%")
    ax2.set(xlabel="step", ylim=(0.8, 1.0))
    ax2.legend(loc="lower right")
    ax1.set_title(f"ResNet {args.blocks_label} on MNIST, {args.epochs} epoch(s), Adam "
                  f"one-cycle lr {args.lr:g}, batch {args.batch_size}")
    C.save_figure(fig, out / "resnet_mnist.png")


def main(argv=None):
    """Run from the command line (argv: a list of arguments); returns the results."""
    p = C.parser("resnet_mnist", __doc__.split("\n\n")[0], lr=1e-2)
    p.add_argument("--depth", type=int, default=14, help="6n + 2 (default 14: 2 blocks per "
                   "stage)")
    p.add_argument("--blocks", type=int, nargs="+", help="blocks per stage (overrides --depth)")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args(argv)
    args.blocks_label = "-".join(map(str, args.blocks)) if args.blocks else f"{args.depth}"
    out = C.out_dir(args)
    model = models.resnet(args.depth, args.channels, blocks=args.blocks, rng=args.seed)
    model.to(args.device)
    loader = C.train_loader(args)
    optimizer = optim.Adam(model.parameters(), lr=args.lr)
    scheduler = optim.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * len(loader))
    result = fit(model, loader, optimizer, scheduler, epochs=args.epochs,
                 test_loader=C.test_loader(args), out=out, progress=not args.no_progress,
                 hparams={"model": f"resnet {args.blocks_label}", "lr": args.lr})
    test, train = result["test"], result["train"]
    summary = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
               "train_loss_last_epoch": train["loss"], "steps": result["step"],
               "seconds": round(result["seconds"], 1),
               "images_per_s": round(train["images_per_s"], 1),
               "parameters": sum(math.prod(q.shape) for q in model.parameters()),
               "config": {k: v for k, v in vars(args).items() if k not in ("out", "data")}}
    C.write_json(out / "resnet_mnist.json", summary)
    plot(out, args, test["accuracy"])
    print(f"ResNet {args.blocks_label} ({summary['parameters']} parameters): test accuracy "
          f"{100 * test['accuracy']:.2f}% after {args.epochs} epoch(s), {result['step']} steps, "
          f"{summary['seconds']:.0f} s ({summary['images_per_s']:.0f} images/s)")
    print(f"wrote {out / 'resnet_mnist.json'}, resnet_mnist.png, metrics.csv, checkpoint.npz")
    return summary


if __name__ == "__main__":
    main()
