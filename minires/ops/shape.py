"""Shape ops: reshape, transpose, flatten, broadcast_to, sum_to, getitem (basic indexing),
concat. Each backward_graph is another shape op (broadcast_to <-> sum_to, getitem <-> its
scatter), so gradients of any order stay in this module.

Imports minires.tensor and minires.ops._args (for unbroadcast).
"""
import itertools
import numbers

import numpy as np

from minires.ops._args import unbroadcast
from minires.tensor import Function


class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape array of shape {x.shape} "
                             f"({x.size} elements) into shape {self.shape}") from None

    def backward(self, gy):
        return gy.reshape(self.in_shape)

    def backward_graph(self, gy):
        return reshape(gy, self.in_shape)


def reshape(x, *shape):
    """View x with a new shape (one -1 allowed): reshape(x, 2, 3) or reshape(x, (2, 3))."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Reshape(shape)(x)


def flatten(x, start_dim=1):
    """Merge the axes from start_dim on: (N, C, H, W) -> (N, C*H*W) by default."""
    shape = getattr(x, "shape", ())
    return reshape(x, tuple(shape[:start_dim]) + (-1,))


class Transpose(Function):
    def __init__(self, axes):
        self.axes = axes

    def forward(self, x):
        axes = tuple(reversed(range(x.ndim))) if self.axes is None else tuple(self.axes)
        in_range = all(-x.ndim <= a < x.ndim for a in axes)  # % alone would wrap 5 to 1
        if not in_range or sorted(a % max(x.ndim, 1) for a in axes) != list(range(x.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of the "
                             f"{x.ndim} axes of shape {x.shape}")
        self.axes = tuple(a % x.ndim for a in axes)
        return x.transpose(self.axes)

    def _inverse(self):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a] = i
        return inverse

    def backward(self, gy):
        return gy.transpose(self._inverse())

    def backward_graph(self, gy):
        return transpose(gy, self._inverse())


def transpose(x, axes=None):
    """Reverse the axes (axes=None) or permute them, like numpy.transpose."""
    return Transpose(axes)(x)


class BroadcastTo(Function):
    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        try:
            return self.xp.broadcast_to(x, self.shape)
        except ValueError:
            raise ValueError(f"broadcast_to: cannot broadcast shape {x.shape} to "
                             f"{self.shape}") from None

    def backward(self, gy):
        return unbroadcast(gy, self.in_shape)

    def backward_graph(self, gy):
        return sum_to(gy, self.in_shape)


def broadcast_to(x, shape):
    """Broadcast x to `shape` (NumPy rules); the gradient is summed back."""
    return BroadcastTo(shape)(x)


class SumTo(Function):
    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        try:
            fits = np.broadcast_shapes(self.shape, x.shape) == x.shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"sum_to: shape {self.shape} does not broadcast to the input's "
                             f"shape {x.shape}")
        return unbroadcast(x, self.shape)

    def backward(self, gy):
        return self.xp.ascontiguousarray(self.xp.broadcast_to(gy, self.in_shape))

    def backward_graph(self, gy):
        return broadcast_to(gy, self.in_shape)


def sum_to(x, shape):
    """Sum x over the axes that broadcasting `shape` to x.shape would add or stretch, so the
    result has `shape`: the adjoint of broadcast_to (and the gradient of a broadcast input)."""
    shape = tuple(shape)
    return x if tuple(getattr(x, "shape", ())) == shape else SumTo(shape)(x)


def _check_basic_key(key):
    keys = key if isinstance(key, tuple) else (key,)
    for k in keys:
        # numbers.Integral: NumPy integer scalars (np.int64 from a loop) are basic too
        if not (k is None or k is Ellipsis or isinstance(k, (numbers.Integral, slice))):
            raise TypeError(f"getitem: only basic indexing (ints, slices, None, ...) is "
                            f"supported, got {type(k).__name__} in key {key!r}")


class GetItem(Function):
    def __init__(self, key):
        _check_basic_key(key)
        self.key = key

    def forward(self, x):
        self.in_shape, self.dtype = x.shape, x.dtype
        try:
            return x[self.key]
        except IndexError as e:
            raise IndexError(f"getitem: {e} (key {self.key!r}, shape {x.shape})") from None

    def backward(self, gy):
        return _scatter(self.xp, gy, self.key, self.in_shape)

    def backward_graph(self, gy):
        return SetItem(self.key, self.in_shape)(gy)


def getitem(x, key):
    """x[key] with basic indexing (ints, slices, None, Ellipsis)."""
    return GetItem(key)(x)


def _scatter(xp, g, key, shape):
    gx = xp.zeros(shape, dtype=g.dtype)
    gx[key] = g  # basic indexing never repeats an element: assignment suffices
    return gx


class SetItem(Function):
    """zeros(shape) with g written at [key]: getitem's gradient as an op (its own gradient is
    getitem again), for create_graph."""

    def __init__(self, key, shape):
        self.key, self.shape = key, shape

    def forward(self, g):
        return _scatter(self.xp, g, self.key, self.shape)

    def backward(self, gy):
        return gy[self.key]

    def backward_graph(self, gy):
        return getitem(gy, self.key)


class Concat(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        ndims = {x.ndim for x in xs}
        if not -xs[0].ndim <= self.axis < xs[0].ndim:
            raise ValueError(f"concat: axis {self.axis} out of range for shapes "
                             f"{[x.shape for x in xs]}")
        rest = {x.shape[:self.axis % x.ndim] + x.shape[self.axis % x.ndim + 1:] for x in xs}
        if len(ndims) != 1 or len(rest) != 1:
            raise ValueError(f"concat: shapes {[x.shape for x in xs]} must match except "
                             f"along axis {self.axis}")
        self.sizes = [x.shape[self.axis] for x in xs]
        return self.xp.concatenate(xs, axis=self.axis)

    def backward(self, gy):
        bounds = list(itertools.accumulate(self.sizes[:-1]))  # on the host: no device copy
        parts = self.xp.split(gy, bounds, axis=self.axis)
        return tuple(p if need else None for p, need in zip(parts, self.needs_input_grad))

    def backward_graph(self, gy):
        lead = (slice(None),) * (self.axis % gy.ndim)
        starts = [0] + list(itertools.accumulate(self.sizes))
        return tuple(getitem(gy, lead + (slice(a, b),)) if need else None
                     for a, b, need in zip(starts, starts[1:], self.needs_input_grad))


def concat(tensors, axis=0):
    """Join tensors along an existing axis, like numpy.concatenate."""
    if not tensors:
        raise ValueError("concat: needs at least one tensor")
    return Concat(axis)(*tensors)
