"""Numba @njit kernels for ReLU, the fused residual add and max pooling (kernels/cpu.py wraps).

Imports numpy and numba only. Elementwise kernels take flat contiguous arrays and split them
into `chunks` contiguous ranges, one per thread (chunks = 1 for small arrays: no thread launch
cost worth paying).
"""
from numba import njit, prange

_REDUCE = {"contract", "reassoc", "nsz"}  # galpha is a sum: reassociation lets it vectorise


@njit(cache=True, parallel=True)
def relu_forward(x, y, chunks):
    """y = max(x, 0) (NaN kept, as numpy.maximum), x and y flat."""
    n = x.shape[0]
    zero = x.dtype.type(0)
    for k in prange(chunks):
        lo, hi = k * n // chunks, (k + 1) * n // chunks
        xs, ys = x[lo:hi], y[lo:hi]
        for i in range(hi - lo):
            v = xs[i]
            ys[i] = zero if v < zero else v


@njit(cache=True, parallel=True)
def relu_backward(gy, y, gx, chunks):
    """gx = gy where y > 0, else 0; all flat."""
    n = gy.shape[0]
    zero = gy.dtype.type(0)
    for k in prange(chunks):
        lo, hi = k * n // chunks, (k + 1) * n // chunks
        gs, ys, out = gy[lo:hi], y[lo:hi], gx[lo:hi]
        for i in range(hi - lo):
            out[i] = gs[i] if ys[i] > zero else zero


@njit(cache=True, parallel=True)
def residual_forward(x, fx, alpha, relu, y, chunks):
    """y = act(x + alpha * fx), act ReLU if relu; alpha a scalar (1 when the op has none)."""
    n = x.shape[0]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    for k in prange(chunks):
        lo, hi = k * n // chunks, (k + 1) * n // chunks
        xs, fs, ys = x[lo:hi], fx[lo:hi], y[lo:hi]
        if alpha == one:  # exact x + fx, no rounding from a multiply by 1
            if relu:
                for i in range(hi - lo):
                    v = xs[i] + fs[i]
                    ys[i] = zero if v < zero else v
            else:
                for i in range(hi - lo):
                    ys[i] = xs[i] + fs[i]
        elif relu:
            for i in range(hi - lo):
                v = xs[i] + alpha * fs[i]
                ys[i] = zero if v < zero else v
        else:
            for i in range(hi - lo):
                ys[i] = xs[i] + alpha * fs[i]


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _masked_dot(g, fx):
    """sum(g * fx), accumulated in float64 so a float32 sum over millions of terms stays exact
    to the float32 tolerance."""
    s = 0.0
    for i in range(g.shape[0]):
        s += g[i] * fx[i]
    return s


@njit(cache=True, parallel=True)
def residual_backward(gy, y, fx, alpha, relu, want_galpha, gx, gfx, parts, chunks):
    """One pass: g = gy * (y > 0) if relu else gy; gx = g; gfx = alpha * g; parts[k] = the
    chunk's sum(g * fx) (galpha) when want_galpha. All arrays flat; parts float64 (chunks,)."""
    n = gy.shape[0]
    zero = gy.dtype.type(0)
    one = gy.dtype.type(1)
    for k in prange(chunks):
        lo, hi = k * n // chunks, (k + 1) * n // chunks
        gs, a, b = gy[lo:hi], gx[lo:hi], gfx[lo:hi]
        if relu:
            ys = y[lo:hi]
            for i in range(hi - lo):
                a[i] = gs[i] if ys[i] > zero else zero
        else:
            a[:] = gs
        if alpha == one:
            b[:] = a
        else:
            for i in range(hi - lo):
                b[i] = alpha * a[i]
        parts[k] = _masked_dot(a, fx[lo:hi]) if want_galpha else 0.0


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


@njit(cache=True, parallel=True)
def max_pool_forward(x, planes, height, width, kh, kw, sh, sw, y, argmax, chunks):
    """y = max of x's (kh, kw) window at (i*sh, j*sw) of each plane; argmax the tap index
    a*kw + b of its first maximum (later equal values do not replace it, NaN never wins).

    x, y, argmax flat: `planes` planes of (height, width) and (OH, OW).
    """
    oh, ow = (height - kh) // sh + 1, (width - kw) // sw + 1
    for k in prange(chunks):
        for pl in range(k * planes // chunks, (k + 1) * planes // chunks):
            _pool_plane(x, pl * height * width, width, oh, ow, kh, kw, sh, sw, y, argmax,
                        pl * oh * ow)


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


@njit(cache=True, parallel=True)
def max_pool_backward(gy, argmax, planes, oh, ow, kw, sh, sw, gx, chunks):
    """gx = 0, then each window's gy added at its argmax tap (overlapping windows add up).

    gy, argmax flat (`planes` planes of (oh, ow)); gx (planes, H, W).
    """
    width = gx.shape[2]
    for k in prange(chunks):
        for pl in range(k * planes // chunks, (k + 1) * planes // chunks):
            _unpool_plane(gy, argmax, pl * oh * ow, oh, ow, kw, sh, sw, width,
                          gx[pl].reshape(-1))
