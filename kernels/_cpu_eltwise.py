"""Numba @njit kernels for ReLU, the fused residual add and max pooling (kernels/cpu.py wraps).

Imports numba only. Elementwise kernels take flat contiguous arrays and run on the calling
thread; `chunked` splits a big array over threads (a parallel launch costs microseconds, so
kernels/cpu.py uses it only for large arrays). Pooling is split over planes likewise.
"""
from numba import njit, prange

_REDUCE = {"contract", "reassoc", "nsz"}  # galpha is a sum: reassociation lets it vectorise


@njit(cache=True, nogil=True)
def relu_forward(x, y):
    """y = max(x, 0) (NaN kept, as numpy.maximum); x and y flat."""
    zero = x.dtype.type(0)
    for i in range(x.shape[0]):
        v = x[i]
        y[i] = zero if v < zero else v


@njit(cache=True, nogil=True)
def relu_backward(gy, y, gx):
    """gx = gy where y > 0, else 0; all flat."""
    zero = gy.dtype.type(0)
    for i in range(gy.shape[0]):
        gx[i] = gy[i] if y[i] > zero else zero


@njit(cache=True, nogil=True)
def residual_forward(x, fx, alpha, relu, y):
    """y = act(x + alpha * fx), act ReLU if relu; alpha a scalar (1 when the op has none)."""
    zero, one = x.dtype.type(0), x.dtype.type(1)
    n = x.shape[0]
    if alpha == one:  # exactly x + fx: no rounding from a multiply by 1
        if relu:
            for i in range(n):
                v = x[i] + fx[i]
                y[i] = zero if v < zero else v
        else:
            for i in range(n):
                y[i] = x[i] + fx[i]
    elif relu:
        for i in range(n):
            v = x[i] + alpha * fx[i]
            y[i] = zero if v < zero else v
    else:
        for i in range(n):
            y[i] = x[i] + alpha * fx[i]


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _dot(g, fx):
    """sum(g * fx), accumulated in float64 so a float32 sum over millions of terms stays
    within the float32 tolerance."""
    s = 0.0
    for i in range(g.shape[0]):
        s += g[i] * fx[i]
    return s


@njit(cache=True, nogil=True)
def residual_backward(gy, y, fx, alpha, relu, want_galpha, gx, gfx):
    """One pass: g = gy * (y > 0) if relu else gy; gx = g; gfx = alpha * g; returns
    sum(g * fx) (galpha, float64) when want_galpha, else 0. All arrays flat."""
    zero, one = gy.dtype.type(0), gy.dtype.type(1)
    n = gy.shape[0]
    if relu:
        for i in range(n):
            gx[i] = gy[i] if y[i] > zero else zero
    else:
        for i in range(n):
            gx[i] = gy[i]
    if alpha == one:
        for i in range(n):
            gfx[i] = gx[i]
    else:
        for i in range(n):
            gfx[i] = alpha * gx[i]
    return _dot(gx, fx) if want_galpha else 0.0


@njit(cache=True, parallel=True)
def chunked(op, a, b, c, d, e, alpha, relu, want, parts, chunks):
    """Run one elementwise kernel over `chunks` contiguous ranges in parallel: op 0
    relu_forward(a, b), 1 relu_backward(a, b, c), 2 residual_forward(a, b, alpha, relu, c),
    3 residual_backward(a, b, c, alpha, relu, want, d, e) with chunk k's galpha share in
    parts[k]. Unused array slots take any array of the dtype. One driver for all four keeps
    the compile time down (a parallel function compiles slowly).
    """
    n = a.shape[0]
    for k in prange(chunks):
        lo, hi = k * n // chunks, (k + 1) * n // chunks
        if op == 0:
            relu_forward(a[lo:hi], b[lo:hi])
        elif op == 1:
            relu_backward(a[lo:hi], b[lo:hi], c[lo:hi])
        elif op == 2:
            residual_forward(a[lo:hi], b[lo:hi], alpha, relu, c[lo:hi])
        else:
            parts[k] = residual_backward(a[lo:hi], b[lo:hi], c[lo:hi], alpha, relu, want,
                                         d[lo:hi], e[lo:hi])


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
