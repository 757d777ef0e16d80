"""Broadcasting arithmetic: add sub mul div neg pow exp log, and the device copy.

Imports minires.tensor and minires.backend. Gradients of broadcast inputs are summed back
to the input's shape by `unbroadcast`.
"""
from minires import backend
from minires.tensor import Function


def unbroadcast(g, shape):
    """Sum g over the axes that broadcasting added or stretched, so it has `shape`."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and g.shape[i + lead] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


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


class Add(_Binary):
    def compute(self, a, b):
        return a + b

    def backward(self, gy):
        return self.reduce(gy, gy)


class Sub(_Binary):
    def compute(self, a, b):
        return a - b

    def backward(self, gy):
        return self.reduce(gy, -gy)


class Mul(_Binary):
    def compute(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, gy):
        a, b = self.saved
        return self.reduce(gy * b if self.needs_input_grad[0] else None,
                           gy * a if self.needs_input_grad[1] else None)


class Div(_Binary):
    def compute(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, gy):
        a, b = self.saved
        ga = gy / b
        return self.reduce(ga, -ga * a / b if self.needs_input_grad[1] else None)


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


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


def check_float(op, *arrays):
    """All arrays float32 or float64 and of one dtype, else a TypeError naming the op.

    Integer input would silently become float64 under NumPy's promotion rules.
    """
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) == 1 and next(iter(dtypes)).kind == "f":
        return
    if len(arrays) == 1:
        raise TypeError(f"{op}: expected a float32 or float64 input, got {arrays[0].dtype}; "
                        f"convert it first (e.g. x.astype(np.float32))")
    raise TypeError(f"{op}: expected float32 or float64 inputs of one dtype, got "
                    f"{', '.join(str(a.dtype) for a in arrays)}")


class Exp(Function):
    def forward(self, x):
        check_float("exp", x)
        y = self.xp.exp(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        return gy * self.saved[0]


class Log(Function):
    def forward(self, x):
        check_float("log", x)
        self.save_for_backward(x)
        return self.xp.log(x)

    def backward(self, gy):
        return gy / self.saved[0]


class ToDevice(Function):
    def __init__(self, device):
        self.device = device

    def forward(self, x):
        self.source = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, gy):
        return backend.to_device(gy, self.source)


def add(a, b):
    """a + b with NumPy broadcasting."""
    return Add()(a, b)


def sub(a, b):
    """a - b with NumPy broadcasting."""
    return Sub()(a, b)


def mul(a, b):
    """a * b (elementwise) with NumPy broadcasting."""
    return Mul()(a, b)


def div(a, b):
    """a / b (true division) with NumPy broadcasting."""
    return Div()(a, b)


def pow(a, b):
    """a ** b with NumPy broadcasting; differentiable in both (d/db needs a > 0)."""
    return Pow()(a, b)


def neg(x):
    """-x."""
    return Neg()(x)


def exp(x):
    """e ** x, elementwise."""
    return Exp()(x)


def log(x):
    """Natural logarithm, elementwise."""
    return Log()(x)


def to_device(x, device):
    """Copy x to `device` ('cpu' | 'cuda'); the gradient is copied back."""
    return ToDevice(backend.check_device(device))(x)
