"""Reductions: sum, mean, max and min over an axis (int, tuple or None) with keepdims.

Imports minires.tensor and minires.ops.shape (backward_graph broadcasts with shape ops).
"""
import builtins  # this module defines sum, max and min, which shadow the builtins

from minires.ops.shape import broadcast_to, reshape
from minires.tensor import Function


def _normalize_axis(op, axis, shape):
    """axis as a sorted tuple of non-negative ints (all axes for None)."""
    ndim = len(shape)
    if axis is None:
        return tuple(range(ndim))
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)  # np.int64 is an int too
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"{op}: axis {a} out of range for an array of shape {shape}")
    return tuple(sorted(int(a) % builtins.max(ndim, 1) for a in axes))


def _kept(shape, axes):
    """The reduced shape with the reduced axes kept as size 1."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _expand(g, shape, axes):
    """Re-insert reduced axes (size 1) so g broadcasts against the input shape."""
    return g.reshape(_kept(shape, axes))


class Sum(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.shape = x.shape
        op = type(self).__name__.lower()  # "sum", or "mean" for the subclass
        self.axes = _normalize_axis(op, self.axis, x.shape)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        return self.xp.broadcast_to(_expand(gy, self.shape, self.axes), self.shape).copy()

    def backward_graph(self, gy):
        return broadcast_to(reshape(gy, _kept(self.shape, self.axes)), self.shape)


def sum(x, axis=None, keepdims=False):
    """Sum over `axis` (int, tuple or None for all), like numpy.sum."""
    return Sum(axis, keepdims)(x)


class Mean(Sum):
    def forward(self, x):
        y = super().forward(x)
        self.count = builtins.max(1, x.size // builtins.max(1, y.size)) if x.size else 1
        return y / x.dtype.type(self.count) if x.dtype.kind == "f" else y / self.count

    def backward(self, gy):
        return super().backward(gy / self.count)

    def backward_graph(self, gy):
        return super().backward_graph(gy / self.count)


def mean(x, axis=None, keepdims=False):
    """Arithmetic mean over `axis` (int, tuple or None for all), like numpy.mean."""
    return Mean(axis, keepdims)(x)


class Max(Function):
    """max (or, with `lowest`, min) over axes; the gradient is split equally among ties."""

    def __init__(self, axis, keepdims, lowest=False):
        self.axis, self.keepdims, self.lowest = axis, keepdims, lowest

    def forward(self, x):
        op = "min" if self.lowest else "max"
        self.axes = _normalize_axis(op, self.axis, x.shape)
        if x.size == 0:
            raise ValueError(f"{op}: cannot reduce an empty array of shape {x.shape}")
        y = (x.min if self.lowest else x.max)(axis=self.axes, keepdims=True)
        self.save_for_backward(x, y)
        return y if self.keepdims else y.reshape(
            [n for i, n in enumerate(x.shape) if i not in self.axes])

    def _share(self):
        """Each element's share of the gradient: 1/(number of ties) at an extremum, else 0.
        Ties share equally (the subgradient PyTorch uses for full reductions)."""
        x, y = self.saved
        share = (x == y).astype(x.dtype)
        share /= share.sum(axis=self.axes, keepdims=True)
        return share

    def backward(self, gy):
        share = self._share()
        return share * _expand(gy, share.shape, self.axes)

    def backward_graph(self, gy):
        share = self._share()  # piecewise constant in x: a constant of the gradient graph
        return reshape(gy, _kept(share.shape, self.axes)) * share


def max(x, axis=None, keepdims=False):
    """Maximum over `axis`; the gradient is split equally among tied maxima."""
    return Max(axis, keepdims)(x)


class Min(Max):
    def __init__(self, axis, keepdims):
        super().__init__(axis, keepdims, lowest=True)


def min(x, axis=None, keepdims=False):
    """Minimum over `axis`, like numpy.min; the gradient is split equally among tied minima."""
    return Min(axis, keepdims)(x)
