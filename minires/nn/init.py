"""Weight initialisation on the host from an explicit numpy Generator (CPU and GPU runs then
start from identical weights). Imports numpy and minires.tensor only.
"""
import math

import numpy as np

from minires.tensor import Parameter

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_rng(rng):
    """A numpy Generator from a Generator (returned as is, so draws advance it), an int seed,
    or None (fresh OS entropy: not reproducible)."""
    if rng is not None and not isinstance(rng, (np.random.Generator, int, np.integer)):
        raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got "
                        f"{type(rng).__name__}")
    return np.random.default_rng(rng)


def float_dtype(dtype, layer):
    """np.dtype(float32 | float64), else a TypeError naming the layer."""
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: dtype must be float32 or float64, got {dt}")
    return dt


def kaiming_normal(shape, fan_in, rng, dtype=np.float32):
    """Parameter of `shape` drawn from N(0, 2 / fan_in) (He et al., ReLU gain sqrt(2)).

    Drawn in float64 then rounded, so float32 and float64 layers from one seed agree.
    """
    std = math.sqrt(2.0 / fan_in)
    return Parameter((rng.standard_normal(shape) * std).astype(dtype))


def zeros(shape, dtype=np.float32):
    """Parameter of zeros (biases, ReZero's alpha)."""
    return Parameter(np.zeros(shape, dtype=dtype))


def constant(shape, value, dtype=np.float32):
    """Parameter filled with `value` (BatchNorm's scale, Highway's gate bias)."""
    return Parameter(np.full(shape, value, dtype=dtype))
