"""CPU ReLU and fused residual add: @njit loops over flat contiguous arrays and their public
wrappers. Small arrays run on the calling thread; `chunked` splits a big one over threads (a
parallel launch costs microseconds, so it pays only for large arrays).
"""
import numpy as np
from numba import njit, prange

from .memory import flat as _flat, launch, outputs, threads

_REDUCE = {"contract", "reassoc", "nsz"}  # galpha is a sum: reassociation lets it vectorise


@njit(cache=True, nogil=True)
def relu_forward_loop(x, y):
    """y = max(x, 0) (NaN kept, as numpy.maximum); x and y flat."""
    zero = x.dtype.type(0)
    for i in range(x.shape[0]):
        v = x[i]
        y[i] = zero if v < zero else v


@njit(cache=True, nogil=True)
def relu_backward_loop(gy, y, gx):
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


# The operations `chunked` runs, by code (Numba compiles one parallel driver for all four).
RELU_FORWARD, RELU_BACKWARD, RESIDUAL_FORWARD, RESIDUAL_BACKWARD = 0, 1, 2, 3
_OPS = (RELU_FORWARD, RELU_BACKWARD, RESIDUAL_FORWARD, RESIDUAL_BACKWARD)


@njit(cache=True, parallel=True)
def chunked(op, a, b, c, d, e, alpha, relu, want, parts, chunks):
    """Run one elementwise kernel over `chunks` contiguous ranges in parallel: RELU_FORWARD
    relu_forward_loop(a, b), RELU_BACKWARD relu_backward_loop(a, b, c), RESIDUAL_FORWARD
    residual_forward(a, b, alpha, relu, c), RESIDUAL_BACKWARD residual_backward(a, b, c, alpha,
    relu, want, d, e) with chunk k's galpha share in parts[k]. Unused array slots take any array of the dtype. One driver for all four keeps
    the compile time down (a parallel function compiles slowly).
    """
    n = a.shape[0]
    for k in prange(chunks):
        lo, hi = k * n // chunks, (k + 1) * n // chunks
        if op == RELU_FORWARD:
            relu_forward_loop(a[lo:hi], b[lo:hi])
        elif op == RELU_BACKWARD:
            relu_backward_loop(a[lo:hi], b[lo:hi], c[lo:hi])
        elif op == RESIDUAL_FORWARD:
            residual_forward(a[lo:hi], b[lo:hi], alpha, relu, c[lo:hi])
        elif op == RESIDUAL_BACKWARD:  # no else: an unknown code is refused by _elementwise
            parts[k] = residual_backward(a[lo:hi], b[lo:hi], c[lo:hi], alpha, relu, want,
                                         d[lo:hi], e[lo:hi])


# --- the public kernels -----------------------------------------------------------------
_SPLIT_MIN = 1 << 19  # elements: smaller arrays run on the calling thread (no launch cost)


def _elementwise(op, serial, arrays, alpha=None, relu=False, want=False):
    """Run `serial()` on the calling thread, or split the same kernel over threads through
    chunked(op, ...) for big arrays; returns what op 3 returns (the galpha sum)."""
    n = arrays[0].shape[0]
    chunks = threads() if n >= _SPLIT_MIN else 1
    if chunks == 1:
        return serial()
    slots = (arrays + (arrays[0],) * 5)[:5]
    alpha = arrays[0].dtype.type(1) if alpha is None else alpha  # one signature for all ops
    parts = np.zeros(chunks)
    launch(chunked, op, *slots, alpha, relu, want, parts, chunks)
    return parts.sum()


def relu_forward(x):
    """max(x, 0), a new array of x's shape and dtype."""
    y = outputs.empty(x.shape, dtype=x.dtype)
    a, b = _flat(x), y.reshape(-1)
    _elementwise(RELU_FORWARD, lambda: relu_forward_loop(a, b), (a, b))
    return y


def relu_backward(gy, y):
    """gy where the forward output y > 0, else 0 (a new array)."""
    gx = outputs.empty(gy.shape, dtype=gy.dtype)
    a, b, c = _flat(gy), _flat(y), gx.reshape(-1)
    _elementwise(RELU_BACKWARD, lambda: relu_backward_loop(a, b, c), (a, b, c))
    return gx


def _alpha_value(alpha, dtype):
    return dtype.type(1) if alpha is None else dtype.type(np.asarray(alpha).reshape(()))


def residual_add_forward(x, fx, alpha, relu):
    """act(x + alpha * fx) in one pass; alpha None or a one-element array."""
    y = outputs.empty(x.shape, dtype=x.dtype)
    a, b, c = _flat(x), _flat(fx), y.reshape(-1)
    al, relu = _alpha_value(alpha, x.dtype), bool(relu)
    _elementwise(RESIDUAL_FORWARD, lambda: residual_forward(a, b, al, relu, c), (a, b, c), al, relu)
    return y


def residual_add_backward(gy, y, fx, alpha, relu):
    """(gx, gfx, galpha) of act(x + alpha * fx) in one pass; galpha None when alpha is None.

    y is read only when relu, fx only when alpha is given.
    """
    dtype, want, relu = gy.dtype, alpha is not None, bool(relu)
    gx, gfx = outputs.empty(gy.shape, dtype=dtype), outputs.empty(gy.shape, dtype=dtype)
    g = _flat(gy)
    arrays = (g, _flat(y) if relu else g, _flat(fx) if want else g, gx.reshape(-1),
              gfx.reshape(-1))
    al = _alpha_value(alpha, dtype)
    galpha = _elementwise(RESIDUAL_BACKWARD, lambda: residual_backward(*arrays[:3], al, relu, want,
                                                          *arrays[3:]), arrays, al, relu, want)
    if not want:
        return gx, gfx, None
    return gx, gfx, np.asarray(galpha, dtype=alpha.dtype).reshape(alpha.shape)
