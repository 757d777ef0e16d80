"""CPU batch normalisation (optionally fused with the ReLU that follows): @njit loops over the
channels of x viewed as (N, C, L), L = H * W (1 for (N, C) input), and their public wrappers.

Each channel is reduced and then written while its data is still in cache; big inputs split
the channels over threads. Sums are accumulated in float64 (float32 inputs stay within the
float32 tolerance over millions of terms).
"""
import math

import numpy as np
from numba import njit, prange

from ..reference import update_running
from .memory import launch, outputs, threads

_REDUCE = {"contract", "reassoc", "nsz"}  # the per-channel sums vectorise only with these


@njit(cache=True, nogil=True)
def _value(xv, mu, scale, beta):
    """(x - mean) * gamma * inv_std + beta, without fastmath: forward's output and backward's
    ReLU mask round identically (a contracted FMA in one of them could flip a y == 0)."""
    return (xv - mu) * scale + beta


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _stats(x, c, shift):
    """(sum(x - shift), sum((x - shift)^2)) over channel c of x (N, C, L), in float64.

    Shifting by one of the channel's own values keeps E[d^2] - E[d]^2 free of cancellation."""
    s1 = s2 = 0.0
    for n in range(x.shape[0]):
        for k in range(x.shape[2]):
            d = x[n, c, k] - shift
            s1 += d
            s2 += d * d
    return s1, s2


@njit(cache=True, nogil=True)
def _normalise(x, c, mu, scale, beta, relu, y):
    zero = y.dtype.type(0)
    for n in range(x.shape[0]):
        for k in range(x.shape[2]):
            v = _value(x[n, c, k], mu, scale, beta)
            y[n, c, k] = zero if relu and v < zero else v


@njit(cache=True, nogil=True)
def forward_channels(x, gamma, beta, first, stop, training, eps, relu, y, mean, inv_std, var):
    """Channels first..stop-1: with `training` their batch mean, biased var (float64) and
    inv_std into mean/var/inv_std, else mean and inv_std are read; then y = act(bn(x))."""
    count = x.shape[0] * x.shape[2]
    for c in range(first, stop):
        if training:
            shift = np.float64(x[0, c, 0])
            s1, s2 = _stats(x, c, shift)
            d = s1 / count
            var[c] = max(s2 / count - d * d, 0.0)
            mean[c] = shift + d
            inv_std[c] = 1.0 / math.sqrt(var[c] + eps)
        _normalise(x, c, mean[c], gamma[c] * inv_std[c], beta[c], relu, y)


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _grad_sums(gy, x, c, mu, scale, beta, relu):
    """(sum(g), sum(g * (x - mean))) over channel c in float64; g = gy, masked by y > 0 when
    relu (y recomputed from x: nothing but x is saved)."""
    s1 = s2 = 0.0
    zero = gy.dtype.type(0)
    for n in range(x.shape[0]):
        for k in range(x.shape[2]):
            xv, g = x[n, c, k], gy[n, c, k]
            if relu and not _value(xv, mu, scale, beta) > zero:
                g = zero
            s1 += g
            s2 += g * (xv - mu)
    return s1, s2


@njit(cache=True, nogil=True)
def _grad_x(gy, x, c, mu, scale, beta, relu, a, b, gx):
    """gx = scale * g + a * (x - mean) + b over channel c (g as in _grad_sums)."""
    zero = gy.dtype.type(0)
    for n in range(x.shape[0]):
        for k in range(x.shape[2]):
            xv, g = x[n, c, k], gy[n, c, k]
            if relu and not _value(xv, mu, scale, beta) > zero:
                g = zero
            gx[n, c, k] = scale * g + a * (xv - mu) + b


@njit(cache=True, nogil=True)
def backward_channels(gy, x, gamma, beta, mean, inv_std, first, stop, training, relu, gx,
                      ggamma, gbeta):
    """Channels first..stop-1: gbeta = sum(g), ggamma = sum(g * x_hat), and gx; in training
    gx = gamma * inv_std * (g - (gbeta + x_hat * ggamma) / count), else gamma * inv_std * g."""
    count = x.shape[0] * x.shape[2]
    for c in range(first, stop):
        mu, istd = mean[c], inv_std[c]
        scale = gamma[c] * istd
        s1, s2 = _grad_sums(gy, x, c, mu, scale, beta[c], relu)
        gbeta[c], ggamma[c] = s1, s2 * istd
        a = b = 0.0
        if training:  # the batch statistics depend on x: two more terms
            a, b = -scale * istd * (s2 * istd) / count, -scale * s1 / count
        _grad_x(gy, x, c, mu, scale, beta[c], relu, gx.dtype.type(a), gx.dtype.type(b), gx)


# The passes `parallel` runs, by code: one parallel driver for both halves compiles in about
# half the time of two (a parallel function compiles slowly).
FORWARD, BACKWARD = 0, 1


@njit(cache=True, parallel=True)
def parallel(op, x, gy, gamma, beta, mean, inv_std, var, training, relu, eps, out, ggamma,
             gbeta, chunks):
    """forward_channels (FORWARD: y = out; gy, ggamma and gbeta unread) or backward_channels
    (BACKWARD: gx = out; var and eps unread) over all channels, in `chunks` parallel ranges."""
    c = x.shape[1]
    for k in prange(chunks):
        first, stop = k * c // chunks, (k + 1) * c // chunks
        if op == FORWARD:
            forward_channels(x, gamma, beta, first, stop, training, eps, relu, out, mean,
                             inv_std, var)
        elif op == BACKWARD:  # no else: the wrappers below pass one of the two codes
            backward_channels(gy, x, gamma, beta, mean, inv_std, first, stop, training, relu,
                              out, ggamma, gbeta)


# --- the public kernels -----------------------------------------------------------------
_PARALLEL_MIN = 1 << 15  # elements: below, one thread is as fast (launch cost, measured)


def _planes(a):
    """a (N, C, H, W) or (N, C) as a C-contiguous (N, C, L) view (a copy if not contiguous)."""
    return np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1)


def _chunks(x):
    return min(threads(), x.shape[1]) if x.size >= _PARALLEL_MIN else 1


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps,
                       relu):
    """(act(bn(x)), mean, inv_std): see kernels.reference.batch_norm_forward."""
    dtype, c = x.dtype, x.shape[1]
    y = outputs.empty(x.shape, dtype=dtype)
    mean, inv_std, var = np.empty(c, dtype), np.empty(c, dtype), np.empty(c)
    if not training:
        mean[:] = running_mean
        inv_std[:] = 1 / np.sqrt(running_var.astype(dtype, copy=False) + eps)
    x3, y3, training, relu = _planes(x), _planes(y), bool(training), bool(relu)
    chunks = _chunks(x)
    if chunks == 1:
        forward_channels(x3, gamma, beta, 0, c, training, float(eps), relu, y3, mean, inv_std,
                         var)
    else:
        launch(parallel, FORWARD, x3, x3, gamma, beta, mean, inv_std, var, training, relu,
               float(eps), y3, mean, inv_std, chunks)
    if training:
        update_running(running_mean, running_var, mean, var, x.size // c, momentum)
    return y, mean, inv_std


def batch_norm_backward(gy, x, gamma, beta, mean, inv_std, training, relu):
    """(gx, ggamma, gbeta): see kernels.reference.batch_norm_backward."""
    dtype, c = x.dtype, x.shape[1]
    gx = outputs.empty(x.shape, dtype=dtype)
    ggamma, gbeta = np.empty(c, dtype), np.empty(c, dtype)
    gy3, x3, gx3, training, relu = _planes(gy), _planes(x), _planes(gx), bool(training), bool(relu)
    chunks = _chunks(x)
    if chunks == 1:
        backward_channels(gy3, x3, gamma, beta, mean, inv_std, 0, c, training, relu, gx3, ggamma,
                          gbeta)
    else:
        launch(parallel, BACKWARD, x3, gy3, gamma, beta, mean, inv_std, np.empty(c), training,
               relu, 0.0, gx3, ggamma, gbeta, chunks)
    return gx, ggamma, gbeta
