"""Numba CPU kernels behind kernels/__init__.py: the same names and semantics as
kernels/reference.py, for float32 and float64 NumPy arrays (inputs may be non-contiguous;
they are read, never modified).

One module per family, named by kernels/registry.py: conv (its @njit loops in conv_loops,
register tiles in conv_simd, vector copies in conv_copy, its thread team in conv_threads),
elementwise (ReLU, the fused residual add), pooling, norm (batch norm, optionally +
ReLU); memory holds scratch and output reuse, threads and the launch lock. Each registered
kernel is imported here from its family's module, so a new kernel or family needs no edit here.
"""
import importlib

from .. import registry
from .memory import launch, outputs, scratch, threads  # noqa: F401 (pools, for tests)

for _kernel in registry.KERNELS:
    globals()[_kernel.name] = getattr(importlib.import_module(f".{_kernel.family}", __name__),
                                      _kernel.name)
del _kernel
__all__ = list(registry.NAMES)
