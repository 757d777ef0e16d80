"""CPU max pooling: @njit loops over (H, W) planes and their public wrappers; small inputs run
on the calling thread, big ones are split over planes.

Shapes: x (N, C, H, W), y / argmax (N, C, OH, OW); kernel and stride (int, int) pairs.
"""
import numpy as np
from numba import njit, prange

from .memory import flat as _flat, launch, outputs, threads


@njit(cache=True, nogil=True)
def _pool_plane(x, at, width, oh, ow, kh, kw, sh, sw, y, am, out):
    """One (H, W) plane starting at flat offset `at` of x into y[out:out + oh*ow] and am."""
    for i in range(oh):
        for j in range(ow):
            corner = at + i * sh * width + j * sw
            best = x[corner]
            where = 0
            for a in range(kh):
                row = corner + a * width
                for b in range(kw):
                    v = x[row + b]
                    better = v > best  # selects, not branches: random data mispredicts
                    best = v if better else best
                    where = a * kw + b if better else where
            y[out] = best
            am[out] = where
            out += 1


@njit(cache=True, nogil=True)
def pool_planes(x, first, stop, height, width, kh, kw, sh, sw, y, argmax):
    """max_pool_forward for planes first..stop-1 (on the calling thread)."""
    oh, ow = (height - kh) // sh + 1, (width - kw) // sw + 1
    for pl in range(first, stop):
        _pool_plane(x, pl * height * width, width, oh, ow, kh, kw, sh, sw, y, argmax,
                    pl * oh * ow)


@njit(cache=True, parallel=True)
def max_pool_forward(x, planes, height, width, kh, kw, sh, sw, y, argmax, chunks):
    """y = max of x's (kh, kw) window at (i*sh, j*sw) of each plane; argmax the tap index
    a*kw + b of its first maximum (later equal values do not replace it, NaN never wins).

    x, y, argmax flat: `planes` planes of (height, width) and (OH, OW), split in `chunks`.
    """
    for k in prange(chunks):
        pool_planes(x, k * planes // chunks, (k + 1) * planes // chunks, height, width, kh, kw,
                    sh, sw, y, argmax)


@njit(cache=True, nogil=True)
def _unpool_plane(gy, am, at, oh, ow, kw, sh, sw, width, plane):
    """plane (H*W flat) = 0, then each window's gy (flat from `at`) added at its argmax."""
    zero = plane.dtype.type(0)
    for p in range(plane.shape[0]):
        plane[p] = zero
    for i in range(oh):
        for j in range(ow):
            a = am[at]
            plane[(i * sh + a // kw) * width + j * sw + a % kw] += gy[at]
            at += 1


@njit(cache=True, nogil=True)
def unpool_planes(gy, argmax, first, stop, oh, ow, kw, sh, sw, gx):
    """max_pool_backward for planes first..stop-1 (on the calling thread)."""
    width = gx.shape[2]
    for pl in range(first, stop):
        _unpool_plane(gy, argmax, pl * oh * ow, oh, ow, kw, sh, sw, width, gx[pl].reshape(-1))


@njit(cache=True, parallel=True)
def max_pool_backward(gy, argmax, planes, oh, ow, kw, sh, sw, gx, chunks):
    """gx = 0, then each window's gy added at its argmax tap (overlapping windows add up).

    gy, argmax flat (`planes` planes of (oh, ow)); gx (planes, H, W); split in `chunks`.
    """
    for k in prange(chunks):
        unpool_planes(gy, argmax, k * planes // chunks, (k + 1) * planes // chunks, oh, ow, kw,
                      sh, sw, gx)


# --- the public kernels -----------------------------------------------------------------
_POOL_PARALLEL_MIN = 1 << 18  # input elements: below, one thread (no launch cost)


def max_pool2d_forward(x, kernel, stride):
    """(y (N, C, OH, OW), argmax int32 tap index i * KW + j of each window's first maximum)."""
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    out = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
    y, argmax = outputs.empty(out, dtype=x.dtype), outputs.empty(out, dtype=np.int32)
    args = (h, w, kh, kw, sh, sw, y.reshape(-1), argmax.reshape(-1))
    if x.size < _POOL_PARALLEL_MIN:
        pool_planes(_flat(x), 0, n * c, *args)
    else:
        launch(max_pool_forward, _flat(x), n * c, *args, threads())
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape, kernel, stride):
    """gx (N, C, H, W): each window's gy added at its argmax (zero elsewhere)."""
    n, c, oh, ow = gy.shape
    gx = outputs.empty(x_shape, dtype=gy.dtype)
    args = (oh, ow, kernel[1], stride[0], stride[1], gx.reshape(n * c, *x_shape[2:]))
    flat_gy, flat_am = _flat(gy), _flat(argmax.astype(np.int32, copy=False))
    if gx.size < _POOL_PARALLEL_MIN:
        unpool_planes(flat_gy, flat_am, 0, n * c, *args)
    else:
        launch(max_pool_backward, flat_gy, flat_am, n * c, *args, threads())
    return gx
