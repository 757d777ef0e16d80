"""Numba CPU kernels behind kernels/__init__.py: the same names and semantics as
kernels/reference.py, for float32 and float64 NumPy arrays (inputs may be non-contiguous;
they are read, never modified).

Imports numpy, numba and kernels._cpu_*: the @njit code is in _cpu_conv.py and
_cpu_eltwise.py, conv layouts in _cpu_convdrv.py, memory reuse in _cpu_memory.py.
"""
import os

import numba.np.ufunc.parallel as _numba_parallel
import numpy as np

from . import _cpu_convdrv as cd
from . import _cpu_eltwise as ce
from ._cpu_memory import launch, outputs, scratch  # noqa: F401 (pools, for tests)

__all__ = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
           "relu_forward", "relu_backward", "residual_add_forward", "residual_add_backward",
           "max_pool2d_forward", "max_pool2d_backward"]

# OpenMP workers busy-wait ~1 ms after each parallel kernel by default. When anything else
# wants the cores (another process, OpenBLAS's pool, PyTorch's) that turns a 20 ms training
# step into 30-230 ms on 2 cores (measured, see bench/README.md); sleeping at once costs a few
# microseconds per kernel. So unless the user chose a policy, Numba's OpenMP pool (started on
# the first kernel call, which is also when this module is first imported) waits passively.
def _prefer_passive_openmp():
    """Set OMP_WAIT_POLICY=PASSIVE unless the user set a policy or Numba's pool already runs
    (an unknown Numba internals layout counts as running: then nothing is changed)."""
    started = getattr(_numba_parallel, "_is_initialized", True)
    if not started and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


_prefer_passive_openmp()


def _bias(b, n, dtype):
    return np.zeros(n, dtype) if b is None else np.ascontiguousarray(b)


# --- convolution --------------------------------------------------------------------------
def _wide(kernel, padding):
    """True when padding exceeds KH - 1 or KW - 1: whole output rows then read nothing but
    padding, which the kernels' padded layout does not cover (and backward-input's padding
    K - 1 - P would be negative), so such rare calls pad explicitly and use padding 0."""
    return padding[0] > kernel[0] - 1 or padding[1] > kernel[1] - 1


def _pad(x, padding):
    (ph, pw) = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def conv2d_forward(x, w, b, stride, padding):
    """y (N, O, OH, OW) = cross-correlation of x (N, C, H, W) with w (O, C, KH, KW) + b."""
    if _wide(w.shape[2:], padding):
        return conv2d_forward(_pad(x, padding), w, b, stride, (0, 0))
    x = np.ascontiguousarray(x)
    nout, nin, kh, kw = w.shape
    bias = _bias(b, nout, x.dtype)
    p = cd.forward_plan(x.shape, nout, kh, kw, stride, padding)
    wt = np.ascontiguousarray(w).reshape(nout, nin, kh * kw)
    return cd.correlate(x, wt, bias, p, (x.shape[0], nout, int(p.geo[11]), int(p.geo[12])))


def conv2d_backward_input(gy, w, x_shape, stride, padding):
    """gx (N, C, H, W): gy dilated by the stride, padded by K - 1 - padding, correlated with
    the flipped kernel with in/out channels swapped (a stride-1 convolution)."""
    (sh, sw), (ph, pw) = stride, padding
    if _wide(w.shape[2:], padding):
        n, c, h, wd = x_shape
        gx = conv2d_backward_input(gy, w, (n, c, h + 2 * ph, wd + 2 * pw), stride, (0, 0))
        return np.ascontiguousarray(gx[:, :, ph:ph + h, pw:pw + wd])
    gy = np.ascontiguousarray(gy)
    nout, nin, kh, kw = w.shape
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, O, KH, KW)
    zeros = np.zeros(nin, gy.dtype)
    h, wd = x_shape[2], x_shape[3]
    p = cd.plan(kh, kw, kh - 1 - ph, kw - 1 - pw, sh, sw, 1, 1, h + kh - 1, wd + kw - 1, h, wd,
                gy.shape[0], nin, cd.threads())
    return cd.correlate(gy, flipped.reshape(nin, nout, kh * kw), zeros, p, tuple(x_shape))


def conv2d_backward_weight(gy, x, w_shape, stride, padding, bias):
    """(gw (O, C, KH, KW), gb (O,) or None when not bias): sums over the batch and positions."""
    if _wide(w_shape[2:], padding):
        return conv2d_backward_weight(gy, _pad(x, padding), w_shape, stride, (0, 0), bias)
    gy, x = np.ascontiguousarray(gy), np.ascontiguousarray(x)
    nout, _, kh, kw = w_shape
    p = cd.forward_plan(x.shape, nout, kh, kw, stride, padding)
    gw, gb = cd.weight_grad(gy, x, tuple(w_shape), p)
    return gw, (gb if bias else None)


# --- elementwise --------------------------------------------------------------------------
_SPLIT_MIN = 1 << 19  # elements: smaller arrays run on the calling thread (no launch cost)


def _flat(a):
    return np.ascontiguousarray(a).reshape(-1)


def _elementwise(op, serial, arrays, alpha=None, relu=False, want=False):
    """Run `serial()` on the calling thread, or split the same kernel over threads through
    ce.chunked(op, ...) for big arrays; returns what op 3 returns (the galpha sum)."""
    n = arrays[0].shape[0]
    chunks = cd.threads() if n >= _SPLIT_MIN else 1
    if chunks == 1:
        return serial()
    slots = (arrays + (arrays[0],) * 5)[:5]
    alpha = arrays[0].dtype.type(1) if alpha is None else alpha  # one signature for all ops
    parts = np.zeros(chunks)
    launch(ce.chunked, op, *slots, alpha, relu, want, parts, chunks)
    return parts.sum()


def relu_forward(x):
    """max(x, 0), a new array of x's shape and dtype."""
    y = outputs.empty(x.shape, dtype=x.dtype)
    a, b = _flat(x), y.reshape(-1)
    _elementwise(0, lambda: ce.relu_forward(a, b), (a, b))
    return y


def relu_backward(gy, y):
    """gy where the forward output y > 0, else 0 (a new array)."""
    gx = outputs.empty(gy.shape, dtype=gy.dtype)
    a, b, c = _flat(gy), _flat(y), gx.reshape(-1)
    _elementwise(1, lambda: ce.relu_backward(a, b, c), (a, b, c))
    return gx


def _alpha_value(alpha, dtype):
    return dtype.type(1) if alpha is None else dtype.type(np.asarray(alpha).reshape(()))


def residual_add_forward(x, fx, alpha, relu):
    """act(x + alpha * fx) in one pass; alpha None or a one-element array."""
    y = outputs.empty(x.shape, dtype=x.dtype)
    a, b, c = _flat(x), _flat(fx), y.reshape(-1)
    al, relu = _alpha_value(alpha, x.dtype), bool(relu)
    _elementwise(2, lambda: ce.residual_forward(a, b, al, relu, c), (a, b, c), al, relu)
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
    galpha = _elementwise(3, lambda: ce.residual_backward(*arrays[:3], al, relu, want,
                                                          *arrays[3:]), arrays, al, relu, want)
    if not want:
        return gx, gfx, None
    return gx, gfx, np.asarray(galpha, dtype=alpha.dtype).reshape(alpha.shape)


# --- max pooling --------------------------------------------------------------------------
_POOL_PARALLEL_MIN = 1 << 18  # input elements: below, one thread (no launch cost)


def max_pool2d_forward(x, kernel, stride):
    """(y (N, C, OH, OW), argmax int32 tap index i * KW + j of each window's first maximum)."""
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    out = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
    y, argmax = outputs.empty(out, dtype=x.dtype), outputs.empty(out, dtype=np.int32)
    args = (h, w, kh, kw, sh, sw, y.reshape(-1), argmax.reshape(-1))
    if x.size < _POOL_PARALLEL_MIN:
        ce.pool_planes(_flat(x), 0, n * c, *args)
    else:
        launch(ce.max_pool_forward, _flat(x), n * c, *args, cd.threads())
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape, kernel, stride):
    """gx (N, C, H, W): each window's gy added at its argmax (zero elsewhere)."""
    n, c, oh, ow = gy.shape
    gx = outputs.empty(x_shape, dtype=gy.dtype)
    args = (oh, ow, kernel[1], stride[0], stride[1], gx.reshape(n * c, *x_shape[2:]))
    flat_gy, flat_am = _flat(gy), _flat(argmax.astype(np.int32, copy=False))
    if gx.size < _POOL_PARALLEL_MIN:
        ce.unpool_planes(flat_gy, flat_am, 0, n * c, *args)
    else:
        launch(ce.max_pool_backward, flat_gy, flat_am, n * c, *args, cd.threads())
    return gx
