"""The seed experiment with a ReZero skip (y = x + alpha * block(x), alpha starting at 0):
grad_flow.py --skip rezero, writing into runs/rezero by default; takes grad_flow's options.

    python examples/rezero.py --seeds 0
"""
import sys

import grad_flow


def main(argv=None):
    """grad_flow.main with --skip rezero and --out runs/rezero (argv may override --out)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return grad_flow.main(["--skip", "rezero", "--out", "runs/rezero"] + argv)


if __name__ == "__main__":
    main()
