"""CPU convolution: the public conv2d kernels (optionally fused with a ReLU), their layouts
(planned once per shape), the packed weights and the scratch that the @njit loops of
kernels/cpu/conv_loops.py need.

Shapes: x (N, C, H, W), w (O, C, KH, KW), b (O,) or None, y / gy (N, O, OH, OW); stride and
padding (int, int) pairs. Inputs may be non-contiguous; they are read, never modified.

Forward and weight gradient correlate the packed input with the kernel taps directly (a 1x1
kernel with stride s first takes every s-th row and column, so nothing unread is packed). The
input gradient of a stride-s convolution is s*s stride-1 correlations of gy, one per output
phase (a, b) (rows h + ph = s*u + a): phase (a, b) uses only the taps (s*k + a, s*l + b), so
no multiply is spent on the zeros that dilating gy by the stride would insert. Padding wider
than KH - 1 / KW - 1 (rare) is applied explicitly first. With relu=True the forward writes
max(y, 0), and given that y the backward kernels zero gy where y <= 0 as they read it.

Work is split into (block of images, chunk of output channels) items, blocks chosen so the
threads get equal image counts; kernels/cpu/conv_threads.py runs the shares.
"""
import collections
import functools

import numpy as np

from . import conv_loops as cc
from .conv_simd import COLS, ROWS, VBYTES
from .conv_threads import team
from .memory import borrowed, outputs, threads

_GRID_TARGET = 1536  # stack small images until a block's grid is about this long
# The weight gradient sums image blocks in this many groups (fewer when there are fewer
# blocks), whatever the thread count: its result does not depend on the threads.
_GROUPS = 8
# geo: the packed layout (conv_loops.Geo); jobs (J,) conv_loops.JOB; cols (J, K) buffer
# positions per (channel, tap) of each job; taps (J, T): each job's taps as flat indices into
# the KH*KW kernel, ntaps (J,) how many; bits (1 + J, img / lanes): which lanes of each vector
# of an image slot hold a pixel (row 0, for packing) or an output of job j (row 1 + j)
Plan = collections.namedtuple("Plan", "geo jobs cols taps ntaps bits chunks threads")


def _blocks(nimg, per_block, nout_blocks, nthreads):
    """(images per block, output-channel chunks): at most per_block images per block (at
    least half that), chosen so that 1, 2 or 4 threads get equal image counts (the same
    blocks whatever the thread count: the weight gradient's sums do not depend on it), and
    output-channel blocks split into chunks when there are too few image blocks to keep
    `nthreads` threads busy."""
    def cost(nb):  # images on the busiest of 4 threads, then the most blocks (smaller: better)
        blocks = -(-nimg // nb)
        loads = [min(nimg, (t + 1) * blocks // 4 * nb) - min(nimg, t * blocks // 4 * nb)
                 for t in range(4)]
        return max(loads), -nb
    top = max(1, min(per_block, nimg))
    nb = min(range(max(1, top // 2), top + 1), key=cost)
    blocks = -(-nimg // nb)
    if blocks >= 2 * nthreads:
        return nb, 1
    return nb, max(1, min(nout_blocks, -(-2 * nthreads // blocks)))


def _round(n, unit):
    return -(-n // unit) * unit


def _layout(x_shape, pads, strides, grids, nout, itemsize, nthreads):
    """(Geo without size/length, chunks) for packing x_shape (N, C, H, W) with pads (top,
    left, bottom, right) split into stride phases, for jobs emitting grids [(oh, ow), ...].

    Stride 1 packs compactly when the bottom/right padding can double as the next image's/
    row's top/left padding and the output rows fit the shorter row pitch.
    """
    n, _, h, w = x_shape
    top, left, bottom, right = pads
    psh, psw = strides
    hp, wp = h + top + bottom, w + left + right
    wq = -(-wp // psw)
    compact = (psh == psw == 1 and bottom >= top and right >= left
               and all(ow <= wp - left for _, ow in grids))
    if compact:
        wq = wp - left
        img = (hp - top) * wq
    else:
        img = -(-hp // psh) * wq
    nb, chunks = _blocks(n, _GRID_TARGET // img, -(-nout // ROWS), nthreads)
    lanes = VBYTES // itemsize
    # AVX-512 and rows shorter than a vector: whole image slots move a vector at a time
    # (expand/compress by lane bits) instead of row by row
    planes = VBYTES == 64 and img % lanes == 0 and wq < lanes
    geo = cc.Geo(top=top, left=left, psh=psh, psw=psw, hp=hp, wp=wp, wq=wq, img=img,
                 plane=0 if compact else nb * img, nb=nb, size=0, length=0,
                 strip=COLS * lanes, lanes=lanes, vec_pack=int(planes and compact),
                 vec_grid=int(planes))
    return geo, chunks


def _finish(geo, grids, offsets, nchannels, nthreads, chunks, taps, kw, pixels):
    """The Plan: geo sized for every read and write, jobs, and each job's column positions."""
    length = max(_round((geo.nb - 1) * geo.img + oh * geo.wq, geo.strip) for oh, _ in grids)
    if geo.vec_grid:  # whole slots are read and written
        length = max(length, _round(geo.nb * geo.img, geo.strip))
    written = (geo.psh * geo.psw * geo.plane if geo.plane else
               geo.nb * geo.img + geo.top * geo.wq)
    read = max((max(o, default=0) for o in offsets), default=0) + length
    geo = geo._replace(size=_round(max(written, read), 16), length=length)
    k = max(nchannels * len(o) for o in offsets)
    cols = np.zeros((len(offsets), max(k, 1)), np.int64)
    for j, offs in enumerate(offsets):  # column c*T + t of job j reads channel c, tap t
        cols[j, :nchannels * len(offs)] = (np.arange(nchannels)[:, None] * geo.size
                                          + np.asarray(offs, np.int64)[None, :]).ravel()
    tap_index = np.zeros((len(taps), max([len(t) for t in taps] + [1])), np.int64)
    for j, tj in enumerate(taps):  # (row, column) -> flat index into a KH*KW kernel
        tap_index[j, :len(tj)] = [i * kw + jj for i, jj in tj]
    ntaps = np.array([len(t) for t in taps], np.int64)
    rows, cols_ = np.divmod(np.arange(geo.img), geo.wq)  # an image slot's grid positions
    bits = np.zeros((1 + len(grids), max(1, geo.img // geo.lanes)), np.int64)
    if geo.vec_grid:
        height, width = pixels
        valid = [(rows >= geo.top) & (rows < geo.top + height) & (cols_ >= geo.left)
                 & (cols_ < geo.left + width)] + [(rows < oh) & (cols_ < ow) for oh, ow in grids]
        weights = 1 << np.arange(geo.lanes, dtype=np.int64)
        for j, v in enumerate(valid):
            bits[j] = (v.reshape(-1, geo.lanes) * weights).sum(axis=1)
    for a in (tap_index, ntaps, bits):
        a.flags.writeable = False
    return Plan(geo, None, cols, tap_index, ntaps, bits, chunks, nthreads)


def _jobs(rows):
    """A JOB record array from tuples (ncols, oh, ow, r0, rs, c0, cs)."""
    jobs = np.array(rows, dtype=cc.JOB)
    jobs.flags.writeable = False  # shared by every call with this plan
    return jobs


def _out_size(x_shape, kh, kw, stride, padding):
    """(OH, OW), after checking what the unchecked loops rely on (the dispatch's checks
    come first; this guards direct calls of kernels.cpu, as the tests make)."""
    (sh, sw), (ph, pw) = stride, padding
    oh = (x_shape[2] + 2 * ph - kh) // sh + 1
    ow = (x_shape[3] + 2 * pw - kw) // sw + 1
    if min(stride) < 1 or min(padding) < 0 or min(oh, ow, kh, kw) < 1 or len(x_shape) != 4:
        raise ValueError(f"conv2d: x {tuple(x_shape)}, kernel ({kh}, {kw}), stride {stride} "
                         f"and padding {padding} give no output")
    return oh, ow


@functools.lru_cache(maxsize=256)
def forward_plan(x_shape, nout, kh, kw, stride, padding, itemsize, nthreads):
    """Plan for correlating x (x_shape) with an (nout, C, kh, kw) kernel: x padded and split
    into stride phases; one job, taps in (i, j) order."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, w = x_shape
    oh, ow = _out_size(x_shape, kh, kw, stride, padding)
    geo, chunks = _layout(x_shape, (ph, pw, ph, pw), stride, [(oh, ow)], nout, itemsize,
                          nthreads)
    plane = geo.plane
    offs = [((i % sh) * sw + j % sw) * plane + (i // sh) * geo.wq + j // sw
            for i in range(kh) for j in range(kw)]
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    plan = _finish(geo, [(oh, ow)], [offs], c, nthreads, chunks, (tuple(taps),), kw, (h, w))
    return plan._replace(jobs=_jobs([(c * kh * kw, oh, ow, 0, 1, 0, 1)]))


def _phases(size, k, s, p, out):
    """Per phase a of one axis of the input gradient: (a, taps, u0, u1), where input
    rows s*u + a - p, u0 <= u <= u1, get taps s*i + a, i < taps, from gy rows u - i."""
    phases = []
    for a in range(s):
        u0, u1 = -((a - p) // s), (p + size - 1 - a) // s
        if u1 >= u0:
            phases.append((a, len(range(a, k, s)), u0, u1))
    before = max([t - 1 - u0 for _, t, u0, _ in phases if t] + [0])  # gy padding needed
    after = max([u1 - (out - 1) for _, t, _, u1 in phases if t] + [0])
    return phases, before, after


@functools.lru_cache(maxsize=256)
def input_plan(x_shape, nout, kh, kw, stride, padding, itemsize, nthreads):
    """Plan for the input gradient: gy (N, nout, OH, OW) packed with the padding the phases
    need; one job per (row phase, column phase)."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, w = x_shape
    oh, ow = _out_size(x_shape, kh, kw, stride, padding)
    rows, top, bottom = _phases(h, kh, sh, ph, oh)
    cols_, left, right = _phases(w, kw, sw, pw, ow)
    grids = [(u1 - u0 + 1, v1 - v0 + 1) for _, _, u0, u1 in rows for _, _, v0, v1 in cols_]
    geo, chunks = _layout((n, nout, oh, ow), (top, left, bottom, right), (1, 1), grids, c,
                          itemsize, nthreads)
    offsets, taps, jobs = [], [], []
    for a, ka, u0, u1 in rows:
        for b, kb, v0, v1 in cols_:
            offsets.append([(u0 - i + top) * geo.wq + (v0 - j + left)
                            for i in range(ka) for j in range(kb)])
            taps.append(tuple((sh * i + a, sw * j + b) for i in range(ka) for j in range(kb)))
            jobs.append((nout * ka * kb, u1 - u0 + 1, v1 - v0 + 1, sh * u0 + a - ph, sh,
                         sw * v0 + b - pw, sw))
    plan = _finish(geo, grids, offsets, nout, nthreads, chunks, tuple(taps), kw, (oh, ow))
    return plan._replace(jobs=_jobs(jobs))


def _pack_weights(w, plan, by_input):
    """wpk (J, OB, K, ROWS) for conv_loops.correlate (see conv_loops.pack_weights)."""
    nrows = w.shape[1] if by_input else w.shape[0]
    wpk = np.empty((len(plan.taps), -(-nrows // ROWS), plan.cols.shape[1], ROWS), w.dtype)
    w = np.ascontiguousarray(w).reshape(w.shape[0], w.shape[1], -1)
    cc.pack_weights(w, plan.taps, plan.ntaps, by_input, wpk)
    return wpk


def _correlate(src, mask, wpk, bias, relu, plan, out_shape):
    """A fresh out (out_shape) from conv_loops.correlate under plan."""
    geo, n = plan.geo, plan.threads
    out = outputs.empty(out_shape, dtype=src.dtype)
    bias_p = np.zeros(wpk.shape[1] * ROWS, src.dtype)
    bias_p[:bias.shape[0]] = bias
    specs = [(("pack", src.shape[1:], geo, n), (n, src.shape[1], geo.size)),
             (("acc", geo.length, n), (n, ROWS, geo.length))]
    with borrowed(specs, src.dtype) as (bufs, accs):
        team.run(cc.correlate, (src, src if mask is None else mask, mask is not None, geo,
                                plan.jobs, plan.cols, plan.bits, wpk, bias_p, relu, out, bufs,
                                accs, plan.chunks, np.zeros(1, np.int64)), n)
    return out


# --- the public kernels -----------------------------------------------------------------
def _wide(kernel, padding):
    """True when padding exceeds KH - 1 or KW - 1: whole output rows then read nothing but
    padding, which the compact layout and the phase plans do not cover, so such rare calls
    pad explicitly and use padding 0."""
    return padding[0] > kernel[0] - 1 or padding[1] > kernel[1] - 1


def _pad(x, padding):
    (ph, pw) = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def _check_gy(gy, x_shape, w_shape, stride, padding):
    """gy's shape is the forward output's (the loops trust it to size their copies)."""
    oh, ow = _out_size(x_shape, w_shape[2], w_shape[3], stride, padding)
    want = (x_shape[0], w_shape[0], oh, ow)
    if tuple(gy.shape) != want or x_shape[1] != w_shape[1]:
        raise ValueError(f"conv2d backward: gy {tuple(gy.shape)}, expected {want} for x "
                         f"{tuple(x_shape)} and w {tuple(w_shape)}")


def _subsampled(x, kernel, stride, padding):
    """(x, stride) as the loops see them: a 1x1 kernel with stride s and no padding reads
    every s-th row and column only, so those are taken first (a copy a quarter of x's size
    for s = 2) and the convolution has stride 1: no unread phase is packed."""
    if tuple(kernel) == (1, 1) and tuple(padding) == (0, 0) and tuple(stride) != (1, 1):
        view = x[:, :, ::stride[0], ::stride[1]]
        sub = outputs.empty(view.shape, view.dtype)
        np.copyto(sub, view)
        return sub, (1, 1)
    return np.ascontiguousarray(x), tuple(stride)


def _mask(y, gy):
    """The ReLU output y as a contiguous array of gy's dtype (None stays None)."""
    if y is None:
        return None
    if y.shape != gy.shape:
        raise ValueError(f"conv2d backward: y has shape {y.shape}, gy {gy.shape}")
    return np.ascontiguousarray(y, dtype=gy.dtype)


def conv2d_forward(x, w, b, stride, padding, relu=False):
    """y (N, O, OH, OW) = act(cross-correlation of x (N, C, H, W) with w (O, C, KH, KW) + b),
    act ReLU when relu, else identity (the ReLU is applied as y is written: no extra pass)."""
    if _wide(w.shape[2:], padding):
        return conv2d_forward(_pad(x, padding), w, b, stride, (0, 0), relu)
    nout, _, kh, kw = w.shape
    if x.shape[1] != w.shape[1] or (b is not None and tuple(b.shape) != (nout,)):
        raise ValueError(f"conv2d: x {x.shape}, w {w.shape} and b "
                         f"{None if b is None else b.shape} do not match")
    _out_size(x.shape, kh, kw, tuple(stride), tuple(padding))
    x, stride = _subsampled(x, (kh, kw), stride, padding)
    p = forward_plan(x.shape, nout, kh, kw, stride, tuple(padding), x.itemsize, threads())
    bias = np.zeros(nout, x.dtype) if b is None else np.asarray(b, x.dtype)
    job = p.jobs[0]
    return _correlate(x, None, _pack_weights(np.asarray(w, x.dtype), p, False), bias, relu, p,
                      (x.shape[0], nout, int(job["oh"]), int(job["ow"])))


def conv2d_backward_input(gy, w, x_shape, stride, padding, y=None):
    """gx (N, C, H, W) = x_shape: one stride-1 correlation of gy with the taps of each output
    phase. y: the forward's ReLU output; gy is then multiplied by (y > 0) as it is packed."""
    (ph, pw) = padding
    if _wide(w.shape[2:], padding):
        n, c, h, wd = x_shape
        gx = conv2d_backward_input(gy, w, (n, c, h + 2 * ph, wd + 2 * pw), stride, (0, 0), y)
        return np.ascontiguousarray(gx[:, :, ph:ph + h, pw:pw + wd])
    gy = np.ascontiguousarray(gy)
    _check_gy(gy, x_shape, w.shape, stride, padding)
    nout, nin, kh, kw = w.shape
    p = input_plan(tuple(x_shape), nout, kh, kw, tuple(stride), tuple(padding), gy.itemsize,
                   threads())
    wpk = _pack_weights(np.asarray(w, gy.dtype), p, True)
    return _correlate(gy, _mask(y, gy), wpk, np.zeros(nin, gy.dtype), False, p, tuple(x_shape))


def conv2d_backward_weight(gy, x, w_shape, stride, padding, bias, y=None):
    """(gw (O, C, KH, KW), gb (O,) or None when not bias): sums over the batch and positions.
    y: the forward's ReLU output; gy is then multiplied by (y > 0) as it is read."""
    if _wide(w_shape[2:], padding):
        return conv2d_backward_weight(gy, _pad(x, padding), w_shape, stride, (0, 0), bias, y)
    gy = np.ascontiguousarray(gy)
    _check_gy(gy, x.shape, w_shape, stride, padding)
    nout, nin, kh, kw = w_shape
    x, stride = _subsampled(x, (kh, kw), stride, padding)
    p = forward_plan(x.shape, nout, kh, kw, stride, tuple(padding), x.itemsize, threads())
    geo, n = p.geo, p.threads
    ncols = nin * kh * kw
    cols = np.zeros(_round(ncols, COLS), np.int64)  # padding columns read position 0
    cols[:ncols] = p.cols[0, :ncols]
    nrows = _round(nout, ROWS)
    groups = min(_GROUPS, -(-x.shape[0] // geo.nb))
    # keys: what determines the positions written (and the thread count: the shape)
    specs = [(("pack", x.shape[1:], geo, n), (n, nin, geo.size)),
             (("gygrid", geo, n), (n, ROWS, geo.length)),
             (("parts", nrows, cols.shape[0], groups), (groups, nrows, cols.shape[0])),
             (("bparts", nrows, groups), (groups, nrows))]
    mask = _mask(y, gy)
    with borrowed(specs, x.dtype) as (bufs, grids, parts, bparts):
        team.run(cc.weight_grad, (gy, gy if mask is None else mask, mask is not None, x, False,
                                  geo, cols, p.bits, parts, bparts, bufs, grids, p.chunks,
                                  np.zeros(1, np.int64)), n)
        gw = parts.sum(axis=0)[:nout, :ncols].reshape(w_shape)
        gb = bparts.sum(axis=0)[:nout]
    return gw, (gb if bias else None)
