"""Command line of the bench suite: `python -m bench [kernels|step|epoch|launches] [options]`
and `python -m bench gpu-check --out DIR [--dry-run]` from the repo root.

Imports bench.common, bench.kernel_table, bench.step, bench.epoch, bench.launches and
bench.gpu_check (minires, kernels; torch if present).
"""
import argparse
import sys

from bench import common


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=(
        "Time minires's kernels (default) or a whole seed-net training step (`step`) against "
        "kernels.reference and PyTorch. Medians in ms; warm-up and JIT compilation excluded "
        "(compile/load time is printed separately). `epoch`: one epoch of real MNIST "
        "training through minires's own loop against the same net in a PyTorch loop. "
        "`launches`: GPU kernel launches per training step. `gpu-check --out DIR`: the whole "
        "GPU check in one command (see `python -m bench gpu-check --help`)."))
    p.add_argument("what", nargs="?", default="kernels",
                   choices=("kernels", "step", "epoch", "launches"))
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes (default 64 256; epoch: one size, default 64)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for Numba, BLAS and PyTorch (default: Numba's default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds; the best per-round median is reported (default "
                   "3; epoch: 2, the best epoch of each side)")
    p.add_argument("--json", action="store_true", help="one JSON object per row (epoch: one "
                   "JSON object)")
    e = p.add_argument_group("epoch")
    e.add_argument("--model", default="seed", choices=("seed", "resnet"), help="seed: the "
                   "seed net as `minires train`; resnet: ResNet-14 as examples/resnet_mnist.py")
    e.add_argument("--steps", type=int, default=None, help="stop each epoch after N steps")
    e.add_argument("--test-limit", type=int, default=None, metavar="N",
                   help="evaluate on the first N test images only (default all 10,000)")
    e.add_argument("--no-torch", action="store_true", help="time the minires side only")
    e.add_argument("--in-process", action="store_true", help="run both sides in this process "
                   "(default: each round of each side in a fresh process, as a user's job runs;"
                   " two OpenMP runtimes in one process slow each other down)")
    e.add_argument("--only-side", choices=("minires", "torch"), help=argparse.SUPPRESS)
    c = p.add_argument_group("launches")
    c.add_argument("--simulate", action="store_true", help="count without a GPU: minires's "
                   "CUDA path under Numba's CUDA simulator, CuPy's launches estimated")
    args = p.parse_args(argv)
    if args.what == "launches" and not args.simulate and args.device != "cuda":
        p.error("launches counts GPU kernel launches: add --device cuda (on a GPU) or "
                "--simulate")
    if args.reps is None:
        args.reps = 10 if args.what == "kernels" else 20
    if args.rounds is None:
        args.rounds = 2 if args.what == "epoch" else 3
    if args.batch is None:
        args.batch = [64] if args.what == "epoch" else [64, 256]
    if args.what == "epoch" and (len(args.batch) != 1 or args.batch[0] < 1 or args.rounds < 1
                                 or (args.steps is not None and args.steps < 1)
                                 or (args.test_limit is not None and args.test_limit < 1)):
        p.error("epoch takes one --batch size; --batch, --rounds, --steps and --test-limit "
                "must be positive")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu-check"]:  # its own options (--out, --dry-run, ...)
        from bench import gpu_check
        return gpu_check.main(argv[1:])
    args = parse(argv)
    if args.what == "launches" and args.simulate:  # no GPU, no timing: no setup
        from bench import launches
        return launches.run_simulated(args)
    try:
        xp, torch, tdev = common.setup(args.device, args.threads, with_torch=not (
            args.what == "epoch" and (args.no_torch or args.only_side == "minires")))
    except common.BenchError as err:
        print(f"python -m bench: error: {err}", file=sys.stderr)
        return 2
    sync = _sync(args.device, torch)
    compile_s = _warm_kernels(xp)
    rows = common.header(args.device, xp, torch, tdev)
    rows.append(("kernel JIT compile/cache load", f"{compile_s:.2f} s (not in the timings)"))
    if args.what == "epoch":  # prints its header itself (inside its one JSON object)
        from bench import epoch
        return epoch.run(args, xp, torch, tdev, sync, rows)
    if args.what == "launches":  # one JSON object with --json: no header line then
        from bench import launches
        if not args.json:
            common.print_header(rows, False)
        return launches.run(args, xp, torch, tdev, sync)
    common.print_header(rows, args.json)
    if args.what == "step":
        from bench import step
        step.run(args, xp, torch, tdev, sync)
    else:
        from bench import kernel_table
        kernel_table.run(args, xp, torch, tdev, sync)
    return 0


def _warm_kernels(xp):
    """Run every registered kernel once on its float32 test cases; return the seconds it took
    (the JIT compile, or loading the cache)."""
    import time

    import numpy as np

    from minires import kernels
    t0 = time.perf_counter()
    kernels.warm_up(xp, np.float32)
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
