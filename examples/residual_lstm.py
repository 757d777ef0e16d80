"""Residual connections between stacked LSTM layers on sequential MNIST.

Each image is read as a sequence of 28 rows of 28 pixels. A Linear projection to --hidden,
then 4 LSTM layers (plain, or each wrapped in nn.Residual), then a Linear head on the last
step. Both stacks start from the same weights and see the same batches. Writes
residual_lstm.csv (loss and gradient norms per step), residual_lstm_summary.csv (test
accuracy) and residual_lstm.png to --out.

    python examples/residual_lstm.py --steps 600 --out runs/residual_lstm
"""
import argparse
import contextlib
import csv
import math
import pathlib
import sys

import numpy as np
from tqdm import tqdm

import minires.ops as F
from minires import nn, optim
from minires.data import DataLoader, load_mnist
from minires.nn.recurrent import LSTM, SequenceOnly
from minires.train import evaluate, train_step

VARIANTS = ("plain", "residual")


class SequenceClassifier(nn.Module):
    """(N, 1, 28, 28) images -> (N, 10) logits through `layers` stacked LSTMs of width hidden."""

    def __init__(self, hidden, layers, residual, rng):
        super().__init__()
        self.proj = nn.Linear(28, hidden, rng=rng)
        blocks = [SequenceOnly(LSTM(hidden, hidden, rng=rng)) for _ in range(layers)]
        self.lstms = nn.Sequential(*[nn.Residual(b) if residual else b for b in blocks])
        self.head = nn.Linear(hidden, 10, rng=rng)

    def forward(self, x):
        rows = F.reshape(x, (x.shape[0], 28, 28))  # (N, 1, 28, 28) -> (N, T=28, F=28)
        seq = self.lstms(self.proj(rows))
        return self.head(F.getitem(seq, (slice(None), -1)))  # last step (N, hidden)

    def lstm_layers(self):
        return [m for m in self.lstms.modules() if isinstance(m, LSTM)]


def grad_norm(module):
    """L2 norm of the gradients of all of a module's parameters."""
    return math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum())
                         for p in module.parameters() if p.grad is not None))


def train_variant(name, args, train_set, test_set):
    """Train one stack for args.steps steps; returns (per-step rows, test metrics)."""
    model = SequenceClassifier(args.hidden, args.layers, name == "residual",
                               np.random.default_rng(args.seed)).to(args.device)
    opt = (optim.Adam(model.parameters(), lr=args.lr) if args.optimizer == "adam" else
           optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))
    loader = DataLoader(*train_set, batch_size=args.batch_size, seed=args.seed,
                        device=args.device)
    first, last = model.lstm_layers()[0], model.lstm_layers()[-1]
    rows = []
    with tqdm(total=args.steps, desc=name, file=sys.stderr, dynamic_ncols=True) as bar:
        while len(rows) < args.steps:
            for x, y in loader:
                loss, _, _ = train_step(model, x, y, opt)
                rows.append(dict(step=len(rows) + 1, variant=name, loss=loss,
                                 grad_first=grad_norm(first), grad_last=grad_norm(last)))
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                if len(rows) == args.steps:
                    break
    test = evaluate(model, DataLoader(*test_set, batch_size=256, shuffle=False,
                                      device=args.device))
    return rows, test


def plot(rows, summary, layers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(10, 3.8))
    for color, name in zip(("tab:red", "tab:blue"), VARIANTS):
        mine = [r for r in rows if r["variant"] == name]
        steps = [r["step"] for r in mine]
        acc = summary[name]["accuracy"]
        ax_loss.plot(steps, _smooth([r["loss"] for r in mine]), color=color,
                     label=f"{name} (test acc {acc:.3f})")
        ax_grad.semilogy(steps, _smooth([r["grad_first"] for r in mine]), color=color,
                         label=f"{name}: LSTM 1")
        ax_grad.semilogy(steps, _smooth([r["grad_last"] for r in mine]), color=color, ls=":",
                         label=f"{name}: LSTM {layers}")
    ax_loss.set(xlabel="step", ylabel="training loss (smoothed)", title="sequential MNIST")
    ax_grad.set(xlabel="step", ylabel="parameter gradient norm (smoothed)",
                title="gradient reaching the first vs last LSTM")
    ax_loss.legend()
    ax_grad.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _smooth(values, k=10):
    """Trailing mean over k steps (a readable curve from noisy per-batch losses)."""
    c = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    return [(c[i + 1] - c[max(0, i + 1 - k)]) / (i + 1 - max(0, i + 1 - k))
            for i in range(len(values))]


def _blas_one_thread():
    """One BLAS thread: per-step matmuls are tiny, and on shared cores OpenBLAS's pool made
    them ~10x slower (measured); threadpoolctl is optional."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="MNIST folder (default $MINIRES_DATA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/residual_lstm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600, help="training steps per variant")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"],
                   help="sgd: momentum 0.9 (shows raw gradient attenuation, which Adam rescales)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first LIMIT training and test images")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_set = tuple(a[:args.limit] for a in load_mnist("train", args.data))
    test_set = tuple(a[:args.limit] for a in load_mnist("test", args.data))
    rows, summary = [], {}
    with _blas_one_thread():
        for name in VARIANTS:
            variant_rows, summary[name] = train_variant(name, args, train_set, test_set)
            rows += variant_rows
    write_csvs(out, rows, summary, args.layers)
    plot(rows, summary, args.layers, out / "residual_lstm.png")
    return summary


def write_csvs(out, rows, summary, layers):
    """residual_lstm.csv (per step) and residual_lstm_summary.csv (per variant); prints it."""
    with open(out / "residual_lstm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "variant", "loss", "grad_first", "grad_last"])
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "residual_lstm_summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "test_accuracy", "test_loss", "final_train_loss",
                         "grad_first_step1", "grad_last_step1", "mean_grad_first",
                         "mean_grad_last"])
        for name in VARIANTS:
            mine = [r for r in rows if r["variant"] == name]
            mean = lambda key: float(np.mean([r[key] for r in mine]))  # noqa: E731
            writer.writerow([name, summary[name]["accuracy"], summary[name]["loss"],
                             np.mean([r["loss"] for r in mine[-20:]]), mine[0]["grad_first"],
                             mine[0]["grad_last"], mean("grad_first"), mean("grad_last")])
            print(f"{name:>8}: test accuracy {summary[name]['accuracy']:.4f}, test loss "
                  f"{summary[name]['loss']:.4f}; |grad| LSTM 1 / LSTM {layers} at step 1: "
                  f"{mine[0]['grad_first']:.3g} / {mine[0]['grad_last']:.3g}")


if __name__ == "__main__":
    main()
