"""Numba CPU kernels behind kernels/__init__.py: the same names and semantics as
kernels/reference.py, for float32 and float64 NumPy arrays (inputs may be non-contiguous;
they are read, never modified).

One module per family: conv (with its @njit loops in conv_loops), elementwise (ReLU, the fused
residual add), pooling, norm (batch norm, optionally + ReLU), memory (scratch and output reuse,
threads, the launch lock).
"""
from .conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from .elementwise import (relu_backward, relu_forward, residual_add_backward,
                          residual_add_forward)
from .memory import launch, outputs, scratch, threads  # noqa: F401 (pools, for tests)
from .norm import batch_norm_backward, batch_norm_forward
from .pooling import max_pool2d_backward, max_pool2d_forward

__all__ = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
           "relu_forward", "relu_backward", "residual_add_forward", "residual_add_backward",
           "max_pool2d_forward", "max_pool2d_backward", "batch_norm_forward",
           "batch_norm_backward"]
