"""Broadcasting arithmetic: add sub mul div neg pow exp log, the dtype cast and the device
copy.

Imports minires.tensor, minires.backend, minires.ops._args and minires.ops.shape (sum_to).
Gradients of broadcast inputs are summed back to the input's shape by `unbroadcast` (arrays)
or `sum_to` (the same as an op, in backward_graph).
"""
import numpy as np

from minires import backend
from minires.ops._args import check_float, unbroadcast
from minires.ops.shape import sum_to
from minires.tensor import Function


def _check_broadcast(op, a, b):
    try:
        return backend.array_module(a).broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast "
                         f"together") from None


class _Binary(Function):
    def forward(self, a, b):
        _check_broadcast(type(self).__name__.lower(), a, b)
        self.shapes = (a.shape, b.shape)
        return self.compute(a, b)

    def reduce(self, ga, gb):
        """Un-broadcast both gradients; None where not needed."""
        sa, sb = self.shapes
        need_a, need_b = self.needs_input_grad
        return (unbroadcast(ga, sa) if need_a else None,
                unbroadcast(gb, sb) if need_b else None)

    def reduce_graph(self, ga, gb):
        """reduce for Tensors (backward_graph): ga and gb are thunks, called only if needed."""
        sa, sb = self.shapes
        need_a, need_b = self.needs_input_grad
        return (sum_to(ga(), sa) if need_a else None, sum_to(gb(), sb) if need_b else None)


class Add(_Binary):
    def compute(self, a, b):
        return a + b

    def backward(self, gy):
        return self.reduce(gy, gy)

    def backward_graph(self, gy):
        return self.reduce_graph(lambda: gy, lambda: gy)


def add(a, b):
    """a + b with NumPy broadcasting."""
    return Add()(a, b)


class Sub(_Binary):
    def compute(self, a, b):
        return a - b

    def backward(self, gy):
        return self.reduce(gy, -gy)

    def backward_graph(self, gy):
        return self.reduce_graph(lambda: gy, lambda: -gy)


def sub(a, b):
    """a - b with NumPy broadcasting."""
    return Sub()(a, b)


class Mul(_Binary):
    def compute(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, gy):
        a, b = self.saved
        return self.reduce(gy * b if self.needs_input_grad[0] else None,
                           gy * a if self.needs_input_grad[1] else None)

    def backward_graph(self, gy):
        a, b = self.inputs
        return self.reduce_graph(lambda: gy * b, lambda: gy * a)


def mul(a, b):
    """a * b (elementwise) with NumPy broadcasting."""
    return Mul()(a, b)


class Div(_Binary):
    def compute(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, gy):
        a, b = self.saved
        ga = gy / b
        return self.reduce(ga, -ga * a / b if self.needs_input_grad[1] else None)

    def backward_graph(self, gy):
        a, b = self.inputs
        return self.reduce_graph(lambda: gy / b, lambda: -gy * a / (b * b))


def div(a, b):
    """a / b (true division) with NumPy broadcasting."""
    return Div()(a, b)


class Pow(_Binary):
    def compute(self, a, b):
        y = a ** b
        self.save_for_backward(a, b, y)
        return y

    def backward(self, gy):
        a, b, y = self.saved
        xp = self.xp
        ga = gy * b * a ** (b - 1) if self.needs_input_grad[0] else None
        # d(a^b)/db = a^b log a; defined as 0 where a == 0 (the limit for b > 0)
        gb = None
        if self.needs_input_grad[1]:
            safe = xp.where(a > 0, a, 1)
            gb = gy * y * xp.log(safe)
        return self.reduce(ga, gb)

    def backward_graph(self, gy):
        a, b = self.inputs
        positive = (a.data > 0).astype(a.dtype)  # a constant mask: d(log a) is 0 where a <= 0
        safe = a * positive + (1 - positive)

        def gb():
            return gy * a ** b * log(safe)
        return self.reduce_graph(lambda: gy * b * a ** (b - 1), gb)


def pow(a, b):
    """a ** b with NumPy broadcasting; differentiable in both (d/db needs a > 0)."""
    return Pow()(a, b)


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy

    backward_graph = backward  # the same code on arrays and on Tensors


def neg(x):
    """-x."""
    return Neg()(x)


class Exp(Function):
    def forward(self, x):
        check_float("exp", x)
        y = self.xp.exp(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        return gy * self.saved[0]

    def backward_graph(self, gy):
        return gy * exp(self.inputs[0])


def exp(x):
    """e ** x, elementwise."""
    return Exp()(x)


class Log(Function):
    def forward(self, x):
        check_float("log", x)
        self.save_for_backward(x)
        return self.xp.log(x)

    def backward(self, gy):
        return gy / self.saved[0]

    def backward_graph(self, gy):
        return gy / self.inputs[0]


def log(x):
    """Natural logarithm, elementwise."""
    return Log()(x)


class ToDevice(Function):
    def __init__(self, device):
        self.device = device

    def forward(self, x):
        self.source = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, gy):
        return backend.to_device(gy, self.source)

    def backward_graph(self, gy):
        return to_device(gy, self.source)


def to_device(x, device):
    """Copy x to `device` ('cpu' | 'cuda'); the gradient is copied back."""
    return ToDevice(backend.check_device(device))(x)


class Clip(Function):
    def __init__(self, low, high):
        self.low, self.high = low, high

    def forward(self, x):
        check_float("clip", x)
        inside = self.xp.ones(x.shape, dtype=bool)
        if self.low is not None:
            inside &= x >= self.low
        if self.high is not None:
            inside &= x <= self.high
        # the gradient passes where x is within [min, max], bounds included (as PyTorch)
        self.save_for_backward(inside.astype(x.dtype))
        y = x if self.low is None else self.xp.maximum(x, x.dtype.type(self.low))
        # min > max gives max everywhere: the upper bound is applied last, as in PyTorch
        return y if self.high is None else self.xp.minimum(y, x.dtype.type(self.high))

    def backward(self, gy):
        return gy * self.saved[0]

    backward_graph = backward  # gy * a constant: the same code on arrays and on Tensors


def clip(x, min=None, max=None):
    """x limited to [min, max] elementwise (either bound may be None), as torch.clip: the
    gradient is 1 inside the bounds (inclusive) and 0 outside; min > max gives max everywhere
    (and a zero gradient), as in PyTorch."""
    for name, v in (("min", min), ("max", max)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TypeError(f"clip: {name} must be a number or None, got {type(v).__name__}")
    if min is None and max is None:
        raise ValueError("clip: at least one of min and max must be given")
    return Clip(min, max)(x)


class AsType(Function):
    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, x):
        self.source = x.dtype
        return x.astype(self.dtype)

    def backward(self, gy):
        return gy.astype(self.source)

    def backward_graph(self, gy):
        return astype(gy, self.source)


def astype(x, dtype):
    """x converted to `dtype` (a copy); between floating dtypes the gradient is converted
    back."""
    return AsType(np.dtype(dtype))(x)
