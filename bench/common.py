"""Shared bench plumbing: the device and thread setup, the run header, timing, table/JSON rows.

Imports numpy and minires (runtime facts: minires.runtime); torch and cupy only when present.
"""
import json
import os
import platform
import statistics
import time

import numpy as np


class BenchError(Exception):
    """A setup problem reported as one clear line (no GPU for --device cuda, bad --threads)."""


def load_torch():
    """torch, or None when it is not installed (the `bench` extra)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def setup(device, threads, with_torch=True):
    """Check the device, fix the thread counts; return (xp, torch or None, torch device).

    threads applies to Numba, BLAS and PyTorch (minires.runtime.set_threads and torch's own).
    with_torch=False never imports torch (a process that times minires alone).
    """
    # torch first: its OpenMP runtime then starts with the user's settings, not the passive
    # wait policy chosen next for Numba's (see minires.runtime): a fair comparison
    torch = load_torch() if with_torch else None
    from minires import backend, runtime
    runtime.prefer_passive_openmp()  # before any kernel starts Numba's pool
    if device == "cuda" and not backend.cupy_available():
        raise BenchError("--device cuda: no usable CUDA GPU/CuPy found (install the cuda12 or "
                         "cuda13 extra on a machine with an NVIDIA GPU), or use --device cpu")
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads must be >= 1, got {threads}")
        try:
            runtime.set_threads(threads)
        except ValueError as err:
            raise BenchError(f"--threads {threads}: {err}") from None
    tdev = None
    if torch is not None:
        torch.set_num_threads(threads or runtime.numba_threads() or 1)
        if device == "cuda":
            tdev = torch.device("cuda") if torch.cuda.is_available() else None
        else:
            tdev = torch.device("cpu")
    xp = np
    if device == "cuda":
        import cupy
        xp = cupy
    return xp, torch, tdev


def header(device, xp, torch, tdev):
    """The facts a reader needs to compare two runs, as (key, value) pairs."""
    from minires import kernels, runtime
    sample = xp.empty(1, dtype=np.float32)
    rows = [("machine", f"{platform.machine()}, {os.cpu_count()} logical CPUs"),
            ("cpu", f"{runtime.cpu_name()}, {runtime.vector_isa()}"),
            ("device", device if device == "cpu" else _gpu_name()),
            ("kernels", kernels.backend_name(sample)),
            ("threads", str(runtime.numba_threads() or 1)),
            ("numba threading layer", runtime.threading_layer()),
            ("openmp wait policy", runtime.wait_policy()),
            ("BLAS", runtime.blas()),
            ("OPENBLAS_CORETYPE", os.environ.get("OPENBLAS_CORETYPE", "(unset)")),
            ("torch", "not installed" if torch is None else
             f"{torch.__version__}, {torch.get_num_threads()} threads"
             + ("" if tdev is not None else ", no CUDA: column left empty"))]
    return rows


def _gpu_name():
    from minires import backend
    return f"cuda ({backend.gpu_name()})"


def print_header(rows, as_json):
    if as_json:
        print(json.dumps({"header": dict(rows)}))
    else:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"# {k:<{width}}  {v}")
        print()


def timed(fn, reps, warmup=2, sync=None):
    """Median wall time of fn() in ms over `reps` runs after `warmup` runs (compile, caches).

    sync (e.g. a GPU synchronize) runs before the clock starts and after fn returns.
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def settle():
    """Let the other implementation's spinning worker threads go idle before timing.

    OpenMP and OpenBLAS workers busy-wait for a while after a parallel region; on a 2-core
    machine they would steal the cores from the next implementation's threads.
    """
    time.sleep(0.05)


def compare(impls, reps, rounds=3, sync=None):
    """{name: ms} for each fn in impls (name -> fn or None), interleaved over `rounds`.

    Each round times every implementation in turn (with `settle()` between them); the result
    is the lowest of a name's per-round medians, which drops rounds disturbed by other load.
    """
    best = {name: None for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            if fn is None:
                continue
            settle()
            ms = timed(fn, reps, sync=sync)
            best[name] = ms if best[name] is None else min(best[name], ms)
    return best


def fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def print_table(columns, rows, as_json):
    """rows: dicts keyed by the column names; a table with aligned columns, or JSON lines."""
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    cells = [[r.get(c) if isinstance(r.get(c), str) else fmt(r.get(c), 2 if "ratio" in c or
              "x" == c[-1:] else 3) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns,
                                                                                   widths))))
    for row in cells:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row,
                                                                                       widths))))
    print()
