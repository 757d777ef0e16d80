"""CUDA batch normalisation (optionally fused with the ReLU that follows) over x viewed as
(N, C, L), L = H * W (1 for (N, C) input): a (P, C) grid, P blocks of RED threads per channel.

Deterministic, no atomics: a first kernel writes per-block partial sums; in the second, every
block of a channel reduces the same partials in the same fixed tree (so all agree), then
writes its share of the output. Two launches each way (one for the eval-mode forward).
"""
import math

from numba import cuda

from ._device import RED, block_sum, launch, launcher


@cuda.jit(device=True, inline="always")
def _value(xv, mu, scale, beta):
    """(x - mean) * gamma * inv_std + beta: the same expression in forward and in backward's
    ReLU mask, so both round alike."""
    return (xv - mu) * scale + beta


@cuda.jit(device=True, inline="always")
def _pair_sum(a1, a2, tid, like):
    """block_sum of two values (every thread of the block calls it and gets both sums)."""
    s1 = block_sum(a1, tid, like)
    cuda.syncthreads()  # every thread has read s1 before the shared buffer is written again
    return s1, block_sum(a2, tid, like)


@cuda.jit(device=True, inline="always")
def _channel_sums(partial, ch, tid, like):
    """Channel ch's totals of partial (C, P, 2): strided per-thread sums, then the tree."""
    a1 = a2 = like.dtype.type(0)
    for p in range(tid, partial.shape[1], RED):
        a1 += partial[ch, p, 0]
        a2 += partial[ch, p, 1]
    return _pair_sum(a1, a2, tid, like)


@cuda.jit(cache=True)
def batch_norm_stats_kernel(x, partial):
    """partial[ch, p] = (sum(x - shift), sum((x - shift)^2)) over block p's share of channel
    ch, shift = x[0, ch, 0] (a value of the channel: no cancellation in the variance)."""
    ch, p, tid = cuda.blockIdx.y, cuda.blockIdx.x, cuda.threadIdx.x
    size, shift = x.shape[2], x[0, ch, 0]
    a1 = a2 = x.dtype.type(0)
    for e in range(p * RED + tid, x.shape[0] * size, partial.shape[1] * RED):
        d = x[e // size, ch, e % size] - shift
        a1 += d
        a2 += d * d
    s1, s2 = _pair_sum(a1, a2, tid, x)
    if tid == 0:
        partial[ch, p, 0] = s1
        partial[ch, p, 1] = s2


@cuda.jit(cache=True)
def batch_norm_forward_kernel(x, gamma, beta, partial, training, relu, eps, momentum, unbias,
                              running_mean, running_var, has_mean, has_var, mean, inv_std, y):
    """y = act((x - mean) * gamma * inv_std + beta) over block (p, ch)'s share of channel ch.

    training: the batch mean and biased var from partial; block p = 0 writes mean and inv_std
    and updates the running buffers it has (momentum, var * unbias). Else mean and inv_std
    come from the running buffers, and block p = 0 writes them too.
    """
    ch, p, tid = cuda.blockIdx.y, cuda.blockIdx.x, cuda.threadIdx.x
    size, zero, one = x.shape[2], x.dtype.type(0), x.dtype.type(1)
    if training:
        s1, s2 = _channel_sums(partial, ch, tid, x)
        count = x.dtype.type(x.shape[0] * size)
        d = s1 / count
        var = max(s2 / count - d * d, zero)
        mu = x[0, ch, 0] + d
    else:
        mu, var = running_mean[ch], running_var[ch]
    istd = one / math.sqrt(var + eps)
    if p == 0 and tid == 0:
        mean[ch] = mu
        inv_std[ch] = istd
        if training and has_mean:
            running_mean[ch] = running_mean[ch] * (one - momentum) + momentum * mu
        if training and has_var:
            running_var[ch] = running_var[ch] * (one - momentum) + momentum * var * unbias
    scale, b = gamma[ch] * istd, beta[ch]
    for e in range(p * RED + tid, x.shape[0] * size, partial.shape[1] * RED):
        n, k = e // size, e % size
        v = _value(x[n, ch, k], mu, scale, b)
        y[n, ch, k] = zero if relu and v < zero else v


@cuda.jit(cache=True)
def batch_norm_grad_stats_kernel(gy, x, gamma, beta, mean, inv_std, relu, partial):
    """partial[ch, p] = (sum(g), sum(g * (x - mean))) over block p's share of channel ch;
    g = gy, masked by y > 0 (recomputed from x) when relu."""
    ch, p, tid = cuda.blockIdx.y, cuda.blockIdx.x, cuda.threadIdx.x
    size, zero = x.shape[2], x.dtype.type(0)
    mu, scale, b = mean[ch], gamma[ch] * inv_std[ch], beta[ch]
    a1 = a2 = zero
    for e in range(p * RED + tid, x.shape[0] * size, partial.shape[1] * RED):
        n, k = e // size, e % size
        xv, g = x[n, ch, k], gy[n, ch, k]
        if relu and not _value(xv, mu, scale, b) > zero:
            g = zero
        a1 += g
        a2 += g * (xv - mu)
    s1, s2 = _pair_sum(a1, a2, tid, x)
    if tid == 0:
        partial[ch, p, 0] = s1
        partial[ch, p, 1] = s2


@cuda.jit(cache=True)
def batch_norm_backward_kernel(gy, x, gamma, beta, mean, inv_std, partial, training, relu,
                               ggamma, gbeta, gx):
    """gx over block (p, ch)'s share of channel ch: gamma * inv_std * g, minus (gbeta + x_hat
    * ggamma) * gamma * inv_std / count in training; block p = 0 writes ggamma and gbeta."""
    ch, p, tid = cuda.blockIdx.y, cuda.blockIdx.x, cuda.threadIdx.x
    size, zero = x.shape[2], x.dtype.type(0)
    s1, s2 = _channel_sums(partial, ch, tid, x)
    mu, istd, b = mean[ch], inv_std[ch], beta[ch]
    scale = gamma[ch] * istd
    if p == 0 and tid == 0:
        gbeta[ch] = s1
        ggamma[ch] = s2 * istd
    a = c0 = zero
    if training:  # the batch statistics depend on x: two more terms
        count = x.dtype.type(x.shape[0] * size)
        a, c0 = -scale * istd * (s2 * istd) / count, -scale * s1 / count
    for e in range(p * RED + tid, x.shape[0] * size, partial.shape[1] * RED):
        n, k = e // size, e % size
        xv, g = x[n, ch, k], gy[n, ch, k]
        if relu and not _value(xv, mu, scale, b) > zero:
            g = zero
        gx[n, ch, k] = scale * g + a * (xv - mu) + c0


# --- the public kernels -----------------------------------------------------------------
def _planes(xp, a):
    """a (N, C, H, W) or (N, C) as a C-contiguous (N, C, L) view."""
    return xp.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1)


def _grid(xp, x3):
    """The (P, C) grid for x3 (N, C, L), about 8 elements per thread, and its partials."""
    parts = min(max(1, x3.shape[0] * x3.shape[2] // (RED * 8)), RED)
    return (parts, x3.shape[1]), xp.empty((x3.shape[1], parts, 2), dtype=x3.dtype)


def _buffer(xp, a, dtype, placeholder):
    """A running buffer as a contiguous array of dtype (a itself when it is one already)."""
    return placeholder if a is None else xp.ascontiguousarray(a, dtype=dtype)


@launcher
def batch_norm_forward(xp, x, gamma, beta, running_mean, running_var, training, momentum, eps,
                       relu):
    """(act(bn(x)), mean, inv_std): see kernels.reference.batch_norm_forward."""
    dtype, c, f = x.dtype, x.shape[1], x.dtype.type
    x3, y = _planes(xp, x), xp.empty(x.shape, dtype=dtype)
    grid, partial = _grid(xp, x3)
    mean, inv_std = xp.empty(c, dtype=dtype), xp.empty(c, dtype=dtype)
    rm, rv = (_buffer(xp, a, dtype, gamma) for a in (running_mean, running_var))
    if training:
        launch(xp, batch_norm_stats_kernel, grid, RED, x3, partial)
    count = x.size // c
    launch(xp, batch_norm_forward_kernel, grid, RED, x3, gamma, beta, partial, training, relu,
           f(eps), f(momentum), f(count / max(count - 1, 1)), rm, rv, running_mean is not None,
           running_var is not None, mean, inv_std, _planes(xp, y))
    for given, used in ((running_mean, rm), (running_var, rv)):
        if training and given is not None and used is not given:
            given[...] = used  # the buffer was converted (dtype, layout): write it back
    return y, mean, inv_std


@launcher
def batch_norm_backward(xp, gy, x, gamma, beta, mean, inv_std, training, relu):
    """(gx, ggamma, gbeta): see kernels.reference.batch_norm_backward."""
    dtype, c = x.dtype, x.shape[1]
    x3, gy3, gx = _planes(xp, x), _planes(xp, gy), xp.empty(x.shape, dtype=dtype)
    grid, partial = _grid(xp, x3)
    ggamma, gbeta = xp.empty(c, dtype=dtype), xp.empty(c, dtype=dtype)
    launch(xp, batch_norm_grad_stats_kernel, grid, RED, gy3, x3, gamma, beta, mean, inv_std,
           relu, partial)
    launch(xp, batch_norm_backward_kernel, grid, RED, gy3, x3, gamma, beta, mean, inv_std,
           partial, training, relu, ggamma, gbeta, _planes(xp, gx))
    return gx, ggamma, gbeta
