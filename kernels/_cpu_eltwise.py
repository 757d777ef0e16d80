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


@njit(cache=True, parallel=True)
def max_pool_forward(x, kh, kw, sh, sw, y, argmax, chunks):
    """y[n, c, i, j] = max of x's (kh, kw) window at (i*sh, j*sw); argmax the tap index
    a*kw + b of its first maximum (later equal values do not replace it, NaN never wins)."""
    nimg, nch = x.shape[0], x.shape[1]
    planes = nimg * nch
    for k in prange(chunks):
        for pl in range(k * planes // chunks, (k + 1) * planes // chunks):
            xs, ys, am = x[pl // nch, pl % nch], y[pl // nch, pl % nch], argmax[pl // nch,
                                                                                   pl % nch]
            for i in range(ys.shape[0]):
                for j in range(ys.shape[1]):
                    best = xs[i * sh, j * sw]
                    where = 0
                    for a in range(kh):
                        row = xs[i * sh + a]
                        for b in range(kw):
                            v = row[j * sw + b]
                            if v > best:
                                best = v
                                where = a * kw + b
                    ys[i, j] = best
                    am[i, j] = where


@njit(cache=True, parallel=True)
def max_pool_backward(gy, argmax, kw, sh, sw, gx, chunks):
    """gx = 0, then each window's gy added at its argmax tap (overlapping windows add up)."""
    nimg, nch = gy.shape[0], gy.shape[1]
    planes = nimg * nch
    zero = gy.dtype.type(0)
    for k in prange(chunks):
        for pl in range(k * planes // chunks, (k + 1) * planes // chunks):
            n, c = pl // nch, pl % nch
            gs, am, out = gy[n, c], argmax[n, c], gx[n, c]
            out[:] = zero
            for i in range(gs.shape[0]):
                for j in range(gs.shape[1]):
                    a = am[i, j]
                    out[i * sh + a // kw, j * sw + a % kw] += gs[i, j]
