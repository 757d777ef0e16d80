"""Runtime facts and settings of this process, in one place for the CLI and the bench: thread
pools (Numba, BLAS), the OpenMP wait policy, the CPU's vector instruction set, versions, GPU.

Imports minires.backend, numba, llvmlite and threadpoolctl. Nothing changes at import: the
command line and the bench call prefer_passive_openmp() and set_threads() themselves.
"""
import contextlib
import importlib.metadata
import os
import platform
import sys
import threading
import time

import numpy as np
import threadpoolctl

from minires import backend

try:  # a hard dependency, but the kernels fall back to kernels.reference without it
    import numba
    import numba.np.ufunc.parallel as _numba_parallel
except ImportError:  # pragma: no cover - numba is installed wherever the tests run
    numba = _numba_parallel = None

_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# What prefer_passive_openmp() last did: "set", or why it left the policy alone.
_passive = {"outcome": "never asked", "value": None}


def pool_started():
    """True once Numba's thread pool runs (its threading layer is fixed from then on); an
    unknown Numba internals layout counts as started, so nothing is changed then."""
    if numba is None:
        return False
    return bool(getattr(_numba_parallel, "_is_initialized", True))


def prefer_passive_openmp():
    """Make Numba's OpenMP workers sleep at once after a kernel instead of spinning, unless
    the user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT) or the pool already runs.

    Why: spinning workers steal the cores from anything else that wants them (another
    process, OpenBLAS's pool, PyTorch's) and turn a 20 ms training step into 30-230 ms on 2
    cores (bench/README.md); sleeping costs a few microseconds per kernel. Call it before any
    kernel runs (libgomp reads the variable once, when the pool starts). Sets the variable in
    os.environ, so child processes inherit it. Returns a line saying what it did.
    """
    chosen = [v for v in _WAIT_VARS if v in os.environ]
    if _passive["outcome"] == "set" and os.environ.get("OMP_WAIT_POLICY") == "PASSIVE":
        return _record("set")  # an earlier call of ours set it: still ours
    if chosen:
        return _record("user", ", ".join(f"{v}={os.environ[v]}" for v in chosen))
    if pool_started():
        return _record("started")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return _record("set")


def _record(outcome, value=None):
    _passive.update(outcome=outcome, value=value)
    return {"set": "minires set OMP_WAIT_POLICY=PASSIVE",
            "user": f"left alone: the user chose {value}",
            "started": "left alone: Numba's thread pool had already started"}[outcome]


def wait_policy():
    """The OpenMP wait policy in use and who chose it, e.g. 'PASSIVE (set by minires)'."""
    chosen = [f"{v}={os.environ[v]}" for v in _WAIT_VARS if v in os.environ]
    if _passive["outcome"] == "set" and os.environ.get("OMP_WAIT_POLICY") == "PASSIVE":
        return "PASSIVE (set by minires)"
    if chosen:
        return f"{', '.join(chosen)} (from the environment)"
    why = {"started": "Numba's pool started first", "never asked": "minires was not asked"}
    return f"OpenMP default: spin, then sleep ({why.get(_passive['outcome'], 'unset')})"


def set_threads(n):
    """Limit Numba's pool and the BLAS/OpenMP pools to n threads; returns a function that
    restores the previous counts. Raises ValueError for n < 1 or more than Numba allows.

    Starts Numba's pool: call prefer_passive_openmp() first.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an integer >= 1, got {n!r}")
    before = numba.get_num_threads() if numba is not None else None
    if numba is not None:
        numba.set_num_threads(n)  # ValueError beyond NUMBA_NUM_THREADS, naming the range
    pools = threadpoolctl.threadpool_limits(n)

    def restore():
        pools.restore_original_limits()
        if before is not None:
            numba.set_num_threads(before)

    return restore


@contextlib.contextmanager
def limit_threads(n):
    """set_threads(n) inside the block, the previous counts afterwards; None changes nothing."""
    restore = set_threads(n) if n is not None else None
    try:
        yield
    finally:
        if restore is not None:
            restore()


def numba_threads():
    """Threads Numba's parallel kernels use now (None without Numba). Starts the pool."""
    return numba.get_num_threads() if numba is not None else None


def threading_layer():
    """Numba's threading layer ('omp', 'tbb', 'workqueue'), or what is configured while no
    parallel kernel has run yet."""
    if numba is None:
        return "n/a (Numba not installed)"
    try:
        return numba.threading_layer()
    except ValueError:  # the pool starts with the first parallel kernel
        return f"not started (configured: {numba.config.THREADING_LAYER})"


def blas():
    """The BLAS NumPy uses, from threadpoolctl: 'openblas 0.3.27 (SkylakeX, 2 threads)'.

    threadpoolctl sees only loaded libraries: a matmul first makes sure NumPy's is.
    """
    np.ones((2, 2)) @ np.ones((2, 2))
    pools = [f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture', '?')}, "
             f"{p.get('num_threads')} threads)" for p in threadpoolctl.threadpool_info()
             if p.get("user_api") == "blas"]
    return "; ".join(pools) or "none found"


def vector_isa():
    """The widest x86/ARM vector instruction set this CPU offers, as LLVM (hence Numba)
    sees it: 'AVX-512', 'AVX2', 'AVX', 'SSE4.2', 'SVE', 'NEON', or 'unknown'."""
    try:
        from llvmlite import binding
        features = binding.get_host_cpu_features()
    except (ImportError, RuntimeError):  # no llvmlite, or a host LLVM cannot describe
        return "unknown"
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"),
                       ("sse4.2", "SSE4.2"), ("sve", "SVE"), ("neon", "NEON")):
        if features.get(flag, False):
            return name
    return "unknown"


def cpu_name():
    """LLVM's name for the host CPU ('skylake-avx512', 'znver4', ...), or the platform's."""
    try:
        from llvmlite import binding
        return binding.get_host_cpu_name()
    except (ImportError, RuntimeError):
        return platform.processor() or platform.machine()


def version(*dists):
    """The installed version of the first of these distributions found, or None."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def cpu_rows():
    """(label, value) rows about the CPU side: machine, vector ISA, threads, wait policy,
    BLAS. Starts Numba's pool (call prefer_passive_openmp() first)."""
    rows = [("cpu", f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} logical CPUs"),
            ("vector isa", vector_isa())]
    if numba is not None:
        threads = numba.get_num_threads()  # first: starts the pool, which picks the layer
        rows += [("numba threading layer", threading_layer()),
                 ("numba threads", f"{threads} of {numba.config.NUMBA_NUM_THREADS}")]
    return rows + [("openmp wait policy", wait_policy()), ("blas", blas())]


def gpu_rows():
    """(label, value) rows about CuPy, numba-cuda and the GPU; never fails without a GPU."""
    cupy_version = version("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy")
    rows = [("cupy", cupy_version or "not installed"),
            ("numba-cuda", version("numba-cuda") or "not installed")]
    if not backend.cupy_available():
        reason = "CuPy not installed" if cupy_version is None else "no usable CUDA device"
        return rows + [("gpu", f"none ({reason}); --device cuda unavailable")]
    x = backend.to_device(np.empty(1, np.float32), "cuda")
    runtime = backend.array_module(x).cuda.runtime.runtimeGetVersion()
    return rows + [("gpu", backend.gpu_name()),
                   ("cuda runtime", f"{runtime // 1000}.{runtime % 1000 // 10}")]


@contextlib.contextmanager
def notice_if_slow(message, after=2.0, file=None):
    """Run the block; if it is still running after `after` seconds, print `message` (to
    stderr by default) and, once it ends, how long it took. Quick blocks print nothing: a warm
    start that loads Numba's cache stays silent, a cold one says why the terminal waits."""
    file = sys.stderr if file is None else file
    start, lock, state = time.perf_counter(), threading.Lock(), {"shown": False, "done": False}

    def show():
        with lock:  # never after the block ended, and never half a line
            if not state["done"]:
                state["shown"] = True
                file.write(f"{message} ... ")
                file.flush()

    timer = threading.Timer(after, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            state["done"] = True
            if state["shown"]:
                file.write(f"done in {time.perf_counter() - start:.1f} s\n")
                file.flush()
