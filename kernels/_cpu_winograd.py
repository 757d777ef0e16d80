"""Numba @njit Winograd F(2x2, 3x3) kernels for 3x3 stride-1 convolutions (2.25x fewer
multiply-adds than the direct loops of kernels/_cpu_conv.py); kernels/cpu.py decides when.

Imports numba and kernels._cpu_conv (the padded, phase-split `pack`). Per block of nb images
and per thread: each padded image is split into its 4 (row, column) parity planes, so the 4x4
input tile of output tile (ty, tx) reads 16 planes values at fixed offsets from position
q = ty*wq + tx (wq = tw + 1: one spare column). V = B^T d B (16 values per tile),
M[xi, o] = sum_c U[xi, o, c] V[xi, c] with U = G w G^T, and y = A^T M A per 2x2 output tile.
The weight gradient sums (A gy A^T) * V over tiles and maps back with G^T . G.
Tile t = b*tiles + q for image b of a block (tiles = th*wq); xi = 4i + j.
"""
from numba import njit, prange

from kernels._cpu_conv import pack

_FMA = {"contract"}
_REDUCE = {"contract", "reassoc", "nsz"}


@njit(cache=True, nogil=True)
def _input_transform(buf, cnt, geo, tiles, v):
    """v[xi, c, b*tiles + q] = (B^T d B)[xi] for every 4x4 tile d of the cnt packed images."""
    wq, plane, img = geo[7], geo[8], geo[13]
    for c in range(buf.shape[0]):
        for b in range(cnt):
            at = b * img
            p00, p01 = buf[c, at:], buf[c, at + plane:]  # (row, column) parity planes
            p10, p11 = buf[c, at + 2 * plane:], buf[c, at + 3 * plane:]
            o = b * tiles
            v0, v1, v2, v3 = v[0, c, o:], v[1, c, o:], v[2, c, o:], v[3, c, o:]
            v4, v5, v6, v7 = v[4, c, o:], v[5, c, o:], v[6, c, o:], v[7, c, o:]
            v8, v9, v10, v11 = v[8, c, o:], v[9, c, o:], v[10, c, o:], v[11, c, o:]
            v12, v13, v14, v15 = v[12, c, o:], v[13, c, o:], v[14, c, o:], v[15, c, o:]
            for q in range(tiles):
                # row i of the tile: d_i0..d_i3 = columns 2tx..2tx+3
                d00, d01, d02, d03 = p00[q], p01[q], p00[q + 1], p01[q + 1]
                d10, d11, d12, d13 = p10[q], p11[q], p10[q + 1], p11[q + 1]
                d20, d21, d22, d23 = p00[q + wq], p01[q + wq], p00[q + wq + 1], p01[q + wq + 1]
                d30, d31, d32, d33 = p10[q + wq], p11[q + wq], p10[q + wq + 1], p11[q + wq + 1]
                # B^T along the columns of the tile (combining rows) ...
                e00, e01, e02, e03 = d00 - d20, d01 - d21, d02 - d22, d03 - d23
                e10, e11, e12, e13 = d10 + d20, d11 + d21, d12 + d22, d13 + d23
                e20, e21, e22, e23 = d20 - d10, d21 - d11, d22 - d12, d23 - d13
                e30, e31, e32, e33 = d10 - d30, d11 - d31, d12 - d32, d13 - d33
                # ... then B along the rows
                v0[q], v1[q], v2[q], v3[q] = e00 - e02, e01 + e02, e02 - e01, e01 - e03
                v4[q], v5[q], v6[q], v7[q] = e10 - e12, e11 + e12, e12 - e11, e11 - e13
                v8[q], v9[q], v10[q], v11[q] = e20 - e22, e21 + e22, e22 - e21, e21 - e23
                v12[q], v13[q], v14[q], v15[q] = e30 - e32, e31 + e32, e32 - e31, e31 - e33


@njit(cache=True, nogil=True, fastmath=_FMA)
def _gemm16(v, ua, ub, m0, m1, ntiles):
    """m0[t] = sum_{c<16} ua[c] v[c, t], m1 likewise with ub: the whole sum in one pass."""
    v0, v1, v2, v3, v4, v5, v6, v7 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
    v8, v9, v10, v11, v12, v13, v14, v15 = v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]
    p0, p1, p2, p3, p4, p5, p6, p7 = ua[0], ua[1], ua[2], ua[3], ua[4], ua[5], ua[6], ua[7]
    p8, p9, p10, p11, p12, p13, p14, p15 = ua[8], ua[9], ua[10], ua[11], ua[12], ua[13], \
        ua[14], ua[15]
    q0, q1, q2, q3, q4, q5, q6, q7 = ub[0], ub[1], ub[2], ub[3], ub[4], ub[5], ub[6], ub[7]
    q8, q9, q10, q11, q12, q13, q14, q15 = ub[8], ub[9], ub[10], ub[11], ub[12], ub[13], \
        ub[14], ub[15]
    for t in range(ntiles):
        a0, a1, a2, a3, a4, a5, a6, a7 = v0[t], v1[t], v2[t], v3[t], v4[t], v5[t], v6[t], v7[t]
        a8, a9, a10, a11 = v8[t], v9[t], v10[t], v11[t]
        a12, a13, a14, a15 = v12[t], v13[t], v14[t], v15[t]
        m0[t] = ((p0 * a0 + p1 * a1 + p2 * a2 + p3 * a3 + p4 * a4 + p5 * a5 + p6 * a6
                  + p7 * a7) + (p8 * a8 + p9 * a9 + p10 * a10 + p11 * a11 + p12 * a12
                                + p13 * a13 + p14 * a14 + p15 * a15))
        m1[t] = ((q0 * a0 + q1 * a1 + q2 * a2 + q3 * a3 + q4 * a4 + q5 * a5 + q6 * a6
                  + q7 * a7) + (q8 * a8 + q9 * a9 + q10 * a10 + q11 * a11 + q12 * a12
                                + q13 * a13 + q14 * a14 + q15 * a15))


@njit(cache=True, nogil=True, fastmath=_FMA)
def _gemm8(v, c, ua, ub, m0, m1, ntiles, first):
    """m0[t] (+)= sum_{k<8} ua[c+k] v[c+k, t], m1 likewise with ub: 16 weights in registers."""
    v0, v1, v2, v3, v4, v5, v6, v7 = v[c], v[c + 1], v[c + 2], v[c + 3], v[c + 4], v[c + 5], \
        v[c + 6], v[c + 7]
    p0, p1, p2, p3, p4, p5, p6, p7 = ua[c], ua[c + 1], ua[c + 2], ua[c + 3], ua[c + 4], \
        ua[c + 5], ua[c + 6], ua[c + 7]
    q0, q1, q2, q3, q4, q5, q6, q7 = ub[c], ub[c + 1], ub[c + 2], ub[c + 3], ub[c + 4], \
        ub[c + 5], ub[c + 6], ub[c + 7]
    if first:
        for t in range(ntiles):
            a0, a1, a2, a3, a4, a5, a6, a7 = v0[t], v1[t], v2[t], v3[t], v4[t], v5[t], v6[t], \
                v7[t]
            m0[t] = (p0 * a0 + p1 * a1 + p2 * a2 + p3 * a3) + (p4 * a4 + p5 * a5 + p6 * a6
                                                               + p7 * a7)
            m1[t] = (q0 * a0 + q1 * a1 + q2 * a2 + q3 * a3) + (q4 * a4 + q5 * a5 + q6 * a6
                                                               + q7 * a7)
    else:
        for t in range(ntiles):
            a0, a1, a2, a3, a4, a5, a6, a7 = v0[t], v1[t], v2[t], v3[t], v4[t], v5[t], v6[t], \
                v7[t]
            m0[t] = (m0[t] + p0 * a0 + p1 * a1 + p2 * a2 + p3 * a3) + (p4 * a4 + p5 * a5
                                                                       + p6 * a6 + p7 * a7)
            m1[t] = (m1[t] + q0 * a0 + q1 * a1 + q2 * a2 + q3 * a3) + (q4 * a4 + q5 * a5
                                                                       + q6 * a6 + q7 * a7)


@njit(cache=True, nogil=True, fastmath=_FMA)
def _gemm1(v, c, wa, wb, m0, m1, ntiles, first):
    """m0[t] (+)= wa v[c, t], m1[t] (+)= wb v[c, t]."""
    vc = v[c]
    if first:
        for t in range(ntiles):
            m0[t] = wa * vc[t]
            m1[t] = wb * vc[t]
    else:
        for t in range(ntiles):
            m0[t] += wa * vc[t]
            m1[t] += wb * vc[t]


@njit(cache=True, nogil=True)
def _gemm_pair(v, u, o0, o1, m, ntiles):
    """m[xi, k, t] = sum_c u[xi, o_k, c] v[xi, c, t] for the pair (o0, o1), all 16 xi."""
    nin = v.shape[1]
    for xi in range(16):
        if nin == 16:
            _gemm16(v[xi], u[xi, o0], u[xi, o1], m[xi, 0], m[xi, 1], ntiles)
            continue
        c = 0
        while c + 8 <= nin:
            _gemm8(v[xi], c, u[xi, o0], u[xi, o1], m[xi, 0], m[xi, 1], ntiles, c == 0)
            c += 8
        while c < nin:
            _gemm1(v[xi], c, u[xi, o0, c], u[xi, o1, c], m[xi, 0], m[xi, 1], ntiles, c == 0)
            c += 1


@njit(cache=True, nogil=True)
def _output_transform(m, k, yq, ntiles):
    """yq[2a + b, t] = (A^T m[:, k, t] A)[a, b] for every tile t (the 2x2 outputs)."""
    m00, m01, m02, m03 = m[0, k], m[1, k], m[2, k], m[3, k]
    m10, m11, m12, m13 = m[4, k], m[5, k], m[6, k], m[7, k]
    m20, m21, m22, m23 = m[8, k], m[9, k], m[10, k], m[11, k]
    m30, m31, m32, m33 = m[12, k], m[13, k], m[14, k], m[15, k]
    y0, y1, y2, y3 = yq[0], yq[1], yq[2], yq[3]
    for t in range(ntiles):
        r00 = m00[t] + m01[t] + m02[t]  # A^T along the rows of m, then the columns
        r01 = m01[t] - m02[t] - m03[t]
        r10 = m10[t] + m11[t] + m12[t]
        r11 = m11[t] - m12[t] - m13[t]
        r20 = m20[t] + m21[t] + m22[t]
        r21 = m21[t] - m22[t] - m23[t]
        r30 = m30[t] + m31[t] + m32[t]
        r31 = m31[t] - m32[t] - m33[t]
        y0[t], y1[t] = r00 + r10 + r20, r01 + r11 + r21
        y2[t], y3[t] = r10 - r20 - r30, r11 - r21 - r31


@njit(cache=True, nogil=True)
def _emit(yq, y, n0, cnt, o, geo, tiles, beta):
    """y[n0 + b, o, 2ty + a, 2tx + c] = yq[2a + c, b*tiles + ty*wq + tx] + beta."""
    oh, ow, wq = y.shape[2], y.shape[3], geo[7]
    half = ow // 2
    for b in range(cnt):
        for i in range(oh):
            ty, a = i // 2, i % 2
            at = b * tiles + ty * wq
            even, odd, row = yq[2 * a, at:], yq[2 * a + 1, at:], y[n0 + b, o, i]
            for x in range(half):
                row[2 * x] = even[x] + beta
                row[2 * x + 1] = odd[x] + beta
            if ow % 2:
                row[ow - 1] = even[half] + beta


@njit(cache=True, nogil=True)
def _pack_transform(src, n0, cnt, geo, tiles, buf, v):
    """Pack images n0..n0+cnt-1 of src (padded, parity planes) and input-transform them."""
    for b in range(cnt):
        pack(src, n0 + b, buf, b * geo[13], geo)
    _input_transform(buf, cnt, geo, tiles, v)


@njit(cache=True, nogil=True)
def _forward_part(src, u, bias, geo, tiles, y, buf, v, m, yq, first, stop, chunks):
    """Work items first..stop-1 of forward() on one thread's scratch."""
    nimg, nout, nb = src.shape[0], u.shape[1], geo[14]
    per = ((nout + chunks - 1) // chunks + 1) // 2 * 2
    last = -1
    for task in range(first, stop):
        blk = task // chunks
        n0, cnt = blk * nb, min(nb, nimg - blk * nb)
        if blk != last:
            _pack_transform(src, n0, cnt, geo, tiles, buf, v)
            last = blk
        ntiles = (cnt * tiles + 15) // 16 * 16  # v, m and yq have room for the rounding
        lo = (task % chunks) * per
        for o0 in range(lo, min(lo + per, nout), 2):
            o1 = min(o0 + 1, nout - 1)  # odd O: the last pair repeats a channel
            _gemm_pair(v, u, o0, o1, m, ntiles)
            _output_transform(m, 0, yq, ntiles)
            _emit(yq, y, n0, cnt, o0, geo, tiles, bias[o0])
            _output_transform(m, 1, yq, ntiles)
            _emit(yq, y, n0, cnt, o1, geo, tiles, bias[o1])


@njit(cache=True, parallel=True)
def forward(src, u, bias, geo, tiles, y, bufs, vs, ms, yqs, threads, chunks):
    """y (N, O, OH, OW) = 3x3 stride-1 correlation of src (N, C, H, W), padded as geo says,
    with the transformed weights u (16, O, C), plus bias (O,); `tiles` per image.

    Per-thread scratch: bufs (threads, C, S) packed images, vs (threads, 16, C, T),
    ms (threads, 16, 2, T) and yqs (threads, 4, T), T >= nb*tiles rounded up to 16.
    """
    tasks = -(-src.shape[0] // geo[14]) * chunks
    for th in prange(threads):
        _forward_part(src, u, bias, geo, tiles, y, bufs[th], vs[th], ms[th], yqs[th],
                      th * tasks // threads, (th + 1) * tasks // threads, chunks)


@njit(cache=True, nogil=True)
def _gy_transform(gpad, cnt, geo, tiles, g, ntiles):
    """g[xi, o, b*tiles + q] = (A d A^T)[xi] for every 2x2 tile d of the packed gy blocks
    (parity planes as for x); tiles from cnt*tiles up to ntiles are zeroed (they must add
    nothing to the weight gradient)."""
    plane, img = geo[8], geo[13]
    zero = g.dtype.type(0)
    for o in range(gpad.shape[0]):
        for b in range(cnt):
            at = b * img
            p00, p01 = gpad[o, at:], gpad[o, at + plane:]
            p10, p11 = gpad[o, at + 2 * plane:], gpad[o, at + 3 * plane:]
            t = b * tiles
            g0, g1, g2, g3 = g[0, o, t:], g[1, o, t:], g[2, o, t:], g[3, o, t:]
            g4, g5, g6, g7 = g[4, o, t:], g[5, o, t:], g[6, o, t:], g[7, o, t:]
            g8, g9, g10, g11 = g[8, o, t:], g[9, o, t:], g[10, o, t:], g[11, o, t:]
            g12, g13, g14, g15 = g[12, o, t:], g[13, o, t:], g[14, o, t:], g[15, o, t:]
            for q in range(tiles):
                d00, d01, d10, d11 = p00[q], p01[q], p10[q], p11[q]
                # A along the columns of the tile (rows d0, d0 + d1, d0 - d1, -d1) ...
                h00, h01, h10, h11 = d00, d01, d00 + d10, d01 + d11
                h20, h21, h30, h31 = d00 - d10, d01 - d11, -d10, -d11
                # ... then along the rows
                g0[q], g1[q], g2[q], g3[q] = h00, h00 + h01, h00 - h01, -h01
                g4[q], g5[q], g6[q], g7[q] = h10, h10 + h11, h10 - h11, -h11
                g8[q], g9[q], g10[q], g11[q] = h20, h20 + h21, h20 - h21, -h21
                g12[q], g13[q], g14[q], g15[q] = h30, h30 + h31, h30 - h31, -h31
        for xi in range(16):
            tail = g[xi, o, cnt * tiles:]
            for t in range(ntiles - cnt * tiles):
                tail[t] = zero


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _dot8(v, c, g0, g1, s0, s1, ntiles):
    """s0[k] += sum_t g0[t] v[c+k, t] and s1[k] with g1, k < 8: 16 sums in one pass."""
    v0, v1, v2, v3, v4, v5, v6, v7 = v[c], v[c + 1], v[c + 2], v[c + 3], v[c + 4], v[c + 5],         v[c + 6], v[c + 7]
    z = g0.dtype.type(0)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z
    for t in range(ntiles):
        p, q = g0[t], g1[t]
        x0, x1, x2, x3, x4, x5, x6, x7 = v0[t], v1[t], v2[t], v3[t], v4[t], v5[t], v6[t], v7[t]
        a0, a1, a2, a3 = a0 + p * x0, a1 + p * x1, a2 + p * x2, a3 + p * x3
        a4, a5, a6, a7 = a4 + p * x4, a5 + p * x5, a6 + p * x6, a7 + p * x7
        b0, b1, b2, b3 = b0 + q * x0, b1 + q * x1, b2 + q * x2, b3 + q * x3
        b4, b5, b6, b7 = b4 + q * x4, b5 + q * x5, b6 + q * x6, b7 + q * x7
    s0[c], s0[c + 1], s0[c + 2], s0[c + 3] = s0[c] + a0, s0[c + 1] + a1, s0[c + 2] + a2,         s0[c + 3] + a3
    s0[c + 4], s0[c + 5], s0[c + 6], s0[c + 7] = s0[c + 4] + a4, s0[c + 5] + a5,         s0[c + 6] + a6, s0[c + 7] + a7
    s1[c], s1[c + 1], s1[c + 2], s1[c + 3] = s1[c] + b0, s1[c + 1] + b1, s1[c + 2] + b2,         s1[c + 3] + b3
    s1[c + 4], s1[c + 5], s1[c + 6], s1[c + 7] = s1[c + 4] + b4, s1[c + 5] + b5,         s1[c + 6] + b6, s1[c + 7] + b7


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _dot1(vc, g0, g1, ntiles):
    a = b = g0.dtype.type(0)
    for t in range(ntiles):
        a += g0[t] * vc[t]
        b += g1[t] * vc[t]
    return a, b


@njit(cache=True, nogil=True)
def _weight_sums(v, g, part, ntiles):
    """part[xi, o, c] += sum_t g[xi, o, t] v[xi, c, t] (part has a dummy row O for odd O)."""
    nout, nin = g.shape[1], v.shape[1]
    for xi in range(16):
        for o0 in range(0, nout, 2):
            o1 = o0 + 1 if o0 + 1 < nout else o0
            s1 = part[xi, o1] if o1 != o0 else part[xi, nout]
            c = 0
            while c + 8 <= nin:
                _dot8(v[xi], c, g[xi, o0], g[xi, o1], part[xi, o0], s1, ntiles)
                c += 8
            while c < nin:
                a, b = _dot1(v[xi, c], g[xi, o0], g[xi, o1], ntiles)
                part[xi, o0, c] += a
                s1[c] += b
                c += 1


@njit(cache=True, nogil=True)
def _weight_part(gy, src, geo, ggeo, tiles, buf, gpad, v, g, part, bpart, first, stop):
    """Blocks first..stop-1 of weight_sums, summed into one thread's part and bpart."""
    nimg, nb = src.shape[0], geo[14]
    part[:] = 0
    bpart[:] = 0
    for blk in range(first, stop):
        n0, cnt = blk * nb, min(nb, nimg - blk * nb)
        ntiles = (cnt * tiles + 15) // 16 * 16
        _pack_transform(src, n0, cnt, geo, tiles, buf, v)
        for b in range(cnt):
            pack(gy, n0 + b, gpad, b * ggeo[13], ggeo)
        _gy_transform(gpad, cnt, ggeo, tiles, g, ntiles)
        _weight_sums(v, g, part, ntiles)
        for o in range(bpart.shape[0]):  # (A d A^T)[1, 1] is the sum of the 2x2 tile d
            bpart[o] += g[5, o, :ntiles].sum()


@njit(cache=True, parallel=True)
def weight_sums(gy, src, geo, ggeo, tiles, bufs, gpads, vs, gs, parts, bparts, threads):
    """parts[th, xi, o, c]: thread th's share of sum over tiles of (A gy A^T)[xi] *
    (B^T x B)[xi] (the caller sums threads and maps back with G^T . G).

    gy (N, O, OH, OW) packed with ggeo into gpads (threads, O, S'), zero-padded to whole
    tiles; src (N, C, H, W) packed with geo into bufs; vs (threads, 16, C, T),
    gs (threads, 16, O, T); parts (threads, 16, O + 1, C); bparts (threads, O) the bias
    gradient shares.
    """
    blocks = -(-src.shape[0] // geo[14])
    for th in prange(threads):
        _weight_part(gy, src, geo, ggeo, tiles, bufs[th], gpads[th], vs[th], gs[th],
                     parts[th], bparts[th], th * blocks // threads,
                     (th + 1) * blocks // threads)
