"""CUDA multi-tensor optimizer updates: one launch updates up to TENSORS parameters in place.

The tensors travel as tuples of flat arrays (Numba passes a tuple's arrays as separate kernel
parameters: no pointer table to build or copy to the device), padded to TENSORS entries, so
one compiled kernel per dtype serves every model. Kernel parameters are limited to 4 KiB; 16
tensors x 3 tuples of flat arrays is about 2.9 KiB.
"""
import numpy as np
from numba import cuda

from ._device import THREADS, launch, launcher, per_element

TENSORS = 16  # tensors per launch (the tuples' fixed length)


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
    lo, hi = 0, len(starts) - 1
    while lo < hi:  # binary search: the last k with starts[k] <= t
        mid = (lo + hi + 1) // 2
        if starts[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    k = lo
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


def _padded(items, fill):
    return tuple(items) + (fill,) * (TENSORS - len(items))


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
        starts, total = [], 0
        for a in ps:
            starts.append(total)
            total += a.size
        launch(xp, sgd_kernel, per_element(total), THREADS,
               _padded(ps, ps[-1]), _padded(gs, gs[-1]), _padded(bs, bs[-1]),
               _padded([np.int64(s) for s in starts], np.int64(total)),
               _padded([bool(f) for f in fresh[lo:lo + TENSORS]], False),
               np.int64(total), *scalars)
