"""Activations and losses: relu (Numba kernel), leaky_relu, sigmoid, tanh, softmax,
log_softmax, cross_entropy (fused log-softmax + NLL), mse_loss and dropout.

Imports minires.tensor, minires.backend, minires.ops._args (dtype check), the arith, reduce
and shape ops (backward_graph, mse_loss) and kernels.
"""
import numpy as np

from minires import kernels
from minires import backend
from minires.ops._args import check_float, raw, relu_masked
from minires.ops.reduce import mean as mean_, sum as sum_
from minires.tensor import Function, Tensor


class ReLU(Function):
    uses_kernels = True

    def forward(self, x):
        check_float("relu", x)
        y = kernels.relu_forward(x)
        self.save_for_backward(y)  # the output, not the input: mask is y > 0
        return y

    def backward(self, gy):
        return kernels.relu_backward(gy, self.saved[0])

    def backward_graph(self, gy):
        return relu_masked(gy, self.saved[0])


def relu(x):
    """max(x, 0), elementwise (Numba kernel on the CPU, numba.cuda on the GPU)."""
    return ReLU()(x)


class LeakyReLU(Function):
    def __init__(self, negative_slope):
        self.negative_slope = negative_slope

    def forward(self, x):
        check_float("leaky_relu", x)
        slope = self.xp.where(x > 0, x.dtype.type(1), x.dtype.type(self.negative_slope))
        self.save_for_backward(slope)
        return x * slope

    def backward(self, gy):
        return gy * self.saved[0]

    backward_graph = backward  # gy * a constant: the same code on arrays and on Tensors


def leaky_relu(x, negative_slope=0.01):
    """x where x > 0, else negative_slope * x (elementwise), as torch's leaky_relu."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"leaky_relu: negative_slope must be a number, got "
                        f"{type(negative_slope).__name__}")
    return LeakyReLU(float(negative_slope))(x)


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

    def backward_graph(self, gy):
        y = sigmoid(self.inputs[0])  # recomputed: a Function never holds its output Tensor
        return gy * y * (1 - y)


def sigmoid(x):
    """1 / (1 + exp(-x)), elementwise."""
    return Sigmoid()(x)


class Tanh(Function):
    def forward(self, x):
        check_float("tanh", x)
        y = self.xp.tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        y = self.saved[0]
        return gy * (1 - y * y)

    def backward_graph(self, gy):
        y = tanh(self.inputs[0])
        return gy * (1 - y * y)


def tanh(x):
    """Hyperbolic tangent, elementwise."""
    return Tanh()(x)


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

    def backward_graph(self, gy):
        p = softmax(self.inputs[0], self.axis)
        return gy - p * sum_(gy, axis=self.axis, keepdims=True)


def log_softmax(x, axis=-1):
    """log(softmax(x)) along `axis`, computed stably."""
    return LogSoftmax(axis)(x)


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

    def backward_graph(self, gy):
        y = softmax(self.inputs[0], self.axis)
        return y * (gy - sum_(gy * y, axis=self.axis, keepdims=True))


def softmax(x, axis=-1):
    """exp(x) / sum(exp(x)) along `axis`, computed stably."""
    return Softmax(axis)(x)


class CrossEntropy(Function):
    """Mean over the batch of -log softmax(logits)[label]; labels are integers in [0, K).

    The labels (N,) are a constant of the op, not an input (no gradient, no graph edge): given
    at construction, they live only in `saved`, so they are freed with the graph.
    """

    def __init__(self, labels):
        self.save_for_backward(labels)

    def forward(self, logits):
        (labels,) = self.saved
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
        self.save_for_backward(logp, labels)
        return -logp[self.xp.arange(n), labels].sum() / logits.dtype.type(max(n, 1))

    def backward(self, gy):
        logp, labels = self.saved
        n = logp.shape[0]
        g = self.xp.exp(logp)
        g[self.xp.arange(n), labels] -= 1
        return g * (gy / max(n, 1))

    def backward_graph(self, gy):
        logp, labels = self.saved
        onehot = self.xp.zeros_like(logp)
        onehot[self.xp.arange(logp.shape[0]), labels] = 1
        return (softmax(self.inputs[0], 1) - onehot) * (gy / max(logp.shape[0], 1))


def cross_entropy(logits, labels):
    """Mean cross-entropy of logits (N, K) against integer labels (N,): a scalar tensor."""
    xp = backend.array_module(raw(logits))
    return CrossEntropy(xp.asarray(raw(labels)))(logits)


class Dropout(Function):
    """x * mask, with the mask (shape of x, already scaled by 1 / (1 - p)) given at
    construction and kept only in `saved`, so it is freed with the graph."""

    def __init__(self, mask):
        self.save_for_backward(mask)

    def forward(self, x):
        return x * self.saved[0]

    def backward(self, gy):
        return gy * self.saved[0]

    backward_graph = backward  # gy * a constant: the same code on arrays and on Tensors


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


def mse_loss(input, target, reduction="mean"):
    """Squared error (input - target) ** 2 of two tensors of one shape, as torch's mse_loss:
    averaged (reduction="mean"), summed ("sum") or elementwise ("none"). Built from the
    arith and reduce ops, so it is differentiable to any order in both arguments."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"mse_loss: reduction must be 'mean', 'sum' or 'none', got "
                         f"{reduction!r}")
    a, b = raw(input), raw(target)
    if getattr(a, "shape", None) != getattr(b, "shape", None):
        raise ValueError(f"mse_loss: input shape {getattr(a, 'shape', None)} != target shape "
                         f"{getattr(b, 'shape', None)} (no broadcasting, as in PyTorch)")
    check_float("mse_loss", a, b)
    diff = (input if isinstance(input, Tensor) else Tensor(input)) - target
    squared = diff * diff
    if reduction == "none":
        return squared
    return mean_(squared) if reduction == "mean" else sum_(squared)
