"""Reductions: sum, mean, max over an axis (int, tuple or None) with keepdims.

Imports minires.tensor.
"""
import builtins  # this module defines sum and max, which shadow the builtins

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


def _expand(g, shape, axes):
    """Re-insert reduced axes (size 1) so g broadcasts against the input shape."""
    kept = [1 if i in axes else n for i, n in enumerate(shape)]
    return g.reshape(kept)


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


def mean(x, axis=None, keepdims=False):
    """Arithmetic mean over `axis` (int, tuple or None for all), like numpy.mean."""
    return Mean(axis, keepdims)(x)


class Max(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axes = _normalize_axis("max", self.axis, x.shape)
        if x.size == 0:
            raise ValueError(f"max: cannot reduce an empty array of shape {x.shape}")
        y = x.max(axis=self.axes, keepdims=True)
        self.save_for_backward(x, y)
        return y if self.keepdims else y.reshape(
            [n for i, n in enumerate(x.shape) if i not in self.axes])

    def backward(self, gy):
        x, y = self.saved
        # Ties share the gradient equally (the subgradient PyTorch uses for full reductions).
        mask = (x == y).astype(x.dtype)
        mask /= mask.sum(axis=self.axes, keepdims=True)
        return mask * _expand(gy, x.shape, self.axes)


def max(x, axis=None, keepdims=False):
    """Maximum over `axis`; the gradient is split equally among tied maxima."""
    return Max(axis, keepdims)(x)
