"""CUDA conv2d: one thread per output element (forward, backward-input) and one block per
weight-gradient element (a fixed-tree reduction). x (N, C, H, W), w (O, C, KH, KW).

Fused ReLU, as kernels.cpu.conv: the forward applies bias and ReLU as it writes y (relu=True),
and both backward kernels take the forward's ReLU output y and multiply gy by (y > 0) as they
read it, so a conv + bias + ReLU layer costs one launch forward and two backward (no relu
kernels).
"""
from numba import cuda

from ._device import (RED, THREADS, block_sum, contig, flat, launch, launcher, per_element,
                      tap, unravel)


@cuda.jit(device=True, inline="always")
def masked(gy, y, use_mask, n, o, p, q):
    """gy[n, o, p, q], times (y[n, o, p, q] > 0) when use_mask (inf or NaN in gy gives NaN
    where masked, as relu_backward does)."""
    g = gy[n, o, p, q]
    if use_mask and not y[n, o, p, q] > 0:
        g = g * gy.dtype.type(0)
    return g


@cuda.jit(cache=True)
def conv2d_forward_kernel(x, w, b, has_bias, relu, sh, sw, ph, pw, y):
    """One thread per y[n, o, p, q] (q fastest: neighbouring threads read neighbouring x);
    relu: max(., 0) as relu_forward does (NaN and -0.0 kept)."""
    t = cuda.grid(1)
    if t >= y.size:
        return
    n, o, p, q = unravel(t, y.shape[1], y.shape[2], y.shape[3])
    acc = y.dtype.type(0)  # typed zero: a literal 0 would promote float32 sums to float64
    for c in range(w.shape[1]):
        for i in range(w.shape[2]):
            h = p * sh - ph + i
            if 0 <= h < x.shape[2]:
                for j in range(w.shape[3]):
                    v = q * sw - pw + j
                    if 0 <= v < x.shape[3]:
                        acc += x[n, c, h, v] * w[o, c, i, j]
    if has_bias:
        acc += b[o]  # after the sum, as the reference adds it
    if relu and acc < 0:
        acc = y.dtype.type(0)
    y[n, o, p, q] = acc


@cuda.jit(cache=True)
def conv2d_backward_input_kernel(gy, y, use_mask, w, sh, sw, ph, pw, gx):
    """One thread per gx[n, c, h, v]: gathers every (o, tap) that read it; no atomics. gy is
    masked by y > 0 when use_mask (y unread otherwise)."""
    t = cuda.grid(1)
    if t >= gx.size:
        return
    n, c, h, v = unravel(t, gx.shape[1], gx.shape[2], gx.shape[3])
    acc = gx.dtype.type(0)
    for i in range(w.shape[2]):
        p = tap(h + ph - i, sh, gy.shape[2])
        if p >= 0:
            for j in range(w.shape[3]):
                q = tap(v + pw - j, sw, gy.shape[3])
                if q >= 0:
                    for o in range(w.shape[0]):
                        acc += masked(gy, y, use_mask, n, o, p, q) * w[o, c, i, j]
    gx[n, c, h, v] = acc


@cuda.jit(cache=True)
def conv2d_backward_weight_kernel(gy, y, use_mask, x, sh, sw, ph, pw, gw, gb):
    """Block k < gw.size sums gw.flat[k] over (n, p, q), block gw.size + o sums gb[o] (launched
    only when gb is wanted): RED threads stride over (n, p, q), then a shared-memory tree.
    gy is masked by y > 0 when use_mask (y unread otherwise)."""
    k, tid = cuda.blockIdx.x, cuda.threadIdx.x
    oh, ow = gy.shape[2], gy.shape[3]
    acc = gy.dtype.type(0)
    if k < gw.size:
        o, c, i, j = unravel(k, gw.shape[1], gw.shape[2], gw.shape[3])
        for t in range(tid, gy.shape[0] * oh * ow, RED):
            n, p, q = t // (oh * ow), t // ow % oh, t % ow
            h, v = p * sh - ph + i, q * sw - pw + j
            if 0 <= h < x.shape[2] and 0 <= v < x.shape[3]:
                acc += masked(gy, y, use_mask, n, o, p, q) * x[n, c, h, v]
    else:
        o = k - gw.size
        for t in range(tid, gy.shape[0] * oh * ow, RED):
            acc += masked(gy, y, use_mask, t // (oh * ow), o, t // ow % oh, t % ow)
    total = block_sum(acc, tid, gy)
    if tid == 0:
        if k < gw.size:
            o, c, i, j = unravel(k, gw.shape[1], gw.shape[2], gw.shape[3])
            gw[o, c, i, j] = total
        else:
            gb[k - gw.size] = total



@launcher
def conv2d_forward(xp, x, w, b, stride, padding, relu=False):
    """Cross-correlation y (N, O, OH, OW) of x (N, C, H, W) with w (O, C, KH, KW), + b (O,),
    then ReLU when relu (in the same pass)."""
    x, w = contig(xp, x, w)
    (sh, sw), (ph, pw) = stride, padding
    oh = (x.shape[2] + 2 * ph - w.shape[2]) // sh + 1
    ow = (x.shape[3] + 2 * pw - w.shape[3]) // sw + 1
    y = xp.empty((x.shape[0], w.shape[0], oh, ow), dtype=x.dtype)
    launch(xp, conv2d_forward_kernel, per_element(y.size), THREADS,
            x, w, flat(xp, w, b)[1], b is not None, bool(relu), sh, sw, ph, pw, y)
    return y


@launcher
def conv2d_backward_input(xp, gy, w, x_shape, stride, padding, y=None):
    """Gradient (N, C, H, W) = x_shape to the input from gy (N, O, OH, OW); y: the forward's
    ReLU output (relu=True), gy then counts only where y > 0."""
    gx = xp.empty(x_shape, dtype=gy.dtype)
    gy, w, y = contig(xp, gy, w, y)
    launch(xp, conv2d_backward_input_kernel, per_element(gx.size), THREADS,
           gy, gy if y is None else y, y is not None, w, *stride, *padding, gx)
    return gx


@launcher
def conv2d_backward_weight(xp, gy, x, w_shape, stride, padding, bias, y=None):
    """(gw (O, C, KH, KW), gb (O,) or None when not bias) from gy (N, O, OH, OW); y: the
    forward's ReLU output (relu=True), gy then counts only where y > 0."""
    gw = xp.empty(w_shape, dtype=gy.dtype)
    gb = xp.empty((w_shape[0],), dtype=gy.dtype) if bias else None
    gy, x, y = contig(xp, gy, x, y)
    launch(xp, conv2d_backward_weight_kernel, gw.size + (w_shape[0] if bias else 0), RED,
           gy, gy if y is None else y, y is not None, x, *stride, *padding, gw,
           flat(xp, gy, gb)[1])
    return gw, gb
