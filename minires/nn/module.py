"""Module (parameter discovery, train/eval, device moves, state dicts, repr) and Sequential.

Imports minires.tensor and minires.backend only.
"""
import collections

from minires import backend
from minires.tensor import Parameter, Tensor

IncompatibleKeys = collections.namedtuple("IncompatibleKeys", "missing unexpected")


class Module:
    """Base class of every layer: owns Parameters, sub-Modules and buffers; forward() computes.

    Parameters and sub-Modules are found by type in `vars(self)`, in insertion (definition)
    order, recursing into sub-Modules and into lists/tuples of Modules or Parameters, so the
    order is the same in every process. Buffers (raw arrays such as BatchNorm's running
    statistics) are registered explicitly with `register_buffer` and saved in `state_dict`.
    Subclasses call `super().__init__()` first.
    """

    def __init__(self):
        self.training = True
        self._buffer_names = []

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not implement forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- discovery --------------------------------------------------------------------------
    def register_buffer(self, name, array):
        """Store raw array (or None) as attribute `name` and include it in state_dict()."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"register_buffer: name must be an identifier, got {name!r}")
        if isinstance(array, Tensor):
            raise TypeError(f"register_buffer({name!r}): expected a raw array or None, got a "
                            f"Tensor (use Parameter for trainable values)")
        if name not in self._buffer_names:
            self._buffer_names.append(name)
        setattr(self, name, array)

    def named_children(self):
        """(name, Module) for direct sub-Modules, lists/tuples entries named 'attr.i'."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def children(self):
        return (m for _, m in self.named_children())

    def named_modules(self, prefix=""):
        """(dotted name, Module) for self and every sub-Module, pre-order, each module once."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            kids = [(_join(name, n), m) for n, m in module.named_children()]
            stack.extend(reversed(kids))

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) in definition order; a shared Parameter appears once."""
        seen = set()
        for name, p in self._walk_parameters(prefix, set()):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def _walk_parameters(self, prefix, seen_modules):
        seen_modules.add(id(self))
        for name, value in vars(self).items():
            items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
            for i, item in items:
                full = _join(prefix, name if i is None else f"{name}.{i}")
                if isinstance(item, Parameter):
                    yield full, item
                elif isinstance(item, Module) and id(item) not in seen_modules:
                    yield from item._walk_parameters(full, seen_modules)

    def parameters(self):
        """The Parameters of this module and its sub-Modules, as a list in definition order."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        """(dotted name, raw array) for every registered buffer that is not None."""
        for mod_name, module in self.named_modules(prefix):
            for name in getattr(module, "_buffer_names", ()):
                array = getattr(module, name)
                if array is not None:
                    yield _join(mod_name, name), array

    # --- modes and devices ------------------------------------------------------------------
    def train(self, mode=True):
        """Set `.training = mode` on this module and every sub-Module; returns self."""
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self):
        """Same as train(False)."""
        return self.train(False)

    def zero_grad(self):
        """Drop every parameter's gradient (set it to None)."""
        for p in self.parameters():
            p.grad = None

    def to(self, device):
        """Move every parameter (data and grad) and buffer to device ('cpu' | 'cuda') in place.

        The Parameter objects stay the same, so an optimizer built earlier still holds them;
        create the optimizer's state (its first step) after moving. Returns self.
        """
        backend.check_device(device)
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        for _, module in self.named_modules():
            for name in getattr(module, "_buffer_names", ()):
                array = getattr(module, name)
                if array is not None:
                    setattr(module, name, backend.to_device(array, device))
        return self

    # --- state dicts ------------------------------------------------------------------------
    def _state_items(self):
        """name -> the live array (parameter data or buffer), parameters first."""
        items = {name: p.data for name, p in self.named_parameters()}
        items.update(self.named_buffers())
        return items

    def state_dict(self):
        """An ordered dict name -> copy of each parameter's data and each buffer (same device)."""
        return {name: a.copy() for name, a in self._state_items().items()}

    def load_state_dict(self, state, strict=True):
        """Copy arrays from `state` into the parameters and buffers, in place.

        Every entry is validated first (keys when strict, then shape and dtype of each
        matching entry); on any error a ValueError names the key and nothing is changed.
        Values may be NumPy or CuPy arrays or Tensors; each lands on its target's device.
        Returns IncompatibleKeys(missing, unexpected) (both empty when strict).
        """
        own = self._state_items()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict({type(self).__name__}): missing keys "
                             f"{missing}, unexpected keys {unexpected}; nothing was loaded")
        updates = []
        for key, target in own.items():
            if key in state:
                updates.append((target, _checked_value(key, state[key], target)))
        for target, value in updates:
            target[...] = value
        return IncompatibleKeys(missing, unexpected)

    # --- repr -------------------------------------------------------------------------------
    def extra_repr(self):
        """The text inside this module's parentheses in repr (its configuration)."""
        return ""

    def __repr__(self):
        name, extra = type(self).__name__, self.extra_repr()
        kids = list(self.named_children())
        if not kids:
            return f"{name}({extra})"
        lines = [f"  {extra}"] if extra else []
        for key, m in kids:
            body = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({key}): {body}")
        return f"{name}(\n" + "\n".join(lines) + "\n)"


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _checked_value(key, value, target):
    """value as a raw array on target's device, after shape and dtype checks (ValueError)."""
    raw = value.data if isinstance(value, Tensor) else value
    if not hasattr(raw, "shape") or not hasattr(raw, "dtype"):
        raise ValueError(f"load_state_dict: {key!r} must be an array, got {type(raw).__name__}; "
                         f"nothing was loaded")
    if tuple(raw.shape) != tuple(target.shape):
        raise ValueError(f"load_state_dict: {key!r} has shape {tuple(raw.shape)}, the model "
                         f"expects {tuple(target.shape)}; nothing was loaded")
    if raw.dtype != target.dtype:
        raise ValueError(f"load_state_dict: {key!r} has dtype {raw.dtype}, the model expects "
                         f"{target.dtype}; nothing was loaded")
    return backend.to_device(raw, backend.device_of(target))


def _fusable(module):
    """True if module.forward_relu(x) is relu(module(x)): the class that defines forward_relu
    also defines the forward in use (a subclass overriding forward alone, or a forward
    replaced on the instance, is never fused)."""
    owner = next((k for k in type(module).__mro__ if "forward_relu" in vars(k)), None)
    return (owner is not None and type(module).forward is vars(owner).get("forward")
            and "forward" not in vars(module))


class Sequential(Module):
    """Modules applied in order: Sequential(a, b, c)(x) == c(b(a(x))). Indexable, iterable.

    Sub-Modules are stored as attributes '0', '1', ... so parameter names read '0.weight'.

    A module with a `forward_relu` method (Conv2d, BatchNorm2d) followed by exactly an
    nn.ReLU runs as one fused op, `module.forward_relu(x)`, and the ReLU is skipped: same
    values and gradients, one pass less over the activation each way. Set `fuse = False`
    (on the class or an instance) to run every module by itself; a module whose forward is
    replaced on the instance (a tracing or hooking wrapper) or overridden by a subclass is
    never fused, so it still runs.
    """

    fuse = True

    def __init__(self, *modules):
        super().__init__()
        self._len = 0
        for m in modules:
            self.append(m)

    def append(self, module):
        """Add `module` at the end; returns self."""
        if not isinstance(module, Module):
            raise TypeError(f"Sequential: expected a Module, got {type(module).__name__}")
        setattr(self, str(self._len), module)
        self._len += 1
        return self

    def forward(self, x):
        from minires.nn.layers import ReLU  # (layers imports this module)
        modules, i = list(self), 0
        while i < len(modules):
            m = modules[i]
            after = modules[i + 1] if i + 1 < len(modules) else None
            if (self.fuse and type(after) is ReLU and "forward" not in vars(after)
                    and _fusable(m)):
                x = m.forward_relu(x)
                i += 2
            else:
                x = m(x)
                i += 1
        return x

    def __len__(self):
        return self._len

    def __iter__(self):
        return (getattr(self, str(i)) for i in range(self._len))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*list(self)[index])
        if not isinstance(index, int):
            raise TypeError(f"Sequential indices must be ints or slices, got "
                            f"{type(index).__name__}")
        if not -self._len <= index < self._len:
            raise IndexError(f"Sequential index {index} out of range for length {self._len}")
        return getattr(self, str(index % self._len))
