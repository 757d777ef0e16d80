"""The functional API (`import minires.ops as F`): every differentiable op of minires.

Each op is a Function subclass (CamelCase, in its submodule) plus the snake_case function
below it; only the functions are public. Imports tensor, backend and (the only importer)
kernels.
"""
from minires.ops.arith import (add, sub, mul, div, neg, pow, exp, log, clip, to_device,
                               astype)
from minires.ops.reduce import sum, mean, max, min
from minires.ops.shape import (reshape, transpose, flatten, broadcast_to, sum_to, getitem,
                               concat)
from minires.ops.linalg import matmul, linear
from minires.ops.activation import (relu, leaky_relu, sigmoid, tanh, log_softmax, softmax,
                                    cross_entropy, mse_loss, dropout)
from minires.ops.conv import conv2d, conv_transpose2d
from minires.ops.pool import max_pool2d, avg_pool2d, global_avg_pool2d
from minires.ops.norm import batch_norm
from minires.ops.residual import residual_add
from minires.ops.index import gather

from minires import kernels as _kernels


def kernel_backend(array):
    """'numba-cpu', 'numba-cuda' or 'reference': the kernels that handle arrays like `array`
    (for the profiler, which may not import kernels itself). The ops that call the kernels
    say so themselves: their Function class sets `uses_kernels = True`."""
    return _kernels.backend_name(array)


def warm_up_kernels(xp, dtype):
    """Compile (or load from Numba's cache) every kernel for arrays of module xp and dtype
    before a run starts: a fresh install's first run compiles them, which takes a while."""
    _kernels.warm_up(xp, dtype)


__all__ = [
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "clip", "to_device", "astype",
    "sum", "mean", "max", "min",
    "reshape", "transpose", "flatten", "broadcast_to", "sum_to", "getitem", "concat",
    "matmul", "linear",
    "relu", "leaky_relu", "sigmoid", "tanh", "log_softmax", "softmax", "cross_entropy",
    "mse_loss", "dropout",
    "conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "global_avg_pool2d",
    "batch_norm", "residual_add",
    "gather",
]
