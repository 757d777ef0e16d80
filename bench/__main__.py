"""Command line of the bench suite: `python -m bench [kernels|step] [options]` from the repo root.

Imports bench.common, bench.kernel_table and bench.step (minires, kernels; torch if present).
"""
import argparse
import sys

from bench import common


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=(
        "Time minires's kernels (default) or a whole seed-net training step (`step`) against "
        "kernels.reference and PyTorch. Medians in ms; warm-up and JIT compilation excluded "
        "(compile/load time is printed separately)."))
    p.add_argument("what", nargs="?", default="kernels", choices=("kernels", "step"))
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="batch sizes")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for Numba, BLAS and PyTorch (default: Numba's default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds; the best per-round median is reported")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 10 if args.what == "kernels" else 20
    return args


def _sync(device, torch):
    """A function that waits for queued GPU work (CuPy and PyTorch), or None on the CPU."""
    if device != "cuda":
        return None
    import cupy

    def sync():
        cupy.cuda.Device().synchronize()
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()
    return sync


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        xp, torch, tdev = common.setup(args.device, args.threads)
    except common.BenchError as err:
        print(f"python -m bench: error: {err}", file=sys.stderr)
        return 2
    sync = _sync(args.device, torch)
    compile_s = _warm_kernels(xp)
    rows = common.header(args.device, xp, torch, tdev)
    rows.append(("kernel JIT compile/cache load", f"{compile_s:.2f} s (not in the timings)"))
    common.print_header(rows, args.json)
    if args.what == "step":
        from bench import step
        step.run(args, xp, torch, tdev, sync)
    else:
        from bench import kernel_table
        kernel_table.run(args, xp, torch, tdev, sync)
    return 0


def _warm_kernels(xp):
    """Run every kernel once on tiny float32 inputs; return the seconds it took (the JIT
    compile, or loading the cache)."""
    import time

    import numpy as np

    from minires import kernels
    t0 = time.perf_counter()
    x = xp.ones((2, 2, 5, 5), dtype=np.float32)
    w = xp.ones((2, 2, 3, 3), dtype=np.float32)
    y = kernels.conv2d_forward(x, w, None, (1, 1), (1, 1))
    kernels.conv2d_backward_input(y, w, x.shape, (1, 1), (1, 1))
    kernels.conv2d_backward_weight(y, x, w.shape, (1, 1), (1, 1), True)
    for a in (x, xp.ones((4, 4, 256, 128), dtype=np.float32)):  # small, and big enough to
        r = kernels.relu_forward(a)                            # be split over threads
        kernels.relu_backward(a, r)
        s = kernels.residual_add_forward(a, a, None, False)
        kernels.residual_add_backward(s, s, a, None, False)
        p, am = kernels.max_pool2d_forward(a, (2, 2), (2, 2))
        kernels.max_pool2d_backward(p, am, a.shape, (2, 2), (2, 2))
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
