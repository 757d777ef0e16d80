"""CPU ReLU and fused residual add: @njit loops over flat contiguous arrays, one parallel driver
that splits any of them over threads, and the public wrappers.

Small arrays run on the calling thread: a parallel launch costs more than the split saves
below a few hundred thousand elements read and written (_SPLIT_MIN).
"""
import numpy as np
from numba import njit, prange

from .memory import launch, outputs, threads

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
def residual_forward_loop(x, fx, alpha, relu, y):
    """y = act(x + alpha * fx), act ReLU if relu; alpha is 1 when the op has none (1 * fx is
    exactly fx, so the sum is exactly x + fx). All flat."""
    zero = x.dtype.type(0)
    if relu:
        for i in range(x.shape[0]):
            v = x[i] + alpha * fx[i]
            y[i] = zero if v < zero else v
    else:
        for i in range(x.shape[0]):
            y[i] = x[i] + alpha * fx[i]


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def residual_backward_loop(gy, y, fx, alpha, relu, want, gx, gfx):
    """ONE pass over the arrays: g = gy where y > 0 if relu (else gy), gx = g, gfx = alpha * g,
    and, when want, the sum of g * fx (galpha) accumulated in float64, returned (else 0).
    y is read only when relu, fx only when want. All flat. One loop per (relu, want), so
    that no loop tests a flag per element."""
    zero = gy.dtype.type(0)
    s = 0.0
    if relu and want:
        for i in range(gy.shape[0]):
            g = gy[i] if y[i] > zero else zero
            gx[i] = g
            gfx[i] = alpha * g
            s += g * fx[i]
    elif relu:
        for i in range(gy.shape[0]):
            g = gy[i] if y[i] > zero else zero
            gx[i] = g
            gfx[i] = alpha * g
    elif want:
        for i in range(gy.shape[0]):
            g = gy[i]
            gx[i] = g
            gfx[i] = alpha * g
            s += g * fx[i]
    else:
        for i in range(gy.shape[0]):
            g = gy[i]
            gx[i] = g
            gfx[i] = alpha * g
    return s


# The loops `split` runs, by name. An unknown code is refused by _split before any launch;
# the driver has no else branch, so it could not compute something else instead.
RELU_FORWARD, RELU_BACKWARD, RESIDUAL_FORWARD, RESIDUAL_BACKWARD = 0, 1, 2, 3
OPERATIONS = {RELU_FORWARD: "relu_forward", RELU_BACKWARD: "relu_backward",
              RESIDUAL_FORWARD: "residual_forward", RESIDUAL_BACKWARD: "residual_backward"}


@njit(cache=True, parallel=True)
def split(op, a, b, c, d, e, alpha, relu, want, parts, chunks):
    """Run one loop over `chunks` contiguous ranges in parallel: RELU_FORWARD
    relu_forward_loop(a, b), RELU_BACKWARD relu_backward_loop(a, b, c), RESIDUAL_FORWARD
    residual_forward_loop(a, b, alpha, relu, c), RESIDUAL_BACKWARD residual_backward_loop(a,
    b, c, alpha, relu, want, d, e) with chunk k's galpha share in parts[k]. Unused array slots
    take any array of the dtype. One driver for all four keeps the compile time down (a
    parallel function compiles slowly).
    """
    n = a.shape[0]
    for k in prange(chunks):
        lo, hi = k * n // chunks, (k + 1) * n // chunks
        if op == RELU_FORWARD:
            relu_forward_loop(a[lo:hi], b[lo:hi])
        elif op == RELU_BACKWARD:
            relu_backward_loop(a[lo:hi], b[lo:hi], c[lo:hi])
        elif op == RESIDUAL_FORWARD:
            residual_forward_loop(a[lo:hi], b[lo:hi], alpha, relu, c[lo:hi])
        elif op == RESIDUAL_BACKWARD:
            parts[k] = residual_backward_loop(a[lo:hi], b[lo:hi], c[lo:hi], alpha, relu, want,
                                              d[lo:hi], e[lo:hi])


# --- the public kernels -----------------------------------------------------------------
# Arrays with fewer elements than _SPLIT_MIN / (arrays the loop reads and writes) run on the
# calling thread: a Numba parallel launch costs ~4-5 us (measured on 2 cores; docs/kernels.md),
# more than splitting saves below that size (ReLU forward: 131k elements, backward: 87k).
_SPLIT_MIN = 1 << 18


def _threaded(n, arrays):
    """How many chunks a loop over n elements of `arrays` arrays is split into (1: the calling
    thread)."""
    return 1 if n * arrays < _SPLIT_MIN else threads()


_PARTS = np.zeros(1)  # the parts argument of the operations that do not sum (never written)


def _split(op, arrays, chunks, alpha, relu=False, want=False):
    """Run operation `op` through `split` in `chunks` chunks; returns the galpha sum of
    RESIDUAL_BACKWARD (else 0). alpha: a scalar of the arrays' dtype (one compiled driver)."""
    if op not in OPERATIONS:
        raise ValueError(f"kernels.cpu.elementwise: unknown operation {op!r}; known: "
                         f"{OPERATIONS}")
    parts = np.empty(chunks) if op == RESIDUAL_BACKWARD else _PARTS
    launch(split, op, *arrays, *(arrays[0],) * (5 - len(arrays)), alpha, relu, want, parts,
           chunks)
    return sum(parts.tolist()) if op == RESIDUAL_BACKWARD else 0.0  # in chunk order


def _flat(a):
    """a as a flat C-contiguous array: a view when it is contiguous, else a copy."""
    return a.reshape(-1)


def relu_forward(x):
    """max(x, 0), a new array of x's shape and dtype."""
    y = outputs.empty(x.shape, x.dtype)
    a, b = _flat(x), y.reshape(-1)
    chunks = _threaded(a.shape[0], 2)
    if chunks == 1:
        relu_forward_loop(a, b)
    else:
        _split(RELU_FORWARD, (a, b), chunks, x.dtype.type(1))
    return y


def relu_backward(gy, y):
    """gy where the forward output y > 0, else 0 (a new array)."""
    gx = outputs.empty(gy.shape, gy.dtype)
    a, b, c = _flat(gy), _flat(y), gx.reshape(-1)
    chunks = _threaded(a.shape[0], 3)
    if chunks == 1:
        relu_backward_loop(a, b, c)
    else:
        _split(RELU_BACKWARD, (a, b, c), chunks, gy.dtype.type(1))
    return gx


def _scalar(alpha, dtype):
    return dtype.type(1) if alpha is None else dtype.type(alpha.reshape(-1)[0])


def residual_add_forward(x, fx, alpha, relu):
    """act(x + alpha * fx) in one pass; alpha None or a one-element array."""
    y = outputs.empty(x.shape, x.dtype)
    a, b, c = _flat(x), _flat(fx), y.reshape(-1)
    al, chunks = _scalar(alpha, x.dtype), _threaded(a.shape[0], 3)
    if chunks == 1:
        residual_forward_loop(a, b, al, relu, c)
    else:
        _split(RESIDUAL_FORWARD, (a, b, c), chunks, al, relu)
    return y


def residual_add_backward(gy, y, fx, alpha, relu):
    """(gx, gfx, galpha) of act(x + alpha * fx) in one pass; galpha None when alpha is None.

    y is read only when relu, fx only when alpha is given; gx and gfx are new arrays.
    """
    want = alpha is not None
    gx, gfx = outputs.empty(gy.shape, gy.dtype), outputs.empty(gy.shape, gy.dtype)
    g = _flat(gy)
    arrays = (g, _flat(y) if relu else g, _flat(fx) if want else g, gx.reshape(-1),
              gfx.reshape(-1))
    al, chunks = _scalar(alpha, gy.dtype), _threaded(g.shape[0], 3 + relu + want)
    if chunks == 1:
        galpha = residual_backward_loop(*arrays[:3], al, relu, want, *arrays[3:])
    else:
        galpha = _split(RESIDUAL_BACKWARD, arrays, chunks, al, relu, want)
    if not want:
        return gx, gfx, None
    return gx, gfx, np.asarray(galpha, dtype=alpha.dtype).reshape(alpha.shape)
