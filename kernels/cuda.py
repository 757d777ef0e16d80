"""Numba CUDA kernels for conv2d, relu, residual_add and max_pool2d: kernels.cpu's names and
kernels/reference.py's semantics. Imports numpy, numba.cuda, kernels._common (CuPy lazily).
CuPy arrays in and out, no copies, on CuPy's current stream; NumPy arrays only under the
simulator (NUMBA_ENABLE_CUDASIM=1). Reductions are fixed trees (no atomics): deterministic.
"""
import contextlib
import functools
import warnings

import numpy as np
from numba import cuda

from ._common import array_module, is_device_array

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

__all__ = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
           "relu_forward", "relu_backward", "residual_add_forward", "residual_add_backward",
           "max_pool2d_forward", "max_pool2d_backward"]

THREADS = 256  # threads per block of the one-thread-per-element kernels
# Threads per block of the reductions; a power of two, the size of their shared buffer. Smaller
# under the simulator, which runs one Python thread per CUDA thread.
RED = 8 if SIMULATOR else 256
MAX_PARTIALS = 1024  # blocks of the first galpha stage, so the second stage is one block


# inline="always" inlines these helpers in Numba IR before typing; a device-function call asks
# the driver for the GPU's compute capability, so compile_ptx without a GPU would fail.
@cuda.jit(device=True, inline="always")
def _unravel(t, d1, d2, d3):
    """Flat C-order index t of an array (., d1, d2, d3) -> its 4 indices."""
    k = t % d3
    t //= d3
    j = t % d2
    t //= d2
    return t // d1, t % d1, j, k


@cuda.jit(device=True, inline="always")
def _block_sum(acc, tid, like):
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
def _tap(a, s, size):
    """Output index p with p * s == a and 0 <= p < size, else -1 (a is a tap's input offset)."""
    if a < 0 or a % s != 0 or a // s >= size:
        return -1
    return a // s


@cuda.jit(cache=True)
def conv2d_forward_kernel(x, w, b, has_bias, sh, sw, ph, pw, y):
    """One thread per y[n, o, p, q] (q fastest: neighbouring threads read neighbouring x)."""
    t = cuda.grid(1)
    if t >= y.size:
        return
    n, o, p, q = _unravel(t, y.shape[1], y.shape[2], y.shape[3])
    acc = y.dtype.type(0)  # typed zero: a literal 0 would promote float32 sums to float64
    for c in range(w.shape[1]):
        for i in range(w.shape[2]):
            h = p * sh - ph + i
            if 0 <= h < x.shape[2]:
                for j in range(w.shape[3]):
                    v = q * sw - pw + j
                    if 0 <= v < x.shape[3]:
                        acc += x[n, c, h, v] * w[o, c, i, j]
    if has_bias:
        acc += b[o]  # after the sum, as the reference adds it
    y[n, o, p, q] = acc


@cuda.jit(cache=True)
def conv2d_backward_input_kernel(gy, w, sh, sw, ph, pw, gx):
    """One thread per gx[n, c, h, v]: gathers every (o, tap) that read it; no atomics."""
    t = cuda.grid(1)
    if t >= gx.size:
        return
    n, c, h, v = _unravel(t, gx.shape[1], gx.shape[2], gx.shape[3])
    acc = gx.dtype.type(0)
    for i in range(w.shape[2]):
        p = _tap(h + ph - i, sh, gy.shape[2])
        if p >= 0:
            for j in range(w.shape[3]):
                q = _tap(v + pw - j, sw, gy.shape[3])
                if q >= 0:
                    for o in range(w.shape[0]):
                        acc += gy[n, o, p, q] * w[o, c, i, j]
    gx[n, c, h, v] = acc


@cuda.jit(cache=True)
def conv2d_backward_weight_kernel(gy, x, sh, sw, ph, pw, gw, gb):
    """Block k < gw.size sums gw.flat[k] over (n, p, q), block gw.size + o sums gb[o] (launched
    only when gb is wanted): RED threads stride over (n, p, q), then a shared-memory tree."""
    k, tid = cuda.blockIdx.x, cuda.threadIdx.x
    oh, ow = gy.shape[2], gy.shape[3]
    acc = gy.dtype.type(0)
    if k < gw.size:
        o, c, i, j = _unravel(k, gw.shape[1], gw.shape[2], gw.shape[3])
        for t in range(tid, gy.shape[0] * oh * ow, RED):
            n, p, q = t // (oh * ow), t // ow % oh, t % ow
            h, v = p * sh - ph + i, q * sw - pw + j
            if 0 <= h < x.shape[2] and 0 <= v < x.shape[3]:
                acc += gy[n, o, p, q] * x[n, c, h, v]
    else:
        o = k - gw.size
        for t in range(tid, gy.shape[0] * oh * ow, RED):
            acc += gy[t // (oh * ow), o, t // ow % oh, t % ow]
    total = _block_sum(acc, tid, gy)
    if tid == 0:
        if k < gw.size:
            o, c, i, j = _unravel(k, gw.shape[1], gw.shape[2], gw.shape[3])
            gw[o, c, i, j] = total
        else:
            gb[k - gw.size] = total


@cuda.jit(cache=True)
def relu_forward_kernel(x, y):
    """y = max(x, 0) on flat arrays; NaN stays NaN and -0.0 stays -0.0, as numpy.maximum."""
    t = cuda.grid(1)
    if t < x.size:
        y[t] = y.dtype.type(0) if x[t] < 0 else x[t]


@cuda.jit(cache=True)
def relu_backward_kernel(gy, y, gx):
    """gx = gy * (y > 0) on flat arrays (inf or NaN in gy gives NaN where masked, as there)."""
    t = cuda.grid(1)
    if t < gy.size:
        gx[t] = gy[t] if y[t] > 0 else gy[t] * gx.dtype.type(0)


@cuda.jit(cache=True)
def residual_add_forward_kernel(x, fx, alpha, has_alpha, relu, y):
    """y = act(x + alpha[0] * fx) on flat arrays (alpha unread when not has_alpha)."""
    t = cuda.grid(1)
    if t < x.size:
        v = x[t] + alpha[0] * fx[t] if has_alpha else x[t] + fx[t]
        y[t] = y.dtype.type(0) if relu and v < 0 else v


@cuda.jit(cache=True)
def residual_add_backward_kernel(gy, y, fx, alpha, has_alpha, relu, gx, gfx, partial):
    """gx = g, gfx = alpha * g with g = gy * (y > 0) if relu else gy, on flat arrays.

    With has_alpha, block b also writes partial[b], its share of sum(g * fx) (grid-stride
    loop, then a shared-memory tree); y, fx, alpha and partial are unread otherwise.
    """
    tid = cuda.threadIdx.x
    acc = gy.dtype.type(0)
    for t in range(cuda.grid(1), gy.size, cuda.gridsize(1)):
        g = gy[t]
        if relu and not y[t] > 0:
            g = g * gy.dtype.type(0)
        gx[t] = g
        if has_alpha:
            gfx[t] = g * alpha[0]
            acc += g * fx[t]
        else:
            gfx[t] = g
    total = _block_sum(acc, tid, gy)
    if has_alpha and tid == 0:
        partial[cuda.blockIdx.x] = total


@cuda.jit(cache=True)
def sum_kernel(a, out):
    """out[0] = sum(a), one block of RED threads: strided partial sums, then a tree."""
    tid = cuda.threadIdx.x
    acc = a.dtype.type(0)
    for t in range(tid, a.size, RED):
        acc += a[t]
    total = _block_sum(acc, tid, a)
    if tid == 0:
        out[0] = total


@cuda.jit(cache=True)
def max_pool2d_forward_kernel(x, kh, kw, sh, sw, y, argmax):
    """One thread per window y[n, c, p, q]: its maximum and tap i * kw + j of the first one."""
    t = cuda.grid(1)
    if t >= y.size:
        return
    n, c, p, q = _unravel(t, y.shape[1], y.shape[2], y.shape[3])
    best, at = x[n, c, p * sh, q * sw], 0
    for i in range(kh):
        for j in range(kw):
            v = x[n, c, p * sh + i, q * sw + j]
            if v > best:  # strict: ties keep the first tap
                best, at = v, i * kw + j
    y[n, c, p, q] = best
    argmax[n, c, p, q] = at


@cuda.jit(cache=True)
def max_pool2d_backward_kernel(gy, argmax, kh, kw, sh, sw, gx):
    """One thread per gx[n, c, h, v]: adds gy of every window whose argmax is this element,
    in tap order as the reference does; no atomics."""
    t = cuda.grid(1)
    if t >= gx.size:
        return
    n, c, h, v = _unravel(t, gx.shape[1], gx.shape[2], gx.shape[3])
    acc = gx.dtype.type(0)
    for i in range(kh):
        p = _tap(h - i, sh, gy.shape[2])
        if p >= 0:
            for j in range(kw):
                q = _tap(v - j, sw, gy.shape[3])
                if q >= 0 and argmax[n, c, p, q] == i * kw + j:
                    acc += gy[n, c, p, q]
    gx[n, c, h, v] = acc


# every @cuda.jit kernel above, for the PTX compile tests
KERNELS = (conv2d_forward_kernel, conv2d_backward_input_kernel, conv2d_backward_weight_kernel,
           relu_forward_kernel, relu_backward_kernel, residual_add_forward_kernel,
           residual_add_backward_kernel, sum_kernel, max_pool2d_forward_kernel,
           max_pool2d_backward_kernel)


def _check_arrays(op, arrays):
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


def _launcher(func):
    """Wrap launcher func(xp, *args): check its array arguments, run it on their device."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        arrays = [a for a in (*args, *kwargs.values()) if hasattr(a, "__array_interface__")
                  or hasattr(a, "__cuda_array_interface__")]
        xp = _check_arrays(func.__name__, arrays)
        # outputs are allocated and kernels launched on the device that holds the inputs
        on_gpu = xp is not np and isinstance(arrays[0], xp.ndarray)
        with arrays[0].device if on_gpu else contextlib.nullcontext():
            return func(xp, *args, **kwargs)
    return wrapper


def _launch(xp, kernel, blocks, threads, *args):
    """kernel[blocks, threads](*args) on CuPy's current stream; nothing when blocks == 0.

    CuPy arrays are viewed without the stream sync Numba does by default: the launch is on the
    caller's stream, so order is kept and the host never waits. Other arguments pass as is."""
    if blocks == 0:
        return
    ptr = 0 if xp is np else xp.cuda.get_current_stream().ptr  # 0: the legacy default stream
    args = [cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=a, sync=False)
            if is_device_array(a) else a for a in args]
    kernel[blocks, threads, cuda.external_stream(ptr) if ptr else 0](*args)


def _per_element(n):
    return (n + THREADS - 1) // THREADS  # blocks of THREADS threads covering n elements


def _contig(xp, *arrays):
    return [None if a is None else xp.ascontiguousarray(a) for a in arrays]


def _flat(xp, *arrays):
    """Contiguous 1-D views; None becomes the first array, an unread placeholder of its type.

    The first array must be an input: the simulator copies each argument in and out, so a
    placeholder aliasing an output would overwrite it with stale values."""
    flat = [None if a is None else xp.ascontiguousarray(a).reshape(-1) for a in arrays]
    return [flat[0] if a is None else a for a in flat]


@_launcher
def conv2d_forward(xp, x, w, b, stride, padding):
    """Cross-correlation y (N, O, OH, OW) of x (N, C, H, W) with w (O, C, KH, KW), + b (O,)."""
    x, w = _contig(xp, x, w)
    (sh, sw), (ph, pw) = stride, padding
    oh = (x.shape[2] + 2 * ph - w.shape[2]) // sh + 1
    ow = (x.shape[3] + 2 * pw - w.shape[3]) // sw + 1
    y = xp.empty((x.shape[0], w.shape[0], oh, ow), dtype=x.dtype)
    _launch(xp, conv2d_forward_kernel, _per_element(y.size), THREADS,
            x, w, _flat(xp, w, b)[1], b is not None, sh, sw, ph, pw, y)
    return y


@_launcher
def conv2d_backward_input(xp, gy, w, x_shape, stride, padding):
    """Gradient (N, C, H, W) = x_shape to the input from gy (N, O, OH, OW)."""
    gx = xp.empty(x_shape, dtype=gy.dtype)
    _launch(xp, conv2d_backward_input_kernel, _per_element(gx.size), THREADS,
            *_contig(xp, gy, w), *stride, *padding, gx)
    return gx


@_launcher
def conv2d_backward_weight(xp, gy, x, w_shape, stride, padding, bias):
    """(gw (O, C, KH, KW), gb (O,) or None when not bias) from gy (N, O, OH, OW)."""
    gw = xp.empty(w_shape, dtype=gy.dtype)
    gb = xp.empty((w_shape[0],), dtype=gy.dtype) if bias else None
    _launch(xp, conv2d_backward_weight_kernel, gw.size + (w_shape[0] if bias else 0), RED,
            *_contig(xp, gy, x), *stride, *padding, gw, _flat(xp, gy, gb)[1])
    return gw, gb


@_launcher
def relu_forward(xp, x):
    """max(x, 0), a new array of x's shape and dtype."""
    y = xp.empty(x.shape, dtype=x.dtype)
    _launch(xp, relu_forward_kernel, _per_element(x.size), THREADS, *_flat(xp, x, y))
    return y


@_launcher
def relu_backward(xp, gy, y):
    """gy where the forward output y > 0, else 0."""
    gx = xp.empty(gy.shape, dtype=gy.dtype)
    _launch(xp, relu_backward_kernel, _per_element(gy.size), THREADS, *_flat(xp, gy, y, gx))
    return gx


@_launcher
def residual_add_forward(xp, x, fx, alpha, relu):
    """act(x + alpha * fx); alpha None (1) or a one-element array; act ReLU if relu."""
    y = xp.empty(x.shape, dtype=x.dtype)
    flat = _flat(xp, x, fx, alpha, y)
    _launch(xp, residual_add_forward_kernel, _per_element(x.size), THREADS,
            *flat[:3], alpha is not None, relu, flat[3])
    return y


@_launcher
def residual_add_backward(xp, gy, y, fx, alpha, relu):
    """(gx, gfx, galpha) of act(x + alpha * fx); galpha (alpha's shape) None without alpha.

    y is read only when relu, fx only when alpha is given. galpha is reduced on the device in
    two deterministic stages: per-block partial sums, then one block over the partials.
    """
    gx, gfx = xp.empty(gy.shape, dtype=gy.dtype), xp.empty(gy.shape, dtype=gy.dtype)
    blocks = min(MAX_PARTIALS, (gy.size + RED - 1) // RED)
    partial = None if alpha is None else xp.empty((blocks,), dtype=gy.dtype)
    flat = _flat(xp, gy, y, fx, alpha, gx, gfx, partial)
    _launch(xp, residual_add_backward_kernel, blocks, RED,
            *flat[:4], alpha is not None, relu, *flat[4:])
    if alpha is None:
        return gx, gfx, None
    galpha = xp.zeros(alpha.shape, dtype=alpha.dtype)  # stays 0 for empty arrays
    _launch(xp, sum_kernel, min(blocks, 1), RED, partial, galpha.reshape(-1))
    return gx, gfx, galpha


@_launcher
def max_pool2d_forward(xp, x, kernel, stride):
    """(y (N, C, OH, OW), argmax int32 tap index i * KW + j of each window's first maximum)."""
    x, = _contig(xp, x)
    (kh, kw), (sh, sw) = kernel, stride
    shape = (x.shape[0], x.shape[1], (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1)
    y, argmax = xp.empty(shape, dtype=x.dtype), xp.empty(shape, dtype=np.int32)
    _launch(xp, max_pool2d_forward_kernel, _per_element(y.size), THREADS,
            x, kh, kw, sh, sw, y, argmax)
    return y, argmax


@_launcher
def max_pool2d_backward(xp, gy, argmax, x_shape, kernel, stride):
    """Each window's gradient sent to its argmax: gx (N, C, H, W) = x_shape."""
    gx = xp.empty(x_shape, dtype=gy.dtype)
    _launch(xp, max_pool2d_backward_kernel, _per_element(gx.size), THREADS,
            *_contig(xp, gy, argmax), *kernel, *stride, gx)
    return gx
