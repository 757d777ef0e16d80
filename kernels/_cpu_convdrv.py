"""Convolution drivers for kernels/cpu.py: layouts (cached per shape) and the scratch each
@njit kernel of kernels/_cpu_conv.py needs.

Imports numpy, numba and kernels._cpu_*.
"""
import collections
import functools

import numba
import numpy as np

from . import _cpu_conv as cc
from ._cpu_memory import borrowed, launch, outputs

_GRID_TARGET = 1536  # direct: stack small images until a block's grid is about this long
Plan = collections.namedtuple("Plan", "geo offs size length chunks threads")


def threads():
    """Numba's thread count (passed into every parallel kernel; see kernels/cpu.py)."""
    return numba.get_num_threads()


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
    """Direct layout (see kernels/_cpu_conv.py): geo, tap offsets, the per-channel buffer
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
