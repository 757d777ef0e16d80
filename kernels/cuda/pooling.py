"""CUDA max pooling: one thread per output element forward, one per input element backward
(each gathers the windows that chose it: no atomics)."""
import numpy as np
from numba import cuda

from ._device import THREADS, contig, launch, launcher, per_element, tap, unravel


# Launch signature of each @cuda.jit kernel below, for the PTX compile test
# (tests/test_kernels_cuda.py fills in {a4} / {i4}: 4-d C-contiguous float / int32 arrays,
# {ints}: four int64 (kh, kw, sh, sw)).
PTX_SIGNATURES = {
    "max_pool2d_forward_kernel": "void({a4}, {ints}, {a4}, {i4})",
    "max_pool2d_backward_kernel": "void({a4}, {i4}, {ints}, {a4})",
}


@cuda.jit(cache=True)
def max_pool2d_forward_kernel(x, kh, kw, sh, sw, y, argmax):
    """One thread per window y[n, c, p, q]: its maximum and tap i * kw + j of the first one."""
    t = cuda.grid(1)
    if t >= y.size:
        return
    n, c, p, q = unravel(t, y.shape[1], y.shape[2], y.shape[3])
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
    n, c, h, v = unravel(t, gx.shape[1], gx.shape[2], gx.shape[3])
    acc = gx.dtype.type(0)
    for i in range(kh):
        p = tap(h - i, sh, gy.shape[2])
        if p >= 0:
            for j in range(kw):
                q = tap(v - j, sw, gy.shape[3])
                if q >= 0 and argmax[n, c, p, q] == i * kw + j:
                    acc += gy[n, c, p, q]
    gx[n, c, h, v] = acc



@launcher
def max_pool2d_forward(xp, x, kernel, stride):
    """(y (N, C, OH, OW), argmax int32 tap index i * KW + j of each window's first maximum)."""
    x, = contig(xp, x)
    (kh, kw), (sh, sw) = kernel, stride
    shape = (x.shape[0], x.shape[1], (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1)
    y, argmax = xp.empty(shape, dtype=x.dtype), xp.empty(shape, dtype=np.int32)
    launch(xp, max_pool2d_forward_kernel, per_element(y.size), THREADS,
            x, kh, kw, sh, sw, y, argmax)
    return y, argmax


@launcher
def max_pool2d_backward(xp, gy, argmax, x_shape, kernel, stride):
    """Each window's gradient sent to its argmax: gx (N, C, H, W) = x_shape."""
    gx = xp.empty(x_shape, dtype=gy.dtype)
    launch(xp, max_pool2d_backward_kernel, per_element(gx.size), THREADS,
            *contig(xp, gy, argmax), *kernel, *stride, gx)
    return gx
