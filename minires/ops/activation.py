"""Activations and losses: relu (Numba kernel), sigmoid, tanh, softmax, log_softmax,
cross_entropy (fused log-softmax + NLL) and dropout.

Imports minires.tensor, minires.backend and kernels.
"""
import numpy as np

from minires import kernels
from minires import backend
from minires.ops.arith import check_float
from minires.tensor import Function, Tensor


class ReLU(Function):
    def forward(self, x):
        check_float("relu", x)
        y = kernels.relu_forward(x)
        self.save_for_backward(y)  # the output, not the input: mask is y > 0
        return y

    def backward(self, gy):
        return kernels.relu_backward(gy, self.saved[0])


class Sigmoid(Function):
    def forward(self, x):
        check_float("sigmoid", x)
        # tanh form: stable for large |x| (no overflow in exp)
        y = 0.5 * (self.xp.tanh(0.5 * x) + 1)
        self.save_for_backward(y)
        return y.astype(x.dtype, copy=False)

    def backward(self, gy):
        y = self.saved[0]
        return gy * y * (1 - y)


class Tanh(Function):
    def forward(self, x):
        check_float("tanh", x)
        y = self.xp.tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        y = self.saved[0]
        return gy * (1 - y * y)


def _log_softmax(xp, x, axis):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        check_float("log_softmax", x)
        y = _log_softmax(self.xp, x, self.axis)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        y = self.saved[0]
        return gy - self.xp.exp(y) * gy.sum(axis=self.axis, keepdims=True)


class Softmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        check_float("softmax", x)
        y = self.xp.exp(_log_softmax(self.xp, x, self.axis))
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        y = self.saved[0]
        return y * (gy - (gy * y).sum(axis=self.axis, keepdims=True))


class CrossEntropy(Function):
    """Mean over the batch of -log softmax(logits)[label]; labels are integers in [0, K)."""

    def __init__(self, labels):
        self.labels = labels

    def forward(self, logits):
        labels = self.labels
        check_float("cross_entropy", logits)
        if logits.ndim != 2 or labels.shape != (logits.shape[0],):
            raise ValueError(f"cross_entropy: expected logits (N, K) and labels (N,), got "
                             f"logits {logits.shape} and labels {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: labels must be integers, got {labels.dtype}")
        k = logits.shape[1]
        # The range check reads labels on the host; on the GPU that would cost a device-to-host
        # copy every step, so it runs on the CPU only (validate GPU labels before the loop).
        on_host = self.xp is np
        if on_host and labels.size and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"cross_entropy: labels must be in [0, {k}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        logp = _log_softmax(self.xp, logits, 1)
        n = logits.shape[0]
        self.save_for_backward(logp)
        return -logp[self.xp.arange(n), labels].sum() / logits.dtype.type(max(n, 1))

    def backward(self, gy):
        logp = self.saved[0]
        n = logp.shape[0]
        g = self.xp.exp(logp)
        g[self.xp.arange(n), self.labels] -= 1
        return g * (gy / max(n, 1))


class Dropout(Function):
    def __init__(self, mask):
        self.mask = mask  # already scaled by 1 / (1 - p)

    def forward(self, x):
        return x * self.mask

    def backward(self, gy):
        return gy * self.mask


def relu(x):
    """max(x, 0), elementwise (Numba kernel on the CPU, numba.cuda on the GPU)."""
    return ReLU()(x)


def sigmoid(x):
    """1 / (1 + exp(-x)), elementwise."""
    return Sigmoid()(x)


def tanh(x):
    """Hyperbolic tangent, elementwise."""
    return Tanh()(x)


def log_softmax(x, axis=-1):
    """log(softmax(x)) along `axis`, computed stably."""
    return LogSoftmax(axis)(x)


def softmax(x, axis=-1):
    """exp(x) / sum(exp(x)) along `axis`, computed stably."""
    return Softmax(axis)(x)


def cross_entropy(logits, labels):
    """Mean cross-entropy of logits (N, K) against integer labels (N,): a scalar tensor."""
    labels = labels.data if isinstance(labels, Tensor) else labels
    xp = backend.array_module(getattr(logits, "data", logits))
    labels = xp.asarray(labels)
    return CrossEntropy(labels)(logits)


def dropout(x, p=0.5, training=True, rng=None):
    """Zero each element with probability p and scale the rest by 1/(1-p) when training.

    rng: a numpy Generator (or seed) that draws the mask on the host, so CPU and GPU runs
    drop the same elements; identity when not training or p == 0.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x if isinstance(x, Tensor) else Tensor(x)
    x = x if isinstance(x, Tensor) else Tensor(x)
    rng = np.random.default_rng(rng)
    keep = (rng.random(x.shape) >= p).astype(x.dtype) / x.dtype.type(1 - p)
    return Dropout(backend.to_device(keep, x.device))(x)
