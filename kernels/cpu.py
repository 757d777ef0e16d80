"""Numba CPU kernels behind kernels/__init__.py: the same names and semantics as
kernels/reference.py, for float32 and float64 NumPy arrays.

Imports numpy, numba and kernels._cpu_*. The @njit code lives in kernels/_cpu_conv.py and
kernels/_cpu_eltwise.py; this module computes layouts, owns the reusable scratch buffers and
returns fresh output arrays (the caller keeps them; only internal scratch is reused).
Inputs may be non-contiguous: they are copied to C order first, never modified.
"""
import collections
import functools
import threading

import numba
import numpy as np

from kernels import _cpu_conv as cc
from kernels import _cpu_eltwise as ce
from kernels import _cpu_memory

__all__ = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
           "relu_forward", "relu_backward", "residual_add_forward", "residual_add_backward",
           "max_pool2d_forward", "max_pool2d_backward"]

_PARALLEL_MIN = 1 << 15  # elementwise arrays smaller than this run on one thread
# Numba's workqueue threading layer aborts the process when two Python threads launch
# parallel kernels at once; one lock makes every layer safe (the cores are shared anyway).
_launch_lock = threading.Lock()


def _launch(kernel, *args):
    """Run one parallel @njit kernel under the launch lock."""
    with _launch_lock:
        kernel(*args)


scratch = _cpu_memory.Scratch()  # padded copies, grids, per-thread partial sums
outputs = _cpu_memory.Recycler()  # big output arrays, reused once nobody references them


def _threads():
    return numba.get_num_threads()


def _chunks_for(n):
    return _threads() if n >= _PARALLEL_MIN else 1


# --- convolution layouts ------------------------------------------------------------------
_Plan = collections.namedtuple("_Plan", "geo offs size length chunks threads")
_GRID_TARGET = 3700  # stack small images until a block's grid is about this long


@functools.lru_cache(maxsize=256)
def _plan(kh, kw, top, left, dh, dw, psh, psw, hp, wp, oh, ow, nimg, nout, threads):
    """Layout of the packed buffers (see kernels/_cpu_conv.py): geo, tap offsets, the
    per-channel buffer size S, the grid scratch length L and the output-channel chunks.

    Images are stacked nb to a block so a block's grid is about _GRID_TARGET long, with the
    number of blocks a multiple of `threads` when there are enough of them (even split).
    """
    hq, wq = -(-hp // psh), -(-wp // psw)
    plane = hq * wq
    img = psh * psw * plane
    blocks = -(-nimg // max(1, _GRID_TARGET // img))
    if blocks >= threads:
        blocks = -(-blocks // threads) * threads
    nb = -(-nimg // blocks)
    blocks = -(-nimg // nb)
    chunks = 1 if blocks >= 2 * threads else max(1, min(-(-nout // 2), -(-2 * threads // blocks)))
    geo = np.array([top, left, dh, dw, psh, psw, hq, wq, plane, hp, wp, oh, ow, img, nb],
                   dtype=np.int64)
    offs = np.array([((i % psh) * psw + j % psw) * plane + (i // psh) * wq + j // psw
                     for i in range(kh) for j in range(kw)], dtype=np.int64)
    geo.flags.writeable = offs.flags.writeable = False  # shared by every call with this plan
    size = -(-(nb * img + wq + 16) // 16) * 16  # the rounded grid reads up to wq + 15 past
    return _Plan(geo, offs, size, nb * img + 16, chunks, threads)


def _forward_plan(x_shape, nout, kh, kw, stride, padding):
    """Plan for correlating x with a (kh, kw) kernel: padded, split into stride phases."""
    (sh, sw), (ph, pw) = stride, padding
    hp, wp = x_shape[2] + 2 * ph, x_shape[3] + 2 * pw
    return _plan(kh, kw, ph, pw, 1, 1, sh, sw, hp, wp, (hp - kh) // sh + 1,
                 (wp - kw) // sw + 1, x_shape[0], nout, _threads())


def _correlate(src, wt, bias, plan, out_shape):
    """Run cc.correlate over fresh output (N, O, OH, OW) with pooled per-thread scratch."""
    threads, dtype = plan.threads, src.dtype
    y = outputs.empty(out_shape, dtype=dtype)
    bkey = ("pack", src.shape[1:], plan.geo.tobytes(), plan.size, dtype.str, threads)
    akey = ("grid", plan.length, dtype.str, threads)
    bufs = scratch.borrow(bkey, (threads, src.shape[1], plan.size), dtype)
    accs = scratch.borrow(akey, (threads, 2, plan.length), dtype)
    try:
        _launch(cc.correlate, src, wt, bias, plan.geo, plan.offs, y, bufs, accs, threads,
                plan.chunks)
    finally:
        scratch.give_back(bkey, bufs)
        scratch.give_back(akey, accs)
    return y


def conv2d_forward(x, w, b, stride, padding):
    """y (N, O, OH, OW) = cross-correlation of x (N, C, H, W) with w (O, C, KH, KW) + b."""
    x = np.ascontiguousarray(x)
    nout, _, kh, kw = w.shape
    plan = _forward_plan(x.shape, nout, kh, kw, stride, padding)
    wt = np.ascontiguousarray(w).reshape(nout, w.shape[1], kh * kw)
    bias = np.zeros(nout, x.dtype) if b is None else np.ascontiguousarray(b)
    return _correlate(x, wt, bias, plan, (x.shape[0], nout, plan.geo[11], plan.geo[12]))


def conv2d_backward_input(gy, w, x_shape, stride, padding):
    """gx (N, C, H, W): gy dilated by the stride, padded by K - 1 - padding, correlated with
    the flipped kernel with in/out channels swapped (a stride-1 convolution)."""
    gy = np.ascontiguousarray(gy)
    (sh, sw), (ph, pw) = stride, padding
    nout, nin, kh, kw = w.shape
    h, wd = x_shape[2], x_shape[3]
    plan = _plan(kh, kw, kh - 1 - ph, kw - 1 - pw, sh, sw, 1, 1, h + kh - 1, wd + kw - 1, h, wd,
                 gy.shape[0], nin, _threads())
    wt = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(nin, nout,
                                                                                 kh * kw)
    return _correlate(gy, wt, np.zeros(nin, gy.dtype), plan, tuple(x_shape))


def conv2d_backward_weight(gy, x, w_shape, stride, padding, bias):
    """(gw (O, C, KH, KW), gb (O,) or None when not bias): sums over the batch and positions."""
    gy, x = np.ascontiguousarray(gy), np.ascontiguousarray(x)
    nout, nin, kh, kw = w_shape
    plan = _forward_plan(x.shape, nout, kh, kw, stride, padding)
    threads, dtype = plan.threads, x.dtype
    keys = [("pack", x.shape[1:], plan.geo.tobytes(), plan.size, dtype.str, threads),
            ("gygrid", plan.geo.tobytes(), dtype.str, threads),
            ("parts", nout, nin, kh * kw, dtype.str, threads),
            ("bparts", nout, dtype.str, threads)]
    shapes = [(threads, nin, plan.size), (threads, 2, plan.length),
              (threads, nout + 1, nin, kh * kw), (threads, nout)]
    arrays = [scratch.borrow(k, s, dtype) for k, s in zip(keys, shapes)]
    try:
        _launch(cc.weight_grad, gy, x, plan.geo, plan.offs, *arrays, threads, plan.chunks)
        gw = arrays[2][:, :nout].sum(axis=0).reshape(w_shape)  # fresh arrays
        gb = arrays[3].sum(axis=0) if bias else None
    finally:
        for k, a in zip(keys, arrays):
            scratch.give_back(k, a)
    return gw, gb


# --- elementwise --------------------------------------------------------------------------
def _flat(a):
    return np.ascontiguousarray(a).reshape(-1)


def relu_forward(x):
    """max(x, 0), a new array of x's shape and dtype."""
    y = outputs.empty(x.shape, dtype=x.dtype)
    _launch(ce.relu_forward, _flat(x), y.reshape(-1), _chunks_for(x.size))
    return y


def relu_backward(gy, y):
    """gy where the forward output y > 0, else 0 (a new array)."""
    gx = outputs.empty(gy.shape, dtype=gy.dtype)
    _launch(ce.relu_backward, _flat(gy), _flat(y), gx.reshape(-1), _chunks_for(gy.size))
    return gx


def _alpha_value(alpha, dtype):
    return dtype.type(1) if alpha is None else dtype.type(np.asarray(alpha).reshape(()))


def residual_add_forward(x, fx, alpha, relu):
    """act(x + alpha * fx) in one pass; alpha None or a one-element array."""
    y = outputs.empty(x.shape, dtype=x.dtype)
    _launch(ce.residual_forward, _flat(x), _flat(fx), _alpha_value(alpha, x.dtype),
            bool(relu), y.reshape(-1), _chunks_for(x.size))
    return y


def residual_add_backward(gy, y, fx, alpha, relu):
    """(gx, gfx, galpha) of act(x + alpha * fx) in one pass; galpha None when alpha is None.

    y is read only when relu, fx only when alpha is given.
    """
    dtype, chunks = gy.dtype, _chunks_for(gy.size)
    gx, gfx = outputs.empty(gy.shape, dtype=dtype), outputs.empty(gy.shape, dtype=dtype)
    flat_gy = _flat(gy)
    parts = np.zeros(chunks, dtype=np.float64)
    want = alpha is not None
    _launch(ce.residual_backward, flat_gy, _flat(y) if relu else flat_gy,
            _flat(fx) if want else flat_gy, _alpha_value(alpha, dtype), bool(relu), want,
            gx.reshape(-1), gfx.reshape(-1), parts, chunks)
    galpha = None
    if want:
        galpha = np.asarray(parts.sum(), dtype=alpha.dtype).reshape(alpha.shape)
    return gx, gfx, galpha


# --- max pooling --------------------------------------------------------------------------
def max_pool2d_forward(x, kernel, stride):
    """(y (N, C, OH, OW), argmax int32 tap index i * KW + j of each window's first maximum)."""
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    out = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
    y, argmax = outputs.empty(out, dtype=x.dtype), outputs.empty(out, dtype=np.int32)
    _launch(ce.max_pool_forward, _flat(x), n * c, h, w, kh, kw, sh, sw, y.reshape(-1),
            argmax.reshape(-1), _chunks_for(x.size))
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape, kernel, stride):
    """gx (N, C, H, W): each window's gy added at its argmax (zero elsewhere)."""
    n, c, oh, ow = gy.shape
    gx = outputs.empty(x_shape, dtype=gy.dtype)
    _launch(ce.max_pool_backward, _flat(gy), _flat(argmax.astype(np.int32, copy=False)), n * c,
            oh, ow, kernel[1], stride[0], stride[1], gx.reshape(n * c, *x_shape[2:]),
            _chunks_for(gx.size))
    return gx
