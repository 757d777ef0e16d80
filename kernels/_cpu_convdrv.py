"""Convolution drivers for kernels/cpu.py: layouts (cached per shape), weight transforms and
the scratch each @njit kernel needs; direct loops (any shape) or Winograd (3x3, stride 1).

Imports numpy, numba and kernels._cpu_*.
"""
import collections
import functools

import numba
import numpy as np

from kernels import _cpu_conv as cc
from kernels import _cpu_winograd as cw
from kernels._cpu_memory import borrowed, launch, outputs

_GRID_TARGET = 1536  # direct: stack small images until a block's grid is about this long
_TILE_TARGET = 640  # Winograd: tiles per block (its transforms stay in L2)
# Winograd F(2x2, 3x3) filter transform: U = G w G^T (4x4 per 3x3 kernel)
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
Plan = collections.namedtuple("Plan", "geo offs size length chunks threads")
WinoPlan = collections.namedtuple("WinoPlan", "geo ggeo tiles ntiles chunks threads")


def threads():
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
    size S, the grid scratch length L, output-channel chunks."""
    hq, wq = -(-hp // psh), -(-wp // psw)
    plane = hq * wq
    img = psh * psw * plane
    nb, chunks = _blocks(nimg, _GRID_TARGET // img, nout, threads)
    geo = _frozen(top, left, dh, dw, psh, psw, hq, wq, plane, hp, wp, oh, ow, img, nb)
    offs = _frozen(*[((i % psh) * psw + j % psw) * plane + (i // psh) * wq + j // psw
                     for i in range(kh) for j in range(kw)])
    size = -(-(nb * img + wq + 16) // 16) * 16  # the rounded grid reads up to wq + 15 past
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


# --- Winograd F(2x2, 3x3) -----------------------------------------------------------------
def winograd_ok(nin, kernel, stride, padding):
    """Winograd handles 3x3, stride 1, padding <= 2 (backward-input pads by 2 - padding),
    with at least 4 input channels (below that the transforms cost more than they save)."""
    return tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and max(padding) <= 2 \
        and nin >= 4


@functools.lru_cache(maxsize=256)
def wino_plan(nimg, h, w, ph, pw, nout, threads):
    """th x tw output tiles per image, numbered on a grid th x (tw + 1); geo packs x padded to
    (2th + 2, 2tw + 2) and ggeo packs gy zero-padded to (2th, 2tw + 2), both as parity planes
    in blocks of nb images; ntiles = tiles per block rounded up to 16."""
    oh, ow = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = -(-oh // 2), -(-ow // 2)
    wq = tw + 1
    nb, chunks = _blocks(nimg, _TILE_TARGET // (th * wq), nout, threads)
    plane = (th + 1) * wq
    geo = _frozen(ph, pw, 1, 1, 2, 2, th + 1, wq, plane, 2 * th + 2, 2 * wq, oh, ow, 4 * plane,
                  nb)
    gplane = th * wq
    ggeo = _frozen(0, 0, 1, 1, 2, 2, th, wq, gplane, 2 * th, 2 * wq, oh, ow, 4 * gplane, nb)
    return WinoPlan(geo, ggeo, th * wq, -(-nb * th * wq // 16) * 16, chunks, threads)


def winograd_forward(src, w, bias, padding, out_shape):
    """Fresh y (out_shape) = bias + 3x3 stride-1 correlation of src with w (O, C, 3, 3)."""
    nimg, nin, h, wd = src.shape
    nout, dtype = w.shape[0], src.dtype
    p = wino_plan(nimg, h, wd, padding[0], padding[1], nout, threads())
    u = np.einsum("ik,ockl,jl->ijoc", _G, w, _G).reshape(16, nout, nin).astype(dtype)
    y = outputs.empty(out_shape, dtype=dtype)
    n, geo = p.threads, p.geo
    specs = [(("wpack", src.shape[1:], geo.tobytes(), n), (n, nin, geo[14] * geo[13] + 16)),
             (("wv", nin, p.ntiles, n), (n, 16, nin, p.ntiles)),
             (("wm", p.ntiles, n), (n, 16, 2, p.ntiles)),
             (("wy", p.ntiles, n), (n, 4, p.ntiles))]
    with borrowed(specs, dtype) as arrays:
        launch(cw.forward, src, u, bias, geo, p.tiles, y, *arrays, n, p.chunks)
    return y


def winograd_weight_grad(gy, x, padding):
    """(gw (O, C, 3, 3), gb (O,)) from Winograd-domain sums over tiles, as fresh arrays."""
    nimg, nin, h, wd = x.shape
    nout, dtype = gy.shape[1], x.dtype
    p = wino_plan(nimg, h, wd, padding[0], padding[1], nout, threads())
    n, geo, ggeo = p.threads, p.geo, p.ggeo
    specs = [(("wpack", x.shape[1:], geo.tobytes(), n), (n, nin, geo[14] * geo[13] + 16)),
             (("wgpack", gy.shape[1:], ggeo.tobytes(), n), (n, nout, ggeo[14] * ggeo[13] + 16)),
             (("wv", nin, p.ntiles, n), (n, 16, nin, p.ntiles)),
             (("wg", nout, p.ntiles, n), (n, 16, nout, p.ntiles)),
             (("wparts", nout, nin, n), (n, 16, nout + 1, nin)),
             (("bparts", nout, n), (n, nout))]
    with borrowed(specs, dtype) as arrays:
        launch(cw.weight_sums, gy, x, geo, ggeo, p.tiles, *arrays, n)
        sums = arrays[4][:, :, :nout].sum(axis=0).reshape(4, 4, nout, nin)
        gb = arrays[5].sum(axis=0)
    gw = np.einsum("ik,ijoc,jl->ockl", _G, sums, _G).astype(dtype)
    return gw, gb
