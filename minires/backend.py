"""Array backends: NumPy on the CPU, CuPy on NVIDIA GPUs.

The only module inside minires/ that imports CuPy, and only lazily: `import minires` never
touches the GPU. Imports nothing from minires.
"""
import functools
import sys

import numpy as np

DEVICES = ("cpu", "cuda")


@functools.lru_cache(maxsize=None)
def _probe_cupy():
    """Return the cupy module if it imports AND a GPU is usable, else None. Never raises."""
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install raising anything
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # CUDARuntimeError and friends: no driver, no device
        pass
    return None


def cupy_available():
    """True when CuPy imports and at least one CUDA device is usable (probed once, cached)."""
    return _probe_cupy() is not None


def __getattr__(name):
    # CUPY_AVAILABLE is computed on first access, so importing minires stays quick.
    if name == "CUPY_AVAILABLE":
        return cupy_available()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_cupy_array(a):
    """True for a cupy.ndarray. Cheap: a CuPy array can only exist once cupy is imported."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def array_module(*arrays):
    """numpy, or cupy if any argument is a CuPy array (like chainer.backend.get_array_module)."""
    for a in arrays:
        if is_cupy_array(a):
            return sys.modules["cupy"]
    return np


def device_of(array):
    """'cuda' for a CuPy array, else 'cpu'."""
    return "cuda" if is_cupy_array(array) else "cpu"


def check_device(device):
    """Validate a device name; raise a clear error for unknown names or a missing GPU."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    if device == "cuda" and not cupy_available():
        raise RuntimeError(
            "device 'cuda' requested but no usable GPU was found: install CuPy and Numba CUDA "
            "with `pip install \".[cuda12]\"` (or \".[cuda13]\") on a machine with an NVIDIA GPU")
    return device


def to_device(array, device):
    """Return `array` on `device` ('cpu' or 'cuda'); the same object if already there."""
    check_device(device)
    if device_of(array) == device:
        return array
    if device == "cpu":
        return array.get()
    return _probe_cupy().asarray(array)


def scatter_add(target, indices, values):
    """target[indices] += values in place, where repeated indices ACCUMULATE (numpy.add.at
    semantics; `target[indices] += values` would keep one of the repeats). indices: anything
    target[...] accepts, typically a tuple of integer arrays. On CuPy: cupyx.scatter_add
    (atomic adds: repeats are summed in no fixed order)."""
    if is_cupy_array(target):
        import cupyx  # a GPU array exists, so CuPy is already imported: nothing to probe
        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


def gpu_name():
    """Name of CUDA device 0, or None when there is no usable GPU."""
    cupy = _probe_cupy()
    if cupy is None:
        return None
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else name


def synchronize(device):
    """Wait for queued GPU work (for timing); a no-op on the CPU."""
    if device == "cuda":
        _probe_cupy().cuda.get_current_stream().synchronize()
