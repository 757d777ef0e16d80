"""CPU max pooling: @njit loops over (H, W) planes and their public wrappers; small inputs run
on the calling thread, big ones are split over planes.

Both directions address the windows through two small tables made once per shape: each
window's corner (a flat offset in its plane) and each tap's offset from the corner (tap
t = a * KW + b at a * W + b). So forward is one loop over the taps, and backward turns an
argmax into a position without dividing by KW. Backward zeroes gx in one memset, then writes
each window's gradient: stored when windows do not overlap (the seed net's pools), added when
they do.

Shapes: x (N, C, H, W), y / argmax (N, C, OH, OW); kernel and stride (int, int) pairs.
"""
import functools

import numpy as np
from numba import njit, prange

from .memory import launch, outputs, threads


@njit(cache=True, nogil=True)
def pool_planes(x, first, stop, hw, corners, taps, y, argmax):
    """Planes first..stop-1 of x (flat, hw elements each): y = the maximum of each window,
    argmax the index t of its first maximum in `taps` order (later equal values do not replace
    it, NaN never wins); y and argmax flat, len(corners) windows per plane."""
    ohw = corners.shape[0]
    for pl in range(first, stop):
        xv, yv, av = x[pl * hw:(pl + 1) * hw], y[pl * ohw:(pl + 1) * ohw], \
            argmax[pl * ohw:(pl + 1) * ohw]
        for o in range(ohw):
            corner = corners[o]
            best, where = xv[corner], 0
            for t in range(1, taps.shape[0]):
                v = xv[corner + taps[t]]
                better = v > best  # selects, not branches: random data mispredicts
                best = v if better else best
                where = t if better else where
            yv[o] = best
            av[o] = where


@njit(cache=True, nogil=True)
def unpool_planes(gy, argmax, first, stop, hw, corners, taps, overlap, gx):
    """Planes first..stop-1 of gx (flat, hw elements each) = 0, then each window's gy put at
    its argmax tap: added when windows overlap, else stored. An argmax outside the taps is
    skipped and counted: returns that count (0 for a valid argmax)."""
    zero, ohw, bad = gx.dtype.type(0), corners.shape[0], 0
    planes = gx[first * hw:stop * hw]
    for p in range(planes.shape[0]):  # from 0: no negative-index check, so a plain memset
        planes[p] = zero
    for pl in range(first, stop):
        gv, av, xv = gy[pl * ohw:(pl + 1) * ohw], argmax[pl * ohw:(pl + 1) * ohw], \
            gx[pl * hw:(pl + 1) * hw]
        for o in range(ohw):
            t = av[o]
            if 0 <= t < taps.shape[0]:
                if overlap:
                    xv[corners[o] + taps[t]] += gv[o]
                else:
                    xv[corners[o] + taps[t]] = gv[o]
            else:
                bad += 1
    return bad


@njit(cache=True, parallel=True)
def max_pool_forward(x, planes, hw, corners, taps, y, argmax, chunks):
    """pool_planes over `planes` planes split in `chunks` parallel ranges."""
    for k in prange(chunks):
        pool_planes(x, k * planes // chunks, (k + 1) * planes // chunks, hw, corners, taps, y,
                    argmax)


@njit(cache=True, parallel=True)
def max_pool_backward(gy, argmax, planes, hw, corners, taps, overlap, gx, bad, chunks):
    """unpool_planes over `planes` planes split in `chunks` parallel ranges; chunk k's count
    of invalid argmax values in bad[k]."""
    for k in prange(chunks):
        bad[k] = unpool_planes(gy, argmax, k * planes // chunks, (k + 1) * planes // chunks,
                               hw, corners, taps, overlap, gx)


# --- the public kernels -----------------------------------------------------------------
_POOL_PARALLEL_MIN = 1 << 15  # input elements (measured: docs/kernels.md); below, one thread


@functools.lru_cache(maxsize=64)
def _windows(h, w, kernel, stride):
    """(corners, taps) for (h, w) planes: the flat offset of each window's corner (row by row)
    and of each tap a * KW + b from its corner."""
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    corners = [i * sh * w + j * sw for i in range(oh) for j in range(ow)]
    taps = [a * w + b for a in range(kh) for b in range(kw)]
    return np.array(corners, np.int64), np.array(taps, np.int64)


def _chunks(x_size, planes):
    return 1 if x_size < _POOL_PARALLEL_MIN else min(threads(), planes)


def max_pool2d_forward(x, kernel, stride):
    """(y (N, C, OH, OW), argmax int32 tap index i * KW + j of each window's first maximum)."""
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    out = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
    y, argmax = outputs.empty(out, x.dtype), outputs.empty(out, np.int32)
    args = (h * w, *_windows(h, w, kernel, stride), y.reshape(-1), argmax.reshape(-1))
    chunks = _chunks(x.size, n * c)
    if chunks == 1:
        pool_planes(x.reshape(-1), 0, n * c, *args)
    else:
        launch(max_pool_forward, x.reshape(-1), n * c, *args, chunks)
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape, kernel, stride):
    """gx (N, C, H, W): each window's gy added at its argmax (zero elsewhere)."""
    n, c, h, w = x_shape
    gx = outputs.empty(x_shape, gy.dtype)
    overlap = stride[0] < kernel[0] or stride[1] < kernel[1]
    args = (h * w, *_windows(h, w, kernel, stride), overlap, gx.reshape(-1))
    flat_gy, flat_am = gy.reshape(-1), argmax.astype(np.int32, copy=False).reshape(-1)
    chunks = _chunks(gx.size, n * c)
    if chunks == 1:
        bad = unpool_planes(flat_gy, flat_am, 0, n * c, *args)
    else:
        parts = np.zeros(chunks, np.int64)
        launch(max_pool_backward, flat_gy, flat_am, n * c, *args, parts, chunks)
        bad = parts.sum()
    if bad:
        raise ValueError(f"max_pool2d_backward: {bad} argmax values outside [0, "
                         f"{kernel[0] * kernel[1]}) (not the forward's argmax for kernel "
                         f"{tuple(kernel)})")
    return gx
