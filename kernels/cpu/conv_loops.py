"""Numba @njit convolution loops on a flat "grid" layout; kernels/cpu/conv.py plans the layout
and packs the weights, kernels/cpu/conv_threads.py runs a call's shares on several threads.

Imports numba, kernels/cpu/conv_simd.py (register tiles) and kernels/cpu/conv_copy.py
(vector copies). The algorithm, per block of `nb` images (a thread's work item):

1. pack: the block is copied, channel by channel, into a zero-padded buffer (C, size), split
   into stride phases (padded row/column r, q go to phase (r % psh, q % psw) at (r // psh,
   q // psw)), so that for every kernel tap the inputs of all output positions are one
   contiguous run: output (b, u, v) of the block sits at grid position p = b*img + u*wq + v
   and column k = (input channel c, tap t) reads buffer position cols[k] + p.
2. correlate: for ROWS output channels and a strip of COLS vectors of grid positions, a
   register tile starts at the bias and takes one outer product (ROWS broadcast weights x
   COLS input vectors) per column k; it is stored to an accumulator grid once per strip, and
   `emit` copies the output positions to out (N, O, OH, OW), applying ReLU when asked.
3. weight_grad: gy (zero where the ReLU output mask is not > 0, when asked) is copied onto
   the same grid, zero at the positions that are not outputs; a tile of ROWS output channels
   x COLS columns accumulates gy * shifted input lane by lane over the grid, then adds its
   lanes into the thread's partial sums (no atomics; the caller adds the threads' parts).

Layout (Geo, built by kernels/cpu/conv.py; top, left >= 0 and the padded extent hp x wp holds
every pixel): pixel (h, w) goes to padded (r, q) = (top + h, left + w) at buffer position
(r % psh * psw + q % psw) * plane + b*img + (r // psh) * wq + q // psw. With stride 1 the
layout is compact (plane unused): a row's right padding is the next row's left padding and an
image's bottom padding the next image's top padding. Grid positions that are not outputs hold
garbage and are never emitted. Rows are copied a masked vector at a time; on AVX-512, image
slots whose rows are shorter than a vector (7x7) move whole, a vector at a time, the lanes
that hold pixels or outputs given as bits (vec_pack, vec_grid). Jobs (a record array, JOB)
let one call compute several correlations over one packed buffer, the stride phases of the
input gradient: job j emits grid (u < oh, v < ow) to out[..., r0 + u*rs, c0 + v*cs].
"""
import collections

import numpy as np
from numba import njit

from .conv_copy import (compress_vector, copy_vector, expand_vector, mask_vector, relu_vector,
                        split_pair)
from .conv_simd import (COLS, ROWS, claim, tile_dot, tile_fma, tile_splat, tile_store,
                        tile_sum_into)

# The weight gradient's bias sums are reductions, which vectorise only when reassociated.
_REDUCE = {"contract", "reassoc", "nsz"}

Geo = collections.namedtuple(
    "Geo", "top left psh psw hp wp wq img plane nb size length strip lanes vec_pack vec_grid")
JOB = np.dtype([("ncols", np.int64), ("oh", np.int64), ("ow", np.int64), ("r0", np.int64),
                ("rs", np.int64), ("c0", np.int64), ("cs", np.int64)])


@njit(cache=True, nogil=True)
def pack(src, mask, masked, n, buf, b, geo, bits):
    """Copy src[n] (C, H, W) into slot b of buf (C, size), padded and split into phases;
    masked: 0 where mask[n] > 0 fails (gy through the ReLU whose output is mask, as
    kernels.cpu.relu_backward: a masked inf or NaN gives 0).

    Positions never written keep the zeros they were created with.
    """
    nch, height, width = src.shape[1], src.shape[2], src.shape[3]
    vec = geo.lanes
    if geo.vec_pack:  # whole slots, a vector at a time: lanes set in bits[0] take pixels
        for c in range(nch):
            at, si = c * buf.shape[1] + b * geo.img, (n * nch + c) * height * width
            for k in range(bits.shape[1]):
                si += expand_vector(buf, at + k * vec, src, si, bits[0, k], mask, masked)
        return
    for c in range(nch):
        for h in range(height):
            r = geo.top + h
            s0 = ((n * nch + c) * height + h) * width  # src[n, c, h, 0]
            at = (c * buf.shape[1] + (r % geo.psh) * geo.psw * geo.plane + b * geo.img
                  + (r // geo.psh) * geo.wq)  # buf[c] at padded row r, column 0
            if geo.psw == 1 and masked:
                for k in range(0, width, vec):
                    mask_vector(buf, at + geo.left + k, src, s0 + k, width - k, mask)
            elif geo.psw == 1:
                for k in range(0, width, vec):
                    copy_vector(buf, at + geo.left + k, src, s0 + k, width - k)
            elif geo.psw == 2 and not masked:  # even columns to one phase, odd to the other
                even = at + geo.left % 2 * geo.plane + geo.left // 2
                odd = at + (geo.left + 1) % 2 * geo.plane + (geo.left + 1) // 2
                for k in range(0, width, 2 * vec):
                    split_pair(buf, even + k // 2, odd + k // 2, src, s0 + k, width - k)
            else:
                _pack_row(src[n, c, h], mask[n, c, h], masked, buf[c], at - c * buf.shape[1],
                          geo)


@njit(cache=True, nogil=True)
def _pack_row(row, keep, masked, dst, at, geo):
    """pack's general case, element by element: column q = left + w goes to phase q % psw."""
    zero = row.dtype.type(0)
    for w in range(row.shape[0]):
        q = geo.left + w
        v = row[w]
        if masked and not keep[w] > zero:
            v = zero
        dst[at + (q % geo.psw) * geo.plane + q // geo.psw] = v


@njit(cache=True, nogil=True)
def _zero(a, lo, hi):
    """a[lo:hi] = 0 for a flat view a (a plain loop: slice assignment compiles slowly)."""
    for p in range(lo, hi):
        a[p] = 0


@njit(cache=True, nogil=True)
def _clear_slots(buf, cnt, geo):
    """Zero the slots cnt..nb-1 (stale from an earlier, fuller block): the weight gradient
    reads them (times 0, which must not meet an inf or NaN)."""
    phases = 1 if geo.plane == 0 else geo.psh * geo.psw
    for c in range(buf.shape[0]):
        for ph in range(phases):
            lo = ph * geo.plane + cnt * geo.img
            hi = buf.shape[1] if geo.plane == 0 else ph * geo.plane + geo.nb * geo.img
            _zero(buf[c], lo, hi)


@njit(cache=True, nogil=True)
def pack_weights(w, taps, ntaps, by_input, wpk):
    """wpk[j, o // ROWS, c*T + t, o % ROWS] = w[o, c, taps[j, t]] (T = ntaps[j]), zero
    elsewhere: each job's weights, output channels in blocks of ROWS (by_input: the
    correlation's outputs o are w's input channels, w[c, o, .]: the input gradient).

    w (O, C, KH*KW), taps (J, T) flat kernel indices, wpk (J, OB, K, ROWS).
    """
    nrows, nch = (w.shape[1], w.shape[0]) if by_input else (w.shape[0], w.shape[1])
    _zero(wpk.reshape(-1), 0, wpk.size)
    for j in range(taps.shape[0]):
        for o in range(nrows):
            dst = wpk[j, o // ROWS]
            for c in range(nch):
                for t in range(ntaps[j]):
                    k = taps[j, t]
                    dst[c * ntaps[j] + t, o % ROWS] = w[c, o, k] if by_input else w[o, c, k]


@njit(cache=True, nogil=True)
def _grid_length(cnt, oh, geo):
    """Grid positions a block of cnt images needs, rounded up to whole strips (the buffers
    have room for the rounding)."""
    return ((cnt - 1) * geo.img + oh * geo.wq + geo.strip - 1) // geo.strip * geo.strip


@njit(cache=True, nogil=True)
def _emit(acc, rows, out, n0, cnt, o0, job, geo, relu, bits):
    """out[n0 + b, o0 + i, r0 + u*rs, c0 + v*cs] = act(acc[i, b*img + u*wq + v]), i < rows;
    bits: the job's output lanes per vector of a slot (used when geo.vec_grid)."""
    nout, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    zero = out.dtype.type(0)
    if geo.vec_grid and job.rs == 1 and job.cs == 1 and job.oh == oh and job.ow == ow:
        for i in range(rows):  # whole output planes: the set lanes, packed together
            for b in range(cnt):
                d0, a0 = ((n0 + b) * nout + o0 + i) * oh * ow, i * acc.shape[1] + b * geo.img
                for k in range(bits.shape[0]):
                    d0 += compress_vector(out, d0, acc, a0 + k * geo.lanes, bits[k], relu)
        return
    for i in range(rows):
        for b in range(cnt):
            for u in range(job.oh):
                a0 = i * acc.shape[1] + b * geo.img + u * geo.wq
                d0 = (((n0 + b) * nout + o0 + i) * oh + job.r0 + u * job.rs) * ow + job.c0
                if job.cs == 1 and relu:
                    for k in range(0, job.ow, geo.lanes):
                        relu_vector(out, d0 + k, acc, a0 + k, job.ow - k)
                elif job.cs == 1:
                    for k in range(0, job.ow, geo.lanes):
                        copy_vector(out, d0 + k, acc, a0 + k, job.ow - k)
                else:  # a column phase of the input gradient: every cs-th element
                    dst, src = out[n0 + b, o0 + i, job.r0 + u * job.rs], acc[i]
                    a1 = b * geo.img + u * geo.wq
                    for v in range(job.ow):
                        x = src[a1 + v]
                        dst[job.c0 + v * job.cs] = zero if relu and x < zero else x


@njit(cache=True, nogil=True)
def correlate(src, mask, masked, geo, jobs, cols, bits, wpk, bias, relu, out, bufs, accs,
              chunks, counter, share, shares):
    """out[n, o] = act(bias[o] + sum_k wpk[j, o // ROWS, k, o % ROWS] * packed(src[n])[cols[j,
    k] + grid]) for every job j, emitted as the job says: this thread's share of the work.

    src, mask (N, C, H, W) (mask read only when masked); wpk (J, OB, K, ROWS) (output channels
    in blocks of ROWS, zero-padded); cols (J, K) buffer positions; bits (1 + J, img / lanes)
    lane bits of the pixels and of each job's outputs in a slot; bias (OB*ROWS,); out
    (N, O, ., .). bufs (shares, C, size) and accs (shares, ROWS, length) are per-thread
    scratch, bufs[share] and accs[share] this thread's. Work items (block of images, chunk of
    output-channel blocks) are claimed one at a time through counter (int64 (1,), zero at the
    start) by the `shares` threads that kernels/cpu/conv_threads.py runs at once: each output
    is computed by one thread, so the result does not depend on who took what; a thread packs
    a block once per run of its items.
    """
    tasks = -(-src.shape[0] // geo.nb) * chunks
    buf, acc = bufs[share], accs[share]
    nblocks = wpk.shape[1]
    per = -(-nblocks // chunks)
    last = -1
    while True:
        task = claim(counter)
        if task >= tasks:
            break
        blk, chunk = task // chunks, task % chunks
        n0 = blk * geo.nb
        cnt = min(geo.nb, src.shape[0] - n0)
        if blk != last:  # images n0.. into slots 0..
            for b in range(cnt):
                pack(src, mask, masked, n0 + b, buf, b, geo, bits)
            last = blk
        for j in range(jobs.shape[0]):
            job = jobs[j]
            length = _grid_length(cnt, job.oh, geo)
            ks = cols[j]
            for ob in range(chunk * per, min(nblocks, (chunk + 1) * per)):
                ws = wpk[j, ob]
                for p in range(0, length, geo.strip):
                    t = tile_splat(bias, ob * ROWS, ROWS, COLS)
                    for k in range(job.ncols):
                        t = tile_fma(t, ws, k * ROWS, buf, ks[k] + p)
                    tile_store(t, acc, p, geo.length)
                rows = min(ROWS, out.shape[1] - ob * ROWS)
                _emit(acc, rows, out, n0, cnt, ob * ROWS, job, geo, relu, bits[1 + j])


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _sum(a, n):
    """a[0] + ... + a[n-1] (reassociated: it vectorises)."""
    s = a.dtype.type(0)
    for p in range(n):
        s += a[p]
    return s


@njit(cache=True, nogil=True)
def _gy_grid(gy, mask, masked, n0, cnt, o, grid, i, end, length, geo, bits):
    """Copy gy[n0:n0+cnt, o] (0 where mask > 0 fails, when masked) onto grid row i; zero it
    from the last output to `length` (the tail may hold a fuller block's values); return its
    sum."""
    nout, oh, ow = gy.shape[1], gy.shape[2], gy.shape[3]
    _zero(grid[i], end, length)
    if geo.vec_grid:  # whole slots (the lanes not set in bits get 0)
        for b in range(cnt):
            g0, s0 = i * grid.shape[1] + b * geo.img, ((n0 + b) * nout + o) * oh * ow
            for k in range(bits.shape[0]):
                s0 += expand_vector(grid, g0 + k * geo.lanes, gy, s0, bits[k], mask, masked)
        return _sum(grid[i], end)
    for b in range(cnt):
        for u in range(oh):
            g0 = i * grid.shape[1] + b * geo.img + u * geo.wq
            s0 = (((n0 + b) * nout + o) * oh + u) * ow
            for k in range(0, ow, geo.lanes):
                if masked:
                    mask_vector(grid, g0 + k, gy, s0 + k, ow - k, mask)
                else:
                    copy_vector(grid, g0 + k, gy, s0 + k, ow - k)
    return _sum(grid[i], end)


@njit(cache=True, nogil=True)
def weight_grad(gy, mask, masked, src, unmasked, geo, cols, bits, parts, bparts, bufs, grids,
                chunks, counter, share, shares):
    """parts[g, o, k] = group g's share of sum_n sum_grid gy[n, o] * packed(src[n])[cols[k]
    + grid] (gy zero where mask > 0 fails, when masked); bparts[g, o] its share of sum gy[n, o].

    gy, mask (N, O, OH, OW), src (N, C, H, W) (unmasked: False, a value rather than a constant
    so that pack compiles once for both kernels), cols (K,) buffer positions of the (input
    channel, tap) pairs, K a multiple of COLS; bits as for correlate (the forward's).
    parts (G, OB*ROWS, K), bparts (G, OB*ROWS): the image blocks fall into G groups of
    consecutive blocks; a work item (group, chunk of output-channel blocks), claimed through
    counter as in correlate, sums its group's blocks in order into its own rows, and the caller
    adds the groups in order: the result depends neither on which thread took what nor on the
    thread count (no atomics on the sums). Scratch: bufs (shares, C, size) and grids (shares,
    ROWS, length), zero outside the output positions, bufs[share] and grids[share] this
    thread's.
    """
    nimg, nout = gy.shape[0], gy.shape[1]
    blocks, groups = -(-nimg // geo.nb), parts.shape[0]
    buf, grid = bufs[share], grids[share]
    nblocks = parts.shape[1] // ROWS
    per = -(-nblocks // chunks)
    ncols = cols.shape[0]
    zeros = np.zeros(ROWS, parts.dtype)
    last = -1
    while True:
        task = claim(counter)
        if task >= groups * chunks:
            break
        group, chunk = task // chunks, task % chunks
        obs = range(chunk * per, min(nblocks, (chunk + 1) * per))
        part, bpart = parts[group], bparts[group]
        _zero(part.reshape(-1), obs.start * ROWS * ncols, obs.stop * ROWS * ncols)
        _zero(bpart, obs.start * ROWS, obs.stop * ROWS)
        for blk in range(group * blocks // groups, (group + 1) * blocks // groups):
            n0 = blk * geo.nb
            cnt = min(geo.nb, nimg - n0)
            if blk != last:
                for b in range(cnt):
                    pack(src, src, unmasked, n0 + b, buf, b, geo, bits)
                if cnt < geo.nb:
                    _clear_slots(buf, cnt, geo)
                last = blk
            end = (cnt - 1) * geo.img + gy.shape[2] * geo.wq
            length = _grid_length(cnt, gy.shape[2], geo)
            for ob in obs:
                for i in range(ROWS):
                    if ob * ROWS + i < nout:
                        bpart[ob * ROWS + i] += _gy_grid(gy, mask, masked, n0, cnt,
                                                         ob * ROWS + i, grid, i, end, length,
                                                         geo, bits[1])
                    else:  # a padding channel of the last block: contributes nothing
                        _zero(grid[i], 0, length)
                for kb in range(0, ncols, COLS):
                    t = tile_splat(zeros, 0, ROWS, COLS)
                    for p in range(0, length, geo.lanes):
                        t = tile_dot(t, grid, p, geo.length, buf, cols, kb, p)
                    tile_sum_into(t, part, ob * ROWS * ncols + kb, ncols)
