"""Shared helpers of the example scripts: the command line, MNIST loaders, training through
minires.train, CSV/JSON output, moving averages and matplotlib (Agg) figures.

Imports minires (and matplotlib lazily, from the `plot` extra).
"""
import argparse
import csv
import functools
import importlib.util
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if importlib.util.find_spec("minires") is None:  # a checkout used without `pip install .`
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402  (after the path fix above)

from minires import backend, optim  # noqa: E402
from minires.data import DataLoader, load_mnist  # noqa: E402
from minires.tensor import Tensor  # noqa: E402
from minires.train import evaluate, train_epoch  # noqa: E402

EVAL_BATCH = 500  # test batches: no graph is kept, so bigger batches just run faster


def parser(name, description, *, batch_size=64, lr=3e-3, limit=None, test_limit=None):
    """An ArgumentParser with the options every script shares; `name` sets --out's default."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", help="folder with the four MNIST .gz files (default "
                   "$MINIRES_DATA, else ~/.cache/minires/mnist)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=f"runs/{name}", help="output folder (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weights and shuffling (default 0)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr, help="Adam learning rate (default "
                   "%(default)s)")
    p.add_argument("--limit", type=int, default=limit, help="use only the first N training "
                   "images (default: all)")
    p.add_argument("--test-limit", type=int, default=test_limit, help="use only the first N "
                   "test images (default: all 10,000)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def out_dir(args):
    """The --out folder, created."""
    path = pathlib.Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=4)
def _mnist(split, root):
    return load_mnist(split, root)


def mnist(args, split, limit=None):
    """(images uint8 (N, 28, 28), labels (N,)) of one split, the first `limit` only."""
    images, labels = _mnist(split, args.data)
    return images[:limit], labels[:limit]


def train_loader(args, seed=None, limit=None):
    """Shuffled training batches of the first `limit` (default --limit) images, seeded."""
    images, labels = mnist(args, "train", args.limit if limit is None else limit)
    return DataLoader(images, labels, args.batch_size, shuffle=True,
                      seed=args.seed if seed is None else seed, device=args.device)


def test_loader(args):
    """Test batches (unshuffled) of the first --test-limit images."""
    images, labels = mnist(args, "test", args.test_limit)
    return DataLoader(images, labels, EVAL_BATCH, shuffle=False, device=args.device)


def train(model, loader, args, *, epochs=1, one_cycle=False, on_step=None, desc="train"):
    """Train `model` (moved to --device) with Adam for `epochs` passes over `loader` through
    minires.train.train_epoch; returns the last epoch's metrics dict. The learning rate is
    --lr, or with one_cycle (and 2+ steps) a one-cycle schedule peaking at --lr."""
    model.to(args.device)
    optimizer = optim.Adam(model.parameters(), lr=args.lr)
    total = epochs * len(loader)
    scheduler = optim.OneCycleLR(optimizer, args.lr, total) if one_cycle and total > 1 else None
    metrics, step = None, 0
    for _ in range(epochs):
        metrics = train_epoch(model, loader, optimizer, scheduler, step=step, on_step=on_step,
                              progress=not args.no_progress, desc=desc)
        step += metrics["steps"]
    return metrics


def accuracy(model, loader):
    """Test accuracy (a float in [0, 1]) in eval mode."""
    return evaluate(model, loader)["accuracy"]


def host(a):
    """A NumPy copy of a device array or Tensor."""
    return backend.to_device(a.data if isinstance(a, Tensor) else a, "cpu")


def grad_norm(p):
    """L2 norm of a Parameter's gradient (nan when it has none)."""
    return float("nan") if p.grad is None else float(np.linalg.norm(host(p.grad).ravel()))


def moving_average(x, window):
    """Centred moving average of a 1-d sequence; the window shrinks at both ends.

    Returns a float64 array of len(x). window 1 returns x unchanged.
    """
    x = np.asarray(x, dtype=np.float64)
    w = max(1, min(int(window), len(x)))
    kernel = np.ones(w)
    # np.convolve "same" centres the window; dividing by the count of real samples under it
    # (instead of w) keeps the ends unbiased.
    return np.convolve(x, kernel, "same") / np.convolve(np.ones_like(x), kernel, "same")


def write_csv(path, rows):
    """Write a list of dicts (same keys) as CSV; None becomes an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)


def write_json(path, obj):
    """Write obj as indented JSON (numpy scalars converted)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v))
        f.write("\n")


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (works without a display)."""
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit(f"{err}: the plots need matplotlib; pip install '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """Save a figure as PNG and close it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
