"""Numba @njit convolution loops on a flat "grid" layout; kernels/cpu/conv.py prepares the inputs.

Imports numba only. Images are copied into a zero-padded per-thread buffer (split into stride
phases), so every kernel tap is one long contiguous loop over the output grid.

Layout: geo is an int64 array (top, left, dh, dw, psh, psw, hq, wq, plane, hp, wp, oh, ow,
img, nb) built by kernels/cpu/conv.py. Source pixel (h, w) of image b of a block lands at
padded row r = top + h*dh, column q = left + w*dw (dropped outside [0, hp) x [0, wp)), in
phase plane (r % psh) * psw + q % psw at flat position
b*img + plane_index*plane + (r // psh)*wq + q // psw. Tap t reads offset offs[t] from the grid
position b*img + oh*wq + ow of output (oh, ow); the other grid positions are garbage (never
emitted; zero in the gy grid of the weight gradient). Small images are stacked nb to a block
so that the loops stay long.
"""
from numba import njit, prange

# Forward sums are evaluated in a fixed order (contract only allows FMA); the weight gradient is
# a reduction over positions, which vectorises only when it may be reassociated.
_FMA = {"contract"}
_REDUCE = {"contract", "reassoc", "nsz"}


@njit(cache=True, nogil=True)
def pack(src, n, buf, base, geo):
    """Copy src[n] (C, H, W) into buf[:, base:] (C, S), padded and split into phases.

    Positions never written keep the zeros they were created with.
    """
    top, left, dh, dw, psh, psw, wq, plane, hp, wp = (geo[0], geo[1], geo[2], geo[3], geo[4],
                                                      geo[5], geo[7], geo[8], geo[9], geo[10])
    height, width = src.shape[2], src.shape[3]
    w0, w1 = max(0, -left), min(width, wp - left)  # columns that land inside, when dw == 1
    for c in range(src.shape[1]):
        for h in range(height):
            r = top + h * dh
            if r < 0 or r >= hp:
                continue
            at = base + (r % psh) * psw * plane + (r // psh) * wq
            if psw == 1 and dw == 1:  # a contiguous row; loops over views from 0 vectorise
                dst, row = buf[c, at + left + w0:], src[n, c, h, w0:]
                for w in range(w1 - w0):
                    dst[w] = row[w]
                continue
            if psw == 2 and dw == 1 and left >= 0 and left + width <= wp:
                for parity in range(2):  # every other column into each parity plane
                    first = (parity - left) % 2
                    dst = buf[c, at + parity * plane + (left + first) // 2:]
                    row = src[n, c, h, first:]
                    for k in range((width - first + 1) // 2):
                        dst[k] = row[2 * k]
                continue
            for w in range(width):
                q = left + w * dw
                if 0 <= q < wp:
                    buf[c, at + (q % psw) * plane + q // psw] = src[n, c, h, w]


@njit(cache=True, nogil=True)
def _block(nimg, blk, geo):
    """(first image, image count, grid length) of block blk; the length is rounded up to 16
    so the vector loops have no scalar tail (the buffers have room for it)."""
    nb, img = geo[14], geo[13]
    n0 = blk * nb
    cnt = min(nb, nimg - n0)
    return n0, cnt, ((cnt - 1) * img + geo[11] * geo[7] + 15) // 16 * 16


@njit(cache=True, nogil=True)
def _pack_block(src, n0, cnt, buf, geo):
    for b in range(cnt):
        pack(src, n0 + b, buf, b * geo[13], geo)


@njit(cache=True, nogil=True, fastmath=_FMA)
def _taps9(x, k, wa, wb, a0, a1, length):
    """a0[p] += sum_t wa[t] x[k[t] + p], a1 likewise with wb, for 9 taps t in one pass.

    The 18 weights stay in registers; the sum is split in two chains to halve its latency.
    """
    x0, x1, x2, x3, x4 = x[k[0]:], x[k[1]:], x[k[2]:], x[k[3]:], x[k[4]:]
    x5, x6, x7, x8 = x[k[5]:], x[k[6]:], x[k[7]:], x[k[8]:]
    p0, p1, p2, p3, p4, p5, p6, p7, p8 = (wa[0], wa[1], wa[2], wa[3], wa[4], wa[5], wa[6],
                                          wa[7], wa[8])
    q0, q1, q2, q3, q4, q5, q6, q7, q8 = (wb[0], wb[1], wb[2], wb[3], wb[4], wb[5], wb[6],
                                          wb[7], wb[8])
    for p in range(length):
        v0, v1, v2, v3, v4 = x0[p], x1[p], x2[p], x3[p], x4[p]
        v5, v6, v7, v8 = x5[p], x6[p], x7[p], x8[p]
        a0[p] = ((a0[p] + p0 * v0 + p1 * v1 + p2 * v2 + p3 * v3)
                 + (p4 * v4 + p5 * v5 + p6 * v6 + p7 * v7 + p8 * v8))
        a1[p] = ((a1[p] + q0 * v0 + q1 * v1 + q2 * v2 + q3 * v3)
                 + (q4 * v4 + q5 * v5 + q6 * v6 + q7 * v7 + q8 * v8))


@njit(cache=True, nogil=True, fastmath=_FMA)
def _tap1(x, k, wa, wb, a0, a1, length):
    """One tap for two output channels: a0[p] += wa x[k + p], a1[p] += wb x[k + p]."""
    xs = x[k:]
    for p in range(length):
        v = xs[p]
        a0[p] += wa * v
        a1[p] += wb * v


@njit(cache=True, nogil=True)
def _correlate_pair(buf, wt, o0, o1, offs, a0, a1, length):
    """a0[p] += sum_{c,t} wt[o0, c, t] buf[c, offs[t] + p]; a1 likewise for channel o1."""
    ntaps = offs.shape[0]
    for c in range(buf.shape[0]):
        t = 0
        while t + 9 <= ntaps:
            _taps9(buf[c], offs[t:t + 9], wt[o0, c, t:t + 9], wt[o1, c, t:t + 9], a0, a1,
                   length)
            t += 9
        while t < ntaps:
            _tap1(buf[c], offs[t], wt[o0, c, t], wt[o1, c, t], a0, a1, length)
            t += 1


@njit(cache=True, nogil=True)
def _emit(acc, y, n0, cnt, o, geo):
    """y[n0 + b, o, i, j] = acc[b*img + i*wq + j]: the valid grid positions of a block."""
    wq, img, ow = geo[7], geo[13], y.shape[3]
    for b in range(cnt):
        for i in range(y.shape[2]):
            dst, row = y[n0 + b, o, i], acc[b * img + i * wq:]
            for j in range(ow):
                dst[j] = row[j]


@njit(cache=True, nogil=True)
def _correlate_part(src, wt, bias, geo, offs, y, buf, a0, a1, first, stop, chunks):
    """Work items first..stop-1 of correlate, on one thread's scratch."""
    nimg, nout = src.shape[0], wt.shape[0]
    per = ((nout + chunks - 1) // chunks + 1) // 2 * 2  # even: pairs never straddle chunks
    last = -1
    for task in range(first, stop):
        n0, cnt, length = _block(nimg, task // chunks, geo)
        if task // chunks != last:
            _pack_block(src, n0, cnt, buf, geo)
            last = task // chunks
        lo = (task % chunks) * per
        for o0 in range(lo, min(lo + per, nout), 2):
            o1 = min(o0 + 1, nout - 1)  # odd O: the last pair repeats a channel
            for p in range(length):
                a0[p], a1[p] = bias[o0], bias[o1]
            _correlate_pair(buf, wt, o0, o1, offs, a0, a1, length)
            _emit(a0, y, n0, cnt, o0, geo)
            _emit(a1, y, n0, cnt, o1, geo)


@njit(cache=True, parallel=True)
def correlate(src, wt, bias, geo, offs, y, bufs, accs, threads, chunks):
    """y[n, o] = bias[o] + sum_{c,t} wt[o, c, t] * packed(src[n])[c, offs[t] + grid].

    src (N, C, H, W), wt (O, C, T), bias (O,), y (N, O, OH, OW). bufs (threads, C, S) and
    accs (threads, 2, L) are per-thread scratch. Work items are (block of images, chunk of
    output channels), split statically over `threads`; a thread packs a block once per run.
    The parallel body is one call (a small parfor compiles fast).
    """
    tasks = -(-src.shape[0] // geo[14]) * chunks
    for th in prange(threads):
        _correlate_part(src, wt, bias, geo, offs, y, bufs[th], accs[th, 0], accs[th, 1],
                        th * tasks // threads, (th + 1) * tasks // threads, chunks)


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _dot9(x, k, g0, g1, s0, s1, length):
    """s0[t] += sum_p g0[p] x[k[t] + p] and s1 with g1, for 9 taps in one pass."""
    x0, x1, x2, x3, x4 = x[k[0]:], x[k[1]:], x[k[2]:], x[k[3]:], x[k[4]:]
    x5, x6, x7, x8 = x[k[5]:], x[k[6]:], x[k[7]:], x[k[8]:]
    z = g0.dtype.type(0)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = z
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = b8 = z
    for p in range(length):
        u, w = g0[p], g1[p]
        v0, v1, v2, v3, v4 = x0[p], x1[p], x2[p], x3[p], x4[p]
        v5, v6, v7, v8 = x5[p], x6[p], x7[p], x8[p]
        a0, a1, a2, a3, a4 = a0 + u * v0, a1 + u * v1, a2 + u * v2, a3 + u * v3, a4 + u * v4
        a5, a6, a7, a8 = a5 + u * v5, a6 + u * v6, a7 + u * v7, a8 + u * v8
        b0, b1, b2, b3, b4 = b0 + w * v0, b1 + w * v1, b2 + w * v2, b3 + w * v3, b4 + w * v4
        b5, b6, b7, b8 = b5 + w * v5, b6 + w * v6, b7 + w * v7, b8 + w * v8
    s0[0], s0[1], s0[2], s0[3], s0[4] = s0[0] + a0, s0[1] + a1, s0[2] + a2, s0[3] + a3, \
        s0[4] + a4
    s0[5], s0[6], s0[7], s0[8] = s0[5] + a5, s0[6] + a6, s0[7] + a7, s0[8] + a8
    s1[0], s1[1], s1[2], s1[3], s1[4] = s1[0] + b0, s1[1] + b1, s1[2] + b2, s1[3] + b3, \
        s1[4] + b4
    s1[5], s1[6], s1[7], s1[8] = s1[5] + b5, s1[6] + b6, s1[7] + b7, s1[8] + b8


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _dot1(x, k, g0, g1, length):
    """(sum_p g0[p] x[k + p], sum_p g1[p] x[k + p])."""
    xs = x[k:]
    a = b = g0.dtype.type(0)
    for p in range(length):
        a += g0[p] * xs[p]
        b += g1[p] * xs[p]
    return a, b


@njit(cache=True, nogil=True)
def _weight_pair(buf, g0, g1, offs, s0, s1, length):
    """s0[c, t] += sum_p g0[p] buf[c, offs[t] + p] and s1 likewise with g1, for all c, t."""
    ntaps = offs.shape[0]
    for c in range(buf.shape[0]):
        t = 0
        while t + 9 <= ntaps:
            _dot9(buf[c], offs[t:t + 9], g0, g1, s0[c, t:t + 9], s1[c, t:t + 9], length)
            t += 9
        while t < ntaps:
            a, b = _dot1(buf[c], offs[t], g0, g1, length)
            s0[c, t] += a
            s1[c, t] += b
            t += 1


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _gy_grid(gy, n0, cnt, o, grid, length, geo):
    """Copy gy[n0:n0+cnt, o] onto the block grid (other positions zero up to `length`, the
    tail may hold a previous, larger block); return its sum (for the bias gradient)."""
    wq, img = geo[7], geo[13]
    s = grid.dtype.type(0)
    end = (cnt - 1) * img + gy.shape[2] * wq
    tail = grid[end:]
    for p in range(length - end):
        tail[p] = 0
    for b in range(cnt):
        for i in range(gy.shape[2]):
            dst, row = grid[b * img + i * wq:], gy[n0 + b, o, i]
            for j in range(gy.shape[3]):
                dst[j] = row[j]
                s += row[j]
    return s


@njit(cache=True, nogil=True)
def _weight_part(gy, src, geo, offs, buf, g0, g1, part, bpart, first, stop, chunks):
    """Work items first..stop-1 of weight_grad, summed into one thread's part and bpart."""
    nimg, nout = gy.shape[0], gy.shape[1]
    per = ((nout + chunks - 1) // chunks + 1) // 2 * 2
    part[:] = 0
    bpart[:] = 0
    last = -1
    for task in range(first, stop):
        n0, cnt, length = _block(nimg, task // chunks, geo)
        if task // chunks != last:
            _pack_block(src, n0, cnt, buf, geo)
            last = task // chunks
        lo = (task % chunks) * per
        for o0 in range(lo, min(lo + per, nout), 2):
            o1 = o0 + 1 if o0 + 1 < nout else nout  # odd O: row nout is a dummy
            bpart[o0] += _gy_grid(gy, n0, cnt, o0, g0, length, geo)
            if o1 < nout:
                bpart[o1] += _gy_grid(gy, n0, cnt, o1, g1, length, geo)
            _weight_pair(buf, g0, g1, offs, part[o0], part[o1], length)


@njit(cache=True, parallel=True)
def weight_grad(gy, src, geo, offs, bufs, grids, parts, bparts, threads, chunks):
    """parts[th, o, c, t] = thread th's share of sum_n sum_grid gy[n, o] *
    packed(src[n])[c, offs[t] + grid]; bparts[th, o] its share of sum gy[n, o].

    gy (N, O, OH, OW), src (N, C, H, W). Scratch: bufs (threads, C, S), grids (threads, 2, L)
    zero outside the valid positions; parts (threads, O + 1, C, T) (parts[:, O] absorbs the
    dummy channel of an odd O) and bparts (threads, O), summed over threads by the caller:
    no atomics.
    """
    tasks = -(-gy.shape[0] // geo[14]) * chunks
    for th in prange(threads):
        _weight_part(gy, src, geo, offs, bufs[th], grids[th, 0], grids[th, 1], parts[th],
                     bparts[th], th * tasks // threads, (th + 1) * tasks // threads, chunks)
