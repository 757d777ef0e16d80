"""CPU convolution: the public conv2d kernels, their layouts (cached per shape) and the
scratch each @njit loop of kernels/cpu/conv_loops.py needs.

Shapes: x (N, C, H, W), w (O, C, KH, KW), b (O,) or None, y / gy (N, O, OH, OW); stride and
padding (int, int) pairs. Inputs may be non-contiguous; they are read, never modified.
"""
import collections
import functools

import numpy as np

from . import conv_loops as cc
from .memory import borrowed, launch, outputs, threads

_GRID_TARGET = 1536  # direct: stack small images until a block's grid is about this long
Plan = collections.namedtuple("Plan", "geo offs size length chunks threads")


def _blocks(nimg, per_block, nout, threads):
    """(images per block, output-channel chunks): about per_block images per block, the
    block count a multiple of `threads` when there are enough images (even split), and
    output channels split into chunks when there are too few blocks to keep threads busy."""
    blocks = -(-nimg // max(1, per_block))
    if blocks >= threads:
        blocks = -(-blocks // threads) * threads
    nb = -(-nimg // blocks)
    blocks = -(-nimg // nb)
    if blocks >= 2 * threads:
        return nb, 1
    return nb, max(1, min(-(-nout // 2), -(-2 * threads // blocks)))


def _frozen(*values):
    a = np.array(values, dtype=np.int64)
    a.flags.writeable = False  # shared by every call with this plan
    return a


@functools.lru_cache(maxsize=256)
def plan(kh, kw, top, left, dh, dw, psh, psw, hp, wp, oh, ow, nimg, nout, threads):
    """Direct layout (see kernels/cpu/conv_loops.py): geo, tap offsets, the per-channel buffer
    size S, the grid scratch length L, output-channel chunks.

    Stride 1 with padding 0..K-1 on both sides packs compactly: a row's right padding is the
    next row's left padding, an image's bottom padding the next image's top padding (rows
    wp - left apart, images hp - top rows apart), so fewer grid positions are wasted.
    """
    hq, wq = -(-hp // psh), -(-wp // psw)
    plane = hq * wq
    img = psh * psw * plane
    if psh == psw == dh == dw == 1 and 0 <= top < kh and 0 <= left < kw:
        # (wider padding would make output rows longer than wq: no compaction then)
        wq = plane = wp - left
        img = (hp - top) * wq
    nb, chunks = _blocks(nimg, _GRID_TARGET // img, nout, threads)
    geo = _frozen(top, left, dh, dw, psh, psw, hq, wq, plane, hp, wp, oh, ow, img, nb)
    offs = _frozen(*[((i % psh) * psw + j % psw) * plane + (i // psh) * wq + j // psw
                     for i in range(kh) for j in range(kw)])
    # reads run past the last image by its bottom padding, a row, the taps and the rounding
    size = -(-(nb * img + (max(top, 0) + 1) * wq + kw + 32) // 16) * 16
    return Plan(geo, offs, size, nb * img + 16, chunks, threads)


def forward_plan(x_shape, nout, kh, kw, stride, padding):
    """Direct plan for correlating x with a (kh, kw) kernel: padded, split into phases."""
    (sh, sw), (ph, pw) = stride, padding
    hp, wp = x_shape[2] + 2 * ph, x_shape[3] + 2 * pw
    return plan(kh, kw, ph, pw, 1, 1, sh, sw, hp, wp, (hp - kh) // sh + 1, (wp - kw) // sw + 1,
                x_shape[0], nout, threads())


def correlate(src, wt, bias, p, out_shape):
    """Direct: fresh y (out_shape) = bias + correlation of src with wt (O, C, T) under p."""
    dtype, n = src.dtype, p.threads
    y = outputs.empty(out_shape, dtype=dtype)
    specs = [(("pack", src.shape[1:], p.geo.tobytes(), p.size, n), (n, src.shape[1], p.size)),
             (("grid", p.length, n), (n, 2, p.length))]
    with borrowed(specs, dtype) as (bufs, accs):
        launch(cc.correlate, src, wt, bias, p.geo, p.offs, y, bufs, accs, n, p.chunks)
    return y


def weight_grad(gy, x, w_shape, p):
    """Direct: (gw (O, C, KH, KW), gb (O,)) as fresh arrays."""
    nout, nin, kh, kw = w_shape
    dtype, n = x.dtype, p.threads
    specs = [(("pack", x.shape[1:], p.geo.tobytes(), p.size, n), (n, nin, p.size)),
             (("gygrid", p.geo.tobytes(), n), (n, 2, p.length)),
             (("parts", nout, nin, kh * kw, n), (n, nout + 1, nin, kh * kw)),
             (("bparts", nout, n), (n, nout))]
    with borrowed(specs, dtype) as arrays:
        launch(cc.weight_grad, gy, x, p.geo, p.offs, *arrays, n, p.chunks)
        return arrays[2][:, :nout].sum(axis=0).reshape(w_shape), arrays[3].sum(axis=0)


# --- the public kernels -----------------------------------------------------------------
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
    p = forward_plan(x.shape, nout, kh, kw, stride, padding)
    wt = np.ascontiguousarray(w).reshape(nout, nin, kh * kw)
    return correlate(x, wt, bias, p, (x.shape[0], nout, int(p.geo[11]), int(p.geo[12])))


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
    p = plan(kh, kw, kh - 1 - ph, kw - 1 - pw, sh, sw, 1, 1, h + kh - 1, wd + kw - 1, h, wd,
                gy.shape[0], nin, threads())
    return correlate(gy, flipped.reshape(nin, nout, kh * kw), zeros, p, tuple(x_shape))


def conv2d_backward_weight(gy, x, w_shape, stride, padding, bias):
    """(gw (O, C, KH, KW), gb (O,) or None when not bias): sums over the batch and positions."""
    if _wide(w_shape[2:], padding):
        return conv2d_backward_weight(gy, _pad(x, padding), w_shape, stride, (0, 0), bias)
    gy, x = np.ascontiguousarray(gy), np.ascontiguousarray(x)
    nout, _, kh, kw = w_shape
    p = forward_plan(x.shape, nout, kh, kw, stride, padding)
    gw, gb = weight_grad(gy, x, tuple(w_shape), p)
    return gw, (gb if bias else None)
