"""Helpers shared by the kernel modules: device-array detection and lazy CuPy access.

The only module in kernels/ that imports CuPy, and only when asked. Never imports minires.
"""
import numpy as np


def is_device_array(a):
    """True for a GPU array (CuPy, or anything exposing __cuda_array_interface__)."""
    return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)


def array_module(a):
    """numpy for host arrays, cupy for device arrays."""
    if is_device_array(a):
        import cupy  # lazily: only reached when a CuPy array already exists
        return cupy
    return np
