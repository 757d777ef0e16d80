"""Numba CUDA kernels for conv2d, relu, residual_add, max_pool2d and batch_norm: kernels.cpu's
names and kernels/reference.py's semantics. CuPy arrays in and out, no copies, on CuPy's current
stream; NumPy arrays only under the simulator (NUMBA_ENABLE_CUDASIM=1). Reductions are fixed
trees (no atomics): deterministic.

One module per family named by kernels/registry.py (conv, elementwise, pooling, norm), each
registered kernel imported here from its family's module, so a new kernel or family needs no
edit here; optim holds the multi-tensor SGD and Adam updates; _device the shared device
helpers, the launch plumbing and the launch counter.
"""
import importlib

from .. import registry
from . import optim
from ._device import SIMULATOR  # noqa: F401 (tests and callers read it)
from ._device import count_launches, launch_counts, reset_launch_counts  # noqa: F401
from .optim import adam_update, sgd_update  # noqa: F401 (multi-tensor: CUDA only, not in __all__)

_FAMILIES = [importlib.import_module(f".{family}", __name__) for family in registry.FAMILIES]
for _kernel in registry.KERNELS:
    globals()[_kernel.name] = getattr(_FAMILIES[registry.FAMILIES.index(_kernel.family)],
                                      _kernel.name)
del _kernel
__all__ = list(registry.NAMES)

# every @cuda.jit kernel, for the PTX compile tests
KERNELS = tuple(getattr(m, name) for m in (*_FAMILIES, optim)
                for name in sorted(vars(m)) if name.endswith("_kernel"))
