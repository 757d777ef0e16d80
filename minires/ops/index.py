"""Indexing by integer arrays: gather (torch.gather), and its adjoint, the scatter-add into
zeros, as an op, so gradients of any order stay in this module: gather's gradient is a
scatter-add of gy (repeated indices accumulate) whose gradient is the gather again.

Imports minires.tensor, minires.backend (scatter_add, devices) and minires.ops._args.
"""
import numbers

from minires import backend
from minires.ops._args import raw
from minires.tensor import Function


def _positions(xp, index, dim):
    """The fancy-index key that reads x[..., index[i, j, k], ...] (index at axis `dim`) for
    every element of index: index itself on axis dim, a broadcastable arange on every other
    axis d (reaching index.shape[d], which may be less than x.shape[d])."""
    ndim = index.ndim
    return tuple(index if d == dim else xp.arange(n).reshape((-1,) + (1,) * (ndim - d - 1))
                 for d, n in enumerate(index.shape))


def _check(x, dim, index):
    """dim as a non-negative int, once index (raw array) is checked against x (raw array),
    else an error naming gather and the values involved."""
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"gather: dim {dim} out of range for x of shape {x.shape} "
                         f"(expected {-x.ndim} <= dim < {x.ndim})")
    dim %= x.ndim
    if index.dtype.kind not in "iu":
        raise TypeError(f"gather: index must be an integer array, got {index.dtype}")
    if backend.device_of(index) != backend.device_of(x):
        raise ValueError(f"gather: index is on {backend.device_of(index)} but x is on "
                         f"{backend.device_of(x)}; move one with .to()")
    if index.ndim != x.ndim:
        raise ValueError(f"gather: index must have x's number of dimensions, got index shape "
                         f"{index.shape} for x shape {x.shape}")
    for d, (i, n) in enumerate(zip(index.shape, x.shape)):
        if d != dim and i > n:
            raise ValueError(f"gather: index shape {index.shape} is larger than x shape "
                             f"{x.shape} along dim {d} (only dim {dim}, the gathered one, "
                             f"may be)")
    if index.size:  # one read of both extremes (a device sync on the GPU), no copy
        lo, hi, n = int(index.min()), int(index.max()), x.shape[dim]
        if lo < 0 or hi >= n:
            raise IndexError(f"gather: index values must be in [0, {n}) (x.shape[{dim}] = "
                             f"{n}; negative indices are refused, as in PyTorch), got values "
                             f"in [{lo}, {hi}]")
    return dim


def _scatter_add(xp, g, index, dim, shape):
    """zeros(shape) with each g[i, j, k] added at gather's position of index[i, j, k]."""
    gx = xp.zeros(shape, dtype=g.dtype)
    backend.scatter_add(gx, _positions(xp, index, dim), g)
    return gx


class Gather(Function):
    def __init__(self, dim, index):
        self.dim = dim
        self.save_for_backward(index)  # a constant: __call__ drops it when nothing records

    def forward(self, x):
        index = self.saved[0]
        self.dim, self.x_shape = _check(x, self.dim, index), x.shape
        return x[_positions(self.xp, index, self.dim)]

    def backward(self, gy):
        return _scatter_add(self.xp, gy, self.saved[0], self.dim, self.x_shape)

    def backward_graph(self, gy):
        return ScatterAdd(self.dim, self.saved[0], self.x_shape)(gy)


def gather(x, dim, index):
    """Values of x along axis `dim` picked by index, as torch.gather: for a 3-d x,
    out[i][j][k] = x[index[i][j][k]][j][k] (dim 0), x[i][index[i][j][k]][k] (dim 1), ...

    x: any shape; dim: an int, negative counts from the end; index: an integer array,
    Tensor or nested list on x's device, with x's ndim, index.shape[d] <= x.shape[d] for
    d != dim and values in [0, x.shape[dim]). Returns index's shape. The gradient adds gy
    into zeros like x at the same positions: repeated indices accumulate.
    """
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"gather: dim must be an int, got {type(dim).__name__}")
    index = raw(index)
    if not hasattr(index, "dtype"):  # a list: made on x's device
        index = backend.array_module(raw(x)).asarray(index)
    return Gather(int(dim), index)(x)


class ScatterAdd(Function):
    """zeros(shape) with g (index's shape) added at gather's positions, repeated indices
    accumulating: gather's gradient as an op, whose own gradient is gather again. The index
    was checked by the gather that made this op."""

    def __init__(self, dim, index, shape):
        self.dim, self.shape = dim, shape
        self.save_for_backward(index)

    def forward(self, g):
        return _scatter_add(self.xp, g, self.saved[0], self.dim, self.shape)

    def backward(self, gy):
        return gy[_positions(self.xp, self.saved[0], self.dim)]

    def backward_graph(self, gy):
        return Gather(self.dim, self.saved[0])(gy)
