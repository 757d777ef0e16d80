"""Lesion study: train a small BasicBlock ResNet and a plain net of as many blocks, then remove
one block at a time at test time (keeping only its shortcut) and measure the test accuracy.

    python examples/lesion.py     # resnet(blocks=(4, 4, 4), channels=8) vs plain_net(12), BN

Both nets train for one epoch (Adam, one-cycle schedule peaking at --lr).

A ResNet block removed leaves its shortcut: the identity, or for the first block of a stage the
1x1 projection (then ReLU, as the block would apply). A plain block removed becomes the
identity (every plain_net block keeps its shape). Writes lesion.csv and lesion.png.
"""
import time

import _common as C  # first: it finds minires in a checkout that is not installed
import minires.ops as F
from minires import models, nn


class Removed(nn.Module):
    """What is left of a lesioned block: its shortcut (then the block's ReLU) or the identity."""

    def __init__(self, block):
        super().__init__()
        self.shortcut = getattr(block, "shortcut", None)
        self.relu = getattr(block, "relu", False)

    def forward(self, x):
        y = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y) if self.relu else y  # in the nets x >= 0 already: relu(x) == x


def block_kind(block):
    """'identity' or 'projection' (a BasicBlock's shortcut), or 'plain' (a plain_net block)."""
    if isinstance(block, nn.BasicBlock):
        return "identity" if block.shortcut is None else "projection"
    return "plain"


def lesion(name, model, test):
    """Accuracy with nothing removed (block -1), then with each of model.blocks removed."""
    blocks = model.blocks
    rows = [{"model": name, "block": -1, "kind": "none", "test_accuracy": C.accuracy(model, test)}]
    for i, block in enumerate(blocks):
        setattr(blocks, str(i), Removed(block))  # Sequential keeps block i as attribute "i"
        try:
            acc = C.accuracy(model, test)
        finally:
            setattr(blocks, str(i), block)
        rows.append({"model": name, "block": i, "kind": block_kind(block), "test_accuracy": acc})
    base = rows[0]["test_accuracy"]
    for r in rows:
        r["drop"] = base - r["test_accuracy"]
    return rows


def plot(rows, path):
    """Test accuracy after removing each block, per model; projection blocks marked."""
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == name]
        lesioned = [r for r in mine if r["block"] >= 0]
        x = [r["block"] + 1 for r in lesioned]
        ax.plot(x, [100 * r["test_accuracy"] for r in lesioned], "o-", color=f"C{i}", label=name)
        ax.axhline(100 * mine[0]["test_accuracy"], color=f"C{i}", ls=":", lw=1)
        proj = [r for r in lesioned if r["kind"] == "projection"]
        if proj:
            ax.plot([r["block"] + 1 for r in proj], [100 * r["test_accuracy"] for r in proj],
                    "s", ms=11, mfc="none", color=f"C{i}", label=f"{name}: downsampling block")
    ax.set_xticks(sorted({r["block"] + 1 for r in rows if r["block"] >= 0}))
    ax.set(xlabel="block removed", ylabel="test accuracy (%)", ylim=(0, 100),
           title="remove one block at test time (dotted: nothing removed)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    C.save_figure(fig, path)


def main(argv=None):
    """Run from the command line (argv: a list of arguments); returns the results."""
    p = C.parser("lesion", __doc__.split("\n\n")[0], lr=3e-3, test_limit=2000)
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 4, 4],
                   help="ResNet BasicBlocks per stage (default 4 4 4: 12 blocks, 2 projections)")
    p.add_argument("--plain-depth", type=int, default=None,
                   help="plain_net blocks (default: as many as the ResNet's)")
    p.add_argument("--steps", type=int, default=938, help="training steps per net (default "
                   "938: one epoch)")
    p.add_argument("--channels", type=int, default=8)
    args = p.parse_args(argv)
    out, test = C.out_dir(args), C.test_loader(args)
    plain_depth = args.plain_depth or sum(args.blocks)
    nets = {f"ResNet {'-'.join(map(str, args.blocks))}":
            models.resnet(channels=args.channels, blocks=args.blocks, rng=args.seed),
            f"plain net {plain_depth}": models.plain_net(plain_depth, args.channels,
                                                        batch_norm=True, rng=args.seed)}
    rows = []
    for name, model in nets.items():
        start = time.perf_counter()
        C.train(model, C.train_loader(args, limit=args.steps * args.batch_size), args,
                one_cycle=True, desc=name)
        seconds = time.perf_counter() - start
        rows += lesion(name, model, test)
        lost = [f"{100 * r['test_accuracy']:.1f}" for r in rows if r["model"] == name]
        print(f"{name}: test accuracy {lost[0]}% intact ({seconds:.0f} s training); with block "
              f"1..{len(lost) - 1} removed: {', '.join(lost[1:])} (%)", flush=True)
    C.write_csv(out / "lesion.csv", rows)
    plot(rows, out / "lesion.png")
    print(f"wrote {out / 'lesion.csv'} and lesion.png")
    return rows


if __name__ == "__main__":
    main()
