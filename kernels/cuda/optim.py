"""CUDA multi-tensor optimizer updates (SGD, Adam/AdamW): one launch updates up to TENSORS
(SGD) or ADAM_TENSORS parameters in place.

The tensors travel as tuples of flat arrays (Numba passes a tuple's arrays as separate kernel
parameters: no pointer table to build or copy to the device), padded to a fixed length, so
one compiled kernel per dtype serves every model. Kernel parameters are limited to 4 KiB
(about 56 bytes per flat array): SGD's 3 tuples x 16 arrays take about 2.9 KiB, Adam's
4 x 12 about 3 KiB. The arithmetic follows minires.optim's per-tensor code operation by
operation (in the parameters' dtype), so the simulator reproduces it bit for bit; a GPU may
contract a * b + c into one FMA.
"""
import math

import numpy as np
from numba import cuda

from ._device import THREADS, launch, launcher, per_element

TENSORS = 16  # tensors per SGD launch (the tuples' fixed length)
ADAM_TENSORS = 12  # tensors per Adam launch


@cuda.jit(device=True, inline="always")
def segment(starts, t):
    """The last k with starts[k] <= t (binary search; starts ascending)."""
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


@cuda.jit(cache=True)
def sgd_kernel(params, grads, bufs, starts, fresh, total, lr, momentum, weight_decay,
               use_momentum, use_decay, nesterov):
    """One thread per element of the concatenated tensors: element t belongs to tensor k, the
    last with starts[k] <= t, at index t - starts[k]. SGD as minires.optim.SGD (torch.optim.SGD,
    dampening 0), in the parameters' dtype (lr, momentum, weight_decay come in that dtype):

        g = grad + weight_decay * p
        buf = g (fresh[k]: no buffer yet) else momentum * buf + g      (with momentum)
        g = g + momentum * buf (nesterov) else buf
        p = p - lr * g

    use_momentum / use_decay: momentum / weight_decay != 0 (flags, so that no comparison with
    a literal promotes float32 to float64). bufs is unread without momentum; padding entries
    have starts[k] == total (never chosen).
    """
    t = cuda.grid(1)
    if t >= total:
        return
    k = segment(starts, t)
    i = t - starts[k]
    p = params[k]
    g = grads[k][i]
    if use_decay:
        g = g + weight_decay * p[i]
    if use_momentum:
        buf = bufs[k]
        if fresh[k]:
            b = g
        else:
            b = momentum * buf[i]
            b = b + g
        buf[i] = b
        if nesterov:
            g = g + momentum * b
        else:
            g = b
    p[i] = p[i] - lr * g


@cuda.jit(cache=True)
def adam_kernel(params, grads, ms, vs, starts, step_size, bias2, total, b1, one_b1, b2, one_b2,
                eps, weight_decay, keep, decoupled, use_decay):
    """One thread per element of the concatenated tensors (as sgd_kernel). Adam / AdamW as
    minires.optim.Adam, in the parameters' dtype:

        p = p * keep                           (decoupled: keep = 1 - lr * weight_decay)
        g = grad + weight_decay * p            (use_decay: coupled L2)
        m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * (g * g)
        p = p - step_size[k] * (m / (sqrt(v) / bias2[k] + eps))

    step_size[k] = lr / (1 - b1 ** t), bias2[k] = sqrt(1 - b2 ** t), t tensor k's step count.
    """
    t = cuda.grid(1)
    if t >= total:
        return
    k = segment(starts, t)
    i = t - starts[k]
    p, m, v = params[k], ms[k], vs[k]
    if decoupled:
        p[i] = p[i] * keep
    g = grads[k][i]
    if use_decay:
        g = g + weight_decay * p[i]
    mi = m[i] * b1
    mi = mi + one_b1 * g
    m[i] = mi
    vi = v[i] * b2
    vi = vi + one_b2 * (g * g)
    v[i] = vi
    denom = v.dtype.type(math.sqrt(vi)) / bias2[k] + eps
    p[i] = p[i] - step_size[k] * (mi / denom)


def _padded(items, fill, n=TENSORS):
    return tuple(items) + (fill,) * (n - len(items))


def _starts(arrays, n):
    """(segment starts padded to n with the total, total) of flat arrays laid end to end."""
    starts, total = [], 0
    for a in arrays:
        starts.append(np.int64(total))
        total += a.size
    return _padded(starts, np.int64(total), n), total


@launcher
def sgd_update(xp, params, grads, bufs, fresh, lr, momentum, weight_decay, nesterov):
    """SGD step on lists of parameters, gradients and momentum buffers (C-contiguous arrays of
    one float dtype, each gradient and buffer shaped as its parameter), in place, in
    ceil(len(params) / TENSORS) launches. fresh[k]: buffer k is new (it is set to the
    gradient); bufs may be empty when momentum == 0."""
    dtype = params[0].dtype.type
    scalars = (dtype(lr), dtype(momentum), dtype(weight_decay), momentum != 0,
               weight_decay != 0, bool(nesterov))
    flat = [[a.reshape(-1) for a in group] for group in (params, grads, bufs)]
    for lo in range(0, len(params), TENSORS):
        ps, gs = flat[0][lo:lo + TENSORS], flat[1][lo:lo + TENSORS]
        bs = flat[2][lo:lo + TENSORS] if momentum else gs  # unread placeholders
        starts, total = _starts(ps, TENSORS)
        launch(xp, sgd_kernel, per_element(total), THREADS,
               _padded(ps, ps[-1]), _padded(gs, gs[-1]), _padded(bs, bs[-1]), starts,
               _padded([bool(f) for f in fresh[lo:lo + TENSORS]], False),
               np.int64(total), *scalars)


@launcher
def adam_update(xp, params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps,
                weight_decay, decoupled):
    """Adam (decoupled: AdamW) step on lists of parameters, gradients and moments (C-contiguous
    arrays of one float dtype, shaped as their parameters), in place; steps[k]: tensor k's
    step count including this step. ceil(len(params) / ADAM_TENSORS) launches."""
    dtype = params[0].dtype.type
    (b1, b2), n = betas, ADAM_TENSORS
    scalars = (dtype(b1), dtype(1 - b1), dtype(b2), dtype(1 - b2), dtype(eps),
               dtype(weight_decay), dtype(1 - lr * weight_decay), bool(decoupled),
               bool(weight_decay) and not decoupled)
    flat = [[a.reshape(-1) for a in group] for group in (params, grads, exp_avgs, exp_avg_sqs)]
    for lo in range(0, len(params), n):
        ps, gs, ms, vs = (group[lo:lo + n] for group in flat)
        ts = steps[lo:lo + n]
        starts, total = _starts(ps, n)
        launch(xp, adam_kernel, per_element(total), THREADS,
               _padded(ps, ps[-1], n), _padded(gs, gs[-1], n), _padded(ms, ms[-1], n),
               _padded(vs, vs[-1], n), starts,
               _padded([dtype(lr / (1 - b1 ** t)) for t in ts], dtype(0), n),
               _padded([dtype(math.sqrt(1 - b2 ** t)) for t in ts], dtype(1), n),
               np.int64(total), *scalars)
