"""Numba CUDA kernels for conv2d, relu, residual_add, max_pool2d and batch_norm: kernels.cpu's
names and kernels/reference.py's semantics. CuPy arrays in and out, no copies, on CuPy's current
stream; NumPy arrays only under the simulator (NUMBA_ENABLE_CUDASIM=1). Reductions are fixed
trees (no atomics): deterministic.

One module per family (conv, elementwise, pooling, norm; optim: the multi-tensor SGD update);
_device holds the shared device helpers, the launch plumbing and the launch counter.
"""
from . import conv, elementwise, norm, optim, pooling
from ._device import SIMULATOR  # noqa: F401 (tests and callers read it)
from ._device import count_launches, launch_counts, reset_launch_counts  # noqa: F401
from .optim import adam_update, sgd_update  # noqa: F401 (multi-tensor: CUDA only, not in __all__)
from .conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from .elementwise import (relu_backward, relu_forward, residual_add_backward,
                          residual_add_forward)
from .norm import batch_norm_backward, batch_norm_forward
from .pooling import max_pool2d_backward, max_pool2d_forward

__all__ = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
           "relu_forward", "relu_backward", "residual_add_forward", "residual_add_backward",
           "max_pool2d_forward", "max_pool2d_backward", "batch_norm_forward",
           "batch_norm_backward"]

# every @cuda.jit kernel, for the PTX compile tests
KERNELS = tuple(getattr(m, name) for m in (conv, elementwise, norm, optim, pooling)
                for name in sorted(vars(m)) if name.endswith("_kernel"))
