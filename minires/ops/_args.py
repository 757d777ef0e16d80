"""Argument helpers shared by the ops modules and the nn layers: dtype and pair checks, and
`unbroadcast`, which sums a gradient back to the shape of a broadcast argument.

Imports minires.tensor only. Private: the public surface is the op functions.
"""
from minires.tensor import Tensor


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


def pair(op, name, v):
    """An int or a pair of ints as a pair: 1 -> (1, 1); else a ValueError naming op and name."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return tuple(v)
    raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")


def raw(a):
    """The array inside a Tensor; anything else (an array, None) as it is."""
    return a.data if isinstance(a, Tensor) else a


def relu_masked(gy, y):
    """gy where y > 0, else 0: a ReLU's backward for backward_graph (gy a Tensor, y the raw
    output). The mask is piecewise constant in the input, so it enters the graph as a
    constant."""
    return gy * (y > 0).astype(y.dtype)


def unbroadcast(g, shape):
    """Sum g over the axes that broadcasting added or stretched, so it has `shape`."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and g.shape[i + lead] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)
