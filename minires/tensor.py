"""The autograd core: Tensor, Parameter, Function, the backward engine and grad mode.

Imports only minires.backend (plus function-local imports of minires.ops for the dunders and of
minires.autograd, the backward engine, for Tensor.backward).
"""
import contextlib
import contextvars

import numpy as np

from minires import backend

_grad_enabled = contextvars.ContextVar("minires_grad_enabled", default=True)


@contextlib.contextmanager
def no_grad():
    """Context manager: ops run inside it record no graph (thread- and task-local)."""
    token = _grad_enabled.set(False)
    try:
        yield
    finally:
        _grad_enabled.reset(token)


@contextlib.contextmanager
def enable_grad():
    """Context manager: ops record a graph again, even inside `no_grad()`."""
    token = _grad_enabled.set(True)
    try:
        yield
    finally:
        _grad_enabled.reset(token)


def is_grad_enabled():
    """True unless inside `no_grad()`."""
    return _grad_enabled.get()


# An optional observer of every Function call (the profiler, anomaly detection). It wraps
# forward and backward as `observer.forward(f, arrays) -> y` and `observer.backward(f, gy) ->
# gxs`. None (the default) costs one global read per op and nothing else.
_observer = None


def set_observer(observer):
    """Install an op observer (or None to remove it); returns the previous one."""
    global _observer
    previous, _observer = _observer, observer
    return previous


def _is_float(dtype):
    return np.issubdtype(dtype, np.floating)


def _as_array(data, dtype=None, device=None):
    """Convert data (array, Tensor, scalar or nested list) to a raw array on `device`."""
    if isinstance(data, Tensor):
        data = data.data
    if backend.is_cupy_array(data):
        array = data if dtype is None else data.astype(dtype, copy=False)
    else:
        array = np.asarray(data, dtype=dtype)
        # Python floats default to float32, as in PyTorch; NumPy arrays and scalars (a full
        # reduction returns an np.float64, a subclass of float) keep their dtype.
        if dtype is None and not isinstance(data, (np.ndarray, np.generic)) \
                and array.dtype == np.float64:
            array = array.astype(np.float32)
    return array if device is None else backend.to_device(array, device)


class Tensor:
    """An array plus what autograd needs: `requires_grad`, `.grad` (raw array) and `creator`."""

    __array_ufunc__ = None  # make `ndarray + Tensor` call Tensor.__radd__, not NumPy

    def __init__(self, data, requires_grad=False, dtype=None, device=None):
        self.data = _as_array(data, dtype, device)
        if requires_grad and not _is_float(self.data.dtype):
            raise TypeError(f"requires_grad=True needs a floating-point tensor, "
                            f"got dtype {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad = None  # raw array, accumulated over backward calls
        self.creator = None  # the Function that produced this tensor (None for leaves)
        self._hooks = []

    # --- properties -----------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self.creator is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad_fn = f", grad_fn={type(self.creator).__name__}" if self.creator else ""
        req = ", requires_grad=True" if self.requires_grad and not self.creator else ""
        body = np.array2string(self.numpy(), precision=4, threshold=20, edgeitems=2)
        return (f"tensor({body}, shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device}{req}{grad_fn})")

    # --- conversion -----------------------------------------------------------------------
    def numpy(self):
        """The data as a NumPy array (copied to the host if on the GPU)."""
        return backend.to_device(self.data, "cpu")

    def item(self):
        """The value of a one-element tensor as a Python number."""
        if self.size != 1:
            raise ValueError(f"item(): tensor of shape {self.shape} has {self.size} elements, "
                             f"expected 1")
        return self.data.reshape(()).item()

    def detach(self):
        """A new leaf sharing this tensor's data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device):
        """This tensor on `device` ('cpu' | 'cuda'); differentiable, `self` if already there."""
        from minires import ops
        return self if self.device == backend.check_device(device) else ops.to_device(self,
                                                                                       device)

    def register_hook(self, fn):
        """Call `fn(grad_array)` once this tensor's gradient is fully accumulated in backward.

        A hook that returns an array replaces the gradient passed on. Hooks must not modify
        the array in place: backward may hand one array to several inputs (as Add does).
        """
        if not self.requires_grad:
            raise RuntimeError("register_hook: tensor does not require grad")
        self._hooks.append(fn)
        return fn

    # --- backward -------------------------------------------------------------------------
    def backward(self, gy=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) * gy into every leaf's `.grad` (reverse mode).

        gy defaults to ones for a one-element tensor. The graph is freed afterwards unless
        `retain_graph=True`; backward through a freed graph raises RuntimeError. Gradients are
        raw arrays: for gradients you can differentiate again use `minires.grad(...,
        create_graph=True)`.
        """
        if not self.requires_grad:
            raise RuntimeError("backward: tensor does not require grad and has no graph")
        from minires import autograd  # the engine lives there (it imports this module)
        autograd.run_backward([self], [autograd.initial_grad(self, gy, "backward", "gy")],
                              retain_graph)

    # --- operators (each calls the functional op) -----------------------------------------
    def _op(name):
        def method(self, *args, **kwargs):
            from minires import ops  # the one documented upward import
            return getattr(ops, name)(self, *args, **kwargs)
        method.__name__ = name
        return method

    def _reflected(name):
        def method(self, other):
            from minires import ops
            return getattr(ops, name)(other, self)
        return method

    __add__, __sub__, __mul__, __truediv__ = _op("add"), _op("sub"), _op("mul"), _op("div")
    __matmul__, __pow__, __neg__ = _op("matmul"), _op("pow"), _op("neg")
    __radd__, __rsub__ = _reflected("add"), _reflected("sub")
    __rmul__, __rtruediv__ = _reflected("mul"), _reflected("div")
    __rmatmul__, __rpow__ = _reflected("matmul"), _reflected("pow")
    __getitem__ = _op("getitem")
    sum, mean, max = _op("sum"), _op("mean"), _op("max")
    reshape, flatten = _op("reshape"), _op("flatten")
    relu, exp, log = _op("relu"), _op("exp"), _op("log")
    min, astype = _op("min"), _op("astype")
    del _op, _reflected

    def transpose(self, *axes):
        """Reverse or permute axes like numpy.transpose: t.transpose(), t.transpose(1, 0)."""
        from minires import ops
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return ops.transpose(self, axes or None)

    @property
    def T(self):
        return self.transpose()


class Parameter(Tensor):
    """A trainable leaf tensor (requires_grad=True), found by Module.parameters()."""

    def __init__(self, data, dtype=None, device=None):
        super().__init__(data, requires_grad=True, dtype=dtype, device=device)


class Function:
    """One differentiable op. Subclasses implement forward/backward on raw arrays.

    `forward(*arrays) -> array` and `backward(gy) -> one gradient (or None) per input`;
    `backward_graph(gy)`, the same on Tensors, for higher-order gradients (minires.grad).
    `self.xp` is the array module; `self.needs_input_grad[i]` says if input i needs a gradient.
    State for backward is saved with `save_for_backward(*arrays)` and read from `self.saved`.
    A Function holds its inputs, never its output, so graphs have no reference cycles.
    """

    inputs = ()
    saved = ()
    freed = False
    uses_kernels = False  # True on ops that run minires.kernels (the profiler names the backend)

    def __call__(self, *inputs):
        tensors = _as_tensors(inputs, type(self).__name__)
        self.xp = backend.array_module(*(t.data for t in tensors))
        self.needs_input_grad = tuple(t.requires_grad for t in tensors)
        arrays = tuple(t.data for t in tensors)
        y = self.forward(*arrays) if _observer is None else _observer.forward(self, arrays)
        record = is_grad_enabled() and any(self.needs_input_grad)
        out = Tensor(y, requires_grad=record)
        if record:
            out.creator = self
            self.inputs = tuple(tensors)
        else:
            self.saved = ()  # nothing will call backward: drop saved state now
        return out

    def save_for_backward(self, *arrays):
        self.saved = arrays

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError

    def backward_graph(self, gy):
        """The backward pass as a graph, for create_graph=True: gy is a Tensor; returns one
        Tensor (or None) per input, computed with minires ops from `self.inputs` (Tensors) and
        constants (masks, indices) from `self.saved`, so it can be differentiated again."""
        raise NotImplementedError(f"{type(self).__name__} does not support create_graph=True "
                                  f"(no backward_graph): its gradient cannot be differentiated")

    def release(self):
        """Drop saved arrays and input links (after backward, unless retain_graph)."""
        self.saved, self.inputs, self.freed = (), (), True


def _as_tensors(inputs, op_name):
    """Wrap raw arrays and Python scalars as constant Tensors; reject mixed devices.

    Python scalars take the floating dtype of the other inputs (as in PyTorch).
    """
    like = next((x for x in inputs if isinstance(x, Tensor) or hasattr(x, "shape")
                 and not isinstance(x, np.number)), None)
    dtype = like.dtype if like is not None and _is_float(like.dtype) else None
    device = backend.device_of(like.data if isinstance(like, Tensor) else like)
    tensors = []
    for x in inputs:
        if isinstance(x, Tensor):
            tensors.append(x)
        elif isinstance(x, (int, float, bool, np.number)):  # scalars follow the tensors
            tensors.append(Tensor(_as_array(x, dtype, device)))
        else:
            tensors.append(Tensor(x))
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        detail = ", ".join(f"{t.shape} on {t.device}" for t in tensors)
        raise ValueError(f"{op_name}: inputs are on different devices ({detail}); "
                         f"move them to one device with .to()")
    return tensors


# --- constructors --------------------------------------------------------------------------
def tensor(data, dtype=None, requires_grad=False, device="cpu"):
    """A new Tensor from an array, scalar or nested list (Python floats become float32)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


def _shape(shape):
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


def zeros(*shape, dtype=np.float32, requires_grad=False, device="cpu"):
    """A tensor of zeros: zeros(2, 3) or zeros((2, 3))."""
    return Tensor(np.zeros(_shape(shape), dtype), requires_grad, device=device)


def ones(*shape, dtype=np.float32, requires_grad=False, device="cpu"):
    """A tensor of ones: ones(2, 3) or ones((2, 3))."""
    return Tensor(np.ones(_shape(shape), dtype), requires_grad, device=device)


def randn(*shape, rng=None, dtype=np.float32, requires_grad=False, device="cpu"):
    """Standard normal samples drawn on the host from `rng` (a numpy Generator or a seed)."""
    rng = np.random.default_rng(rng)
    return Tensor(rng.standard_normal(_shape(shape)).astype(dtype), requires_grad,
                  device=device)
