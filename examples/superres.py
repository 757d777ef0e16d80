"""Global residual learning for 2x super-resolution of MNIST digits (as in VDSR).

Each 28x28 digit is averaged down to 14x14 and upscaled back (nearest or bilinear, on the
arrays with xp). A small conv net then either predicts the full image from the upscale, or,
wrapped in nn.Residual, only the residual over it: y = upscale + net(upscale). Both nets start
from the same weights and see the same batches. Writes superres.csv (loss per step),
superres_summary.csv (test PSNR, with the plain upscale as a baseline) and superres.png.

    python examples/superres.py --steps 400 --out runs/superres
"""
import argparse
import csv
import pathlib
import sys

import numpy as np
from tqdm import tqdm

import minires.ops as F
from minires import backend, nn, optim
from minires.data import load_mnist
from minires.tensor import Tensor, no_grad

VARIANTS = ("full", "residual")


def downscale(x):
    """Average 2x2 blocks: (N, 1, 28, 28) -> (N, 1, 14, 14)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def upscale(x, mode):
    """2x upscale of (N, C, H, W) -> (N, C, 2H, 2W): 'nearest' or 'bilinear' (pixel centres
    aligned, edges clamped: PyTorch's align_corners=False)."""
    if mode == "nearest":
        return x.repeat(2, axis=2).repeat(2, axis=3)
    return _linear_2x(_linear_2x(x, 2), 3)


def _linear_2x(x, axis):
    """Linear interpolation to twice the length along one axis."""
    xp, n = backend.array_module(x), x.shape[axis]
    src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)  # output -> input coordinate
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = 2 * n
    w = xp.asarray((src - lo).reshape(shape), dtype=x.dtype)
    lo, hi = xp.asarray(lo), xp.asarray(hi)
    return xp.take(x, lo, axis=axis) * (1 - w) + xp.take(x, hi, axis=axis) * w


def make_net(channels, depth, rng):
    """depth 3x3 convs (padding 1) with ReLUs between: (N, 1, 28, 28) -> (N, 1, 28, 28)."""
    layers = [nn.Conv2d(1, channels, 3, padding=1, rng=rng), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, rng=rng), nn.ReLU()]
    layers.append(nn.Conv2d(channels, 1, 3, padding=1, rng=rng))
    return nn.Sequential(*layers)


class Batches:
    """(upscaled input, target) device arrays of a seeded shuffle of images in [0, 1]."""

    def __init__(self, images, batch_size, seed, device, mode):
        self.images = images.astype(np.float32)[:, None] / 255  # (N, 28, 28) -> (N, 1, 28, 28)
        self.batch_size, self.device, self.mode = batch_size, device, mode
        self.rng = np.random.default_rng(seed)

    def pairs(self, idx):
        target = backend.to_device(self.images[idx], self.device)
        return upscale(downscale(target), self.mode), target

    def __iter__(self):
        while True:
            order = self.rng.permutation(len(self.images))
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield self.pairs(order[start:start + self.batch_size])


def image_mse(pred, target):
    """Per-image MSE (N,) on the host, predictions clipped to [0, 1]."""
    xp = backend.array_module(pred)
    return backend.to_device(((xp.clip(pred, 0, 1) - target) ** 2).mean(axis=(1, 2, 3)), "cpu")


def psnr(pred, target):
    """Per-image PSNR 10 log10(1 / MSE) in dB (N,) on the host (average it for a score)."""
    return 10 * np.log10(1 / np.maximum(image_mse(pred, target), 1e-10))


def first_step_below(losses, level, k=10):
    """First step whose trailing k-step mean training loss is below level (None if never)."""
    values = [v for _, v in losses]
    for i in range(len(values)):
        if np.mean(values[max(0, i + 1 - k):i + 1]) < level:
            return losses[i][0]
    return None


def train_variant(name, args, train_images):
    """Train one net for args.steps steps; returns (model, [(step, loss)])."""
    net = make_net(args.hidden, args.depth, np.random.default_rng(args.seed))
    model = (nn.Residual(net) if name == "residual" else net).to(args.device)
    opt = optim.Adam(model.parameters(), lr=args.lr)
    batches = iter(Batches(train_images, args.batch_size, args.seed, args.device, args.upscale))
    losses = []
    for step in tqdm(range(1, args.steps + 1), desc=name, file=sys.stderr, dynamic_ncols=True):
        x, target = next(batches)
        loss = F.mse_loss(model(Tensor(x)), target)
        model.zero_grad()
        loss.backward()
        opt.step()
        losses.append((step, loss.item()))
    return model, losses


def predict(model, x, batch_size=500):
    with no_grad():
        xp = backend.array_module(x)
        return xp.concatenate([model(Tensor(x[i:i + batch_size])).data
                               for i in range(0, len(x), batch_size)])


def plot(test, outputs, losses, psnrs, path, k=6):
    """Digits (input, upscale, both nets, target) above the training curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(8, 8.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.4, 1])
    rows = [("input 14x14", test["low"], None),
            (f"{test['mode']} upscale", test["up"], "upscale")]
    rows += [(f"{name} net", outputs[name], name) for name in VARIANTS]
    rows.append(("target", test["hr"], None))
    axes = top.subplots(len(rows), k)
    for r, (label, images, key) in enumerate(rows):
        for j in range(k):
            axes[r, j].imshow(np.clip(images[j, 0], 0, 1), cmap="gray", vmin=0, vmax=1)
            axes[r, j].set_xticks([])
            axes[r, j].set_yticks([])
        axes[r, 0].set_ylabel(label + ("" if key is None else f"\n{psnrs[key]:.2f} dB"),
                              fontsize=9)
    ax = bottom.subplots()
    for name in VARIANTS:
        ax.semilogy(*zip(*losses[name]), label=f"{name} (test PSNR {psnrs[name]:.2f} dB)")
    ax.axhline(test["up_mse"], color="gray", ls=":", label="upscale alone (test MSE)")
    ax.set(xlabel="step", ylabel="training MSE")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="MNIST folder (default $MINIRES_DATA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/superres")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400, help="training steps per variant")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=16, help="channels of the hidden convs")
    p.add_argument("--depth", type=int, default=5, help="number of conv layers (>= 2)")
    p.add_argument("--upscale", default="bilinear", choices=["bilinear", "nearest"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first LIMIT training and test images")
    args = p.parse_args(argv)
    if args.depth < 2:
        p.error(f"--depth must be >= 2, got {args.depth}")
    return args


def write_csvs(out, psnrs, losses, up_mse, n_test):
    """superres.csv (loss per step) and superres_summary.csv (PSNR per variant); prints it."""
    with open(out / "superres.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "variant", "loss"])
        writer.writerows((s, name, v) for name in VARIANTS for s, v in losses[name])
    with open(out / "superres_summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "test_psnr_db", "final_train_mse", "first_step_below_upscale"])
        writer.writerow(["upscale", psnrs["upscale"], "", ""])
        print(f" upscale: test PSNR {psnrs['upscale']:.2f} dB over {n_test} images")
        for name in VARIANTS:
            below = first_step_below(losses[name], up_mse)
            writer.writerow([name, psnrs[name], np.mean([v for _, v in losses[name][-20:]]),
                             below])
            print(f"{name:>8}: test PSNR {psnrs[name]:.2f} dB; training MSE below the "
                  f"upscale's test MSE from step {below}")


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_images = load_mnist("train", args.data)[0][:args.limit]
    test_batches = Batches(load_mnist("test", args.data)[0][:args.limit], 1, args.seed,
                           args.device, args.upscale)
    x_test, y_test = test_batches.pairs(np.arange(len(test_batches.images)))
    psnrs = {"upscale": float(psnr(x_test, y_test).mean())}
    outputs, losses = {}, {}
    for name in VARIANTS:
        model, losses[name] = train_variant(name, args, train_images)
        pred = predict(model, x_test)
        psnrs[name] = float(psnr(pred, y_test).mean())
        outputs[name] = backend.to_device(pred[:8], "cpu")
    up_mse = float(image_mse(x_test, y_test).mean())
    write_csvs(out, psnrs, losses, up_mse, len(x_test))
    host = lambda a: backend.to_device(a[:8], "cpu")  # noqa: E731
    test = {"low": host(downscale(y_test)), "up": host(x_test), "hr": host(y_test),
            "mode": args.upscale, "up_mse": up_mse}
    plot(test, outputs, losses, psnrs, out / "superres.png")
    return psnrs


if __name__ == "__main__":
    main()
