"""Feature maps of a few test digits at every layer of a trained residual net, before and after
each skip, as one PNG grid (rows: layers; columns: a few channels per digit).

    python examples/activations.py                          # train the seed net briefly
    python examples/activations.py --checkpoint runs/x/checkpoint.npz   # from `minires train`

Writes activations.png, activations.csv (per layer: shape and statistics over the digits) and,
after training, model.npz (the state_dict, loadable again with --checkpoint).
"""
import numpy as np

import _common as C  # first: it finds minires in a checkout that is not installed
import minires
from minires import models, nn
from minires.tensor import Tensor, no_grad

BUILD = {  # --model and `minires train --model` names -> the net
    "seed": lambda seed: models.seed_net(skip="residual", rng=seed),
    "rezero": lambda seed: models.seed_net(skip="rezero", rng=seed),
    "resnet": lambda seed: models.resnet(depth=8, rng=seed),
}
NAMES = {"seed": "seed net", "rezero": "seed net (ReZero)", "resnet": "ResNet-8"}


def trace(module, x, name, maps):
    """Run x through module (no_grad), appending (label, host array) to `maps` at every ReLU
    and pooling output, and at each skip: the block output f(x), a projected shortcut and the
    sum after the skip. Non-skip containers run their children in definition order (true of
    minires.models' nets). Returns the output Tensor."""
    if isinstance(module, (nn.Residual, nn.ReZero)):
        _mark_skip_input(maps, f"{name}: x (skip input)", x)
        fx = trace(module.block, x, f"{name}.block", maps)
        if not isinstance(_last(module.block), nn.ReLU):
            maps.append((f"{name}: f(x) (block output)", C.host(fx)))
        else:
            maps[-1] = (f"{maps[-1][0]} = f(x)", maps[-1][1])
        if getattr(module, "shortcut", None) is not None:
            maps.append((f"{name}: shortcut(x)", C.host(module.shortcut(x))))
        y = module(x)
        maps.append((f"{name}: after the skip", C.host(y)))
        return y
    kids = list(module.named_children())
    if not kids:
        y = module(x)
        if isinstance(module, (nn.ReLU, nn.MaxPool2d)) and y.ndim == 4:
            maps.append((f"{name} {type(module).__name__}", C.host(y)))
        return y
    for child_name, child in kids:
        x = trace(child, x, f"{name}.{child_name}" if name else child_name, maps)
    return x


def _mark_skip_input(maps, label, x):
    """Label the last recorded map as the skip's input x, or record x if it is not that map."""
    a = C.host(x)
    if maps and maps[-1][1].shape == a.shape and np.array_equal(maps[-1][1], a):
        maps[-1] = (f"{maps[-1][0]} = next x", a)
    else:
        maps.append((label, a))


def _last(module):
    kids = list(module.children())
    return _last(kids[-1]) if kids else module


def load_model(args):
    """The --model net, trained briefly or loaded from --checkpoint; returns (model, trained)."""
    if args.checkpoint is None:
        model = BUILD[args.model](args.seed)
        C.train(model, C.train_loader(args, limit=args.steps * args.batch_size), args,
                one_cycle=True, desc=f"train {args.model}")
        return model, True
    state = minires.load(args.checkpoint)
    if isinstance(state, dict) and state.get("kind") == "minires.train":  # `minires train`
        name = state["hparams"].get("model", args.model)
        if name not in BUILD:
            raise SystemExit(f"activations: checkpoint model {name!r} has no skip to show; "
                             f"use one of {sorted(BUILD)}")
        args.model, state = name, state["model"]
    model = BUILD[args.model](args.seed)
    model.load_state_dict(state)
    return model.to(args.device), False


def plot(images, maps, labels, args, path):
    """Grid: one row per recorded layer, `--maps` channels for each digit side by side."""
    plt = C.pyplot()
    k, n = args.maps, len(images)
    rows = [("input", C.host(images))] + maps
    fig, axes = plt.subplots(len(rows), n * k, figsize=(0.55 * n * k + 1.6, 0.6 * len(rows)),
                             squeeze=False)
    for r, (label, a) in enumerate(rows):
        shown = a[:, :k]
        lo, hi = float(shown.min()), float(shown.max())
        cmap, vmin = ("viridis", lo) if lo >= 0 else ("RdBu_r", -max(hi, -lo))
        for d in range(n):
            for c in range(k):
                ax = axes[r, d * k + c]
                ax.set_axis_off()
                if c < a.shape[1]:
                    ax.imshow(a[d, c], cmap=cmap, vmin=vmin, vmax=max(hi, -vmin, 1e-12),
                              interpolation="nearest")
        axes[r, 0].text(-0.15, 0.5, f"{label}\n{'x'.join(map(str, a.shape[1:]))}",
                        transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=6)
    for d in range(n):
        axes[0, d * k].set_title(f"digit {labels[d]}", fontsize=7, loc="left")
    fig.suptitle(f"{NAMES[args.model]}: first {k} channels per layer (colour scale shared per "
                 f"row)", fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.15)
    C.save_figure(fig, path, dpi=80)


def main(argv=None):
    """Run from the command line (argv: a list of arguments); returns the results."""
    p = C.parser("activations", __doc__.split("\n\n")[0], lr=3e-3, test_limit=2000)
    p.add_argument("--model", choices=sorted(BUILD), default="seed")
    p.add_argument("--checkpoint", help="a state_dict (.npz) or a `minires train` checkpoint")
    p.add_argument("--steps", type=int, default=300, help="training steps when no checkpoint")
    p.add_argument("--digits", type=int, default=3, help="test digits to show")
    p.add_argument("--maps", type=int, default=6, help="channels shown per layer and digit")
    args = p.parse_args(argv)
    out = C.out_dir(args)
    model, trained = load_model(args)
    if trained:
        minires.save(model.state_dict(), out / "model.npz")
    print(f"{NAMES[args.model]}: test accuracy {100 * C.accuracy(model, C.test_loader(args)):.2f}%")
    labels = C.mnist(args, "test", args.digits)[1]
    x = next(iter(C.test_loader(args)))[0][:args.digits]  # normalised like in training
    maps = []
    model.eval()
    with no_grad():
        trace(model, Tensor(x), "", maps)
    C.write_csv(out / "activations.csv", [
        {"layer": label, "shape": "x".join(map(str, a.shape[1:])), "mean": float(a.mean()),
         "std": float(a.std()), "max": float(a.max()), "zero_fraction": float((a == 0).mean())}
        for label, a in maps])
    plot(x, maps, labels, args, out / "activations.png")
    print(f"wrote {out / 'activations.png'} ({len(maps)} layers) and activations.csv")
    return maps


if __name__ == "__main__":
    main()
