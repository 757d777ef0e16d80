"""Shared pieces of the CUDA kernels: the simulator switch, block sizes, device helpers and
the launch plumbing (argument checks, CuPy streams, flat views, the launch counter). Imports
numpy, numba.cuda and kernels._common (CuPy lazily).

Launch counter: every kernel launch made through `launch` adds one to LAUNCHES[kernel name],
on a GPU and under the simulator alike. It counts minires's own numba.cuda kernels only; work
that minires runs as plain CuPy operations (matmul, the loss, gradient sums...) launches CuPy's
kernels, which this counter cannot see (bench/launches.py counts or estimates those).
"""
import collections
import contextlib
import functools
import warnings

import numpy as np
from numba import cuda

from .._common import array_module, is_device_array

try:  # numba-cuda (NVIDIA's target) keeps its own config; numba's built-in target shares numba's
    from numba.cuda.core.config import ENABLE_CUDASIM
except ImportError:
    from numba.core.config import ENABLE_CUDASIM
SIMULATOR = bool(ENABLE_CUDASIM)  # NUMBA_ENABLE_CUDASIM=1: NumPy arrays in, Python threads
if not SIMULATOR and not cuda.cudadrv.nvvm.is_available():
    # kernels/__init__.py turns this into its reference fallback (with a warning)
    raise ImportError("numba.cuda finds no NVVM to compile kernels: pip install numba-cuda[cu13]")

# Small grids are deliberate here (one block sums the galpha partials; tiny tensors need few
# blocks); without this Numba warns once per distinct grid size below 128 blocks.
warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU under-util")

# Threads per block of the one-thread-per-element kernels. Fewer under the simulator, which runs
# every thread of a block as a Python thread, those past the end of the array included.
THREADS = 32 if SIMULATOR else 256
# Threads per block of the reductions; a power of two, the size of their shared buffer. Smaller
# under the simulator, which runs one Python thread per CUDA thread.
RED = 8 if SIMULATOR else 256
MAX_PARTIALS = 1024  # blocks of the first galpha stage, so the second stage is one block


# inline="always" inlines these helpers in Numba IR before typing; a device-function call asks
# the driver for the GPU's compute capability, so compile_ptx without a GPU would fail.
@cuda.jit(device=True, inline="always")
def unravel(t, d1, d2, d3):
    """Flat C-order index t of an array (., d1, d2, d3) -> its 4 indices."""
    k = t % d3
    t //= d3
    j = t % d2
    t //= d2
    return t // d1, t % d1, j, k


@cuda.jit(device=True, inline="always")
def block_sum(acc, tid, like):
    """Sum of acc over a block of RED threads in a fixed pairwise tree, so the result does not
    depend on scheduling. Every thread of the block calls it; like: an array of acc's dtype."""
    buf = cuda.shared.array(RED, like.dtype)
    buf[tid] = acc
    cuda.syncthreads()
    step = RED // 2
    while step > 0:
        if tid < step:
            buf[tid] += buf[tid + step]
        cuda.syncthreads()
        step //= 2
    return buf[0]


@cuda.jit(device=True, inline="always")
def tap(a, s, size):
    """Output index p with p * s == a and 0 <= p < size, else -1 (a is a tap's input offset)."""
    if a < 0 or a % s != 0 or a // s >= size:
        return -1
    return a // s



def check_arrays(op, arrays):
    """numpy (simulator) or cupy for these arrays, else a TypeError naming op and the types.

    A NumPy array on a real GPU is refused: Numba would silently copy it there and back."""
    device = [is_device_array(a) for a in arrays]
    if arrays and all(device) and not SIMULATOR:
        return array_module(arrays[0])
    if arrays and SIMULATOR and all(isinstance(a, np.ndarray) for a in arrays):
        return np
    kinds = ", ".join(type(a).__name__ for a in arrays)
    want = "NumPy arrays (the CUDA simulator is on)" if SIMULATOR else "CuPy (device) arrays"
    raise TypeError(f"kernels.cuda.{op}: expected {want}, got {kinds}")


def _is_array(a):
    return hasattr(a, "__array_interface__") or hasattr(a, "__cuda_array_interface__")


def launcher(func):
    """Wrap launcher func(xp, *args): check its array arguments (also those inside list or
    tuple arguments), run it on their device."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        arrays = []
        for a in (*args, *kwargs.values()):
            arrays.extend(x for x in (a if isinstance(a, (list, tuple)) else (a,))
                          if _is_array(x))
        xp = check_arrays(func.__name__, arrays)
        # outputs are allocated and kernels launched on the device that holds the inputs
        on_gpu = xp is not np and isinstance(arrays[0], xp.ndarray)
        with arrays[0].device if on_gpu else contextlib.nullcontext():
            return func(xp, *args, **kwargs)
    return wrapper


LAUNCHES = collections.Counter()  # kernel name -> launches made through launch()


def kernel_name(kernel):
    """The Python name of a @cuda.jit kernel (real dispatcher or simulator)."""
    return (getattr(kernel, "py_func", None) or kernel.fn).__name__


def launch_counts():
    """{kernel name: launches} since the last reset_launch_counts(), a copy."""
    return dict(LAUNCHES)


def reset_launch_counts():
    LAUNCHES.clear()


@contextlib.contextmanager
def count_launches():
    """`with count_launches() as c:` c is a Counter of the launches made inside the block,
    by kernel name (filled in when the block ends)."""
    before, counts = collections.Counter(LAUNCHES), collections.Counter()
    try:
        yield counts
    finally:
        counts.update(LAUNCHES - before)


@functools.lru_cache(maxsize=1024)
def _configured(kernel, blocks, threads, ptr):
    """kernel[blocks, threads, stream], made once per (kernel, grid, block, stream) on a GPU.

    Numba builds a launch configuration (and a Stream wrapper) on every kernel[...]; this
    keeps one per distinct launch. Not under the simulator, whose kernel[...] configures the
    kernel object itself and returns it."""
    return kernel[blocks, threads, cuda.external_stream(ptr) if ptr else 0]


def _device_view(a):
    """A CuPy array as a Numba device array without the stream sync Numba does by default
    (also inside tuples); any other argument as is."""
    if isinstance(a, tuple):
        return tuple(_device_view(x) for x in a)
    if is_device_array(a):
        return cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=a, sync=False)
    return a


def launch(xp, kernel, blocks, threads, *args):
    """kernel[blocks, threads](*args) on CuPy's current stream; nothing when blocks == 0.
    Counted in LAUNCHES.

    CuPy arrays are viewed without the stream sync Numba does by default: the launch is on the
    caller's stream, so order is kept and the host never waits. Tuples of arrays (the
    multi-tensor kernels) are viewed element by element. Other arguments pass as is."""
    if blocks == 0:
        return
    LAUNCHES[kernel_name(kernel)] += 1
    if SIMULATOR:
        kernel[blocks, threads](*args)
        return
    ptr = 0 if xp is np else xp.cuda.get_current_stream().ptr  # 0: the legacy default stream
    _configured(kernel, blocks, threads, ptr)(*[_device_view(a) for a in args])


def per_element(n):
    return (n + THREADS - 1) // THREADS  # blocks of THREADS threads covering n elements


def contig(xp, *arrays):
    return [None if a is None else xp.ascontiguousarray(a) for a in arrays]


def flat(xp, *arrays):
    """Contiguous 1-D views; None becomes the first array, an unread placeholder of its type.

    The first array must be an input: the simulator copies each argument in and out, so a
    placeholder aliasing an output would overwrite it with stale values."""
    flat = [None if a is None else xp.ascontiguousarray(a).reshape(-1) for a in arrays]
    return [flat[0] if a is None else a for a in flat]

