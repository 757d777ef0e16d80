"""Pooling: max_pool2d (kernel dispatch), avg_pool2d and global_avg_pool2d (plain xp).

Imports minires.tensor, minires.ops._args (argument checks) and kernels. Notation as in
minires/ops/conv.py; windows do not pad and the output size is floored, as in PyTorch.
"""
from minires import kernels
from minires.ops._args import check_float, pair
from minires.tensor import Function


def _check_input(op, x, kernel):
    if x.ndim != 4:
        raise ValueError(f"{op}: expected x (N, C, H, W), got shape {x.shape}")
    check_float(op, x)
    if kernel[0] > x.shape[2] or kernel[1] > x.shape[3]:
        raise ValueError(f"{op}: kernel {kernel} larger than input {x.shape[2:]}")


class MaxPool2d(Function):
    uses_kernels = True

    def __init__(self, kernel, stride):
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        _check_input("max_pool2d", x, self.kernel)
        y, argmax = kernels.max_pool2d_forward(x, self.kernel, self.stride)
        self.x_shape = x.shape
        self.save_for_backward(argmax)  # the argmax indices, not x
        return y

    def backward(self, gy):
        return kernels.max_pool2d_backward(gy, self.saved[0], self.x_shape, self.kernel,
                                           self.stride)


def max_pool2d(x, kernel_size, stride=None):
    """Max over KH x KW windows: (N, C, H, W) -> (N, C, OH, OW); stride defaults to the
    kernel size. The gradient of each window goes to its (first) maximum."""
    kernel = pair("max_pool2d", "kernel_size", kernel_size)
    stride = kernel if stride is None else pair("max_pool2d", "stride", stride)
    return MaxPool2d(kernel, stride)(x)


class AvgPool2d(Function):
    def __init__(self, kernel, stride):
        self.kernel, self.stride = kernel, stride

    def _windows(self, shape):
        """(slice_h, slice_w) of every kernel tap over the (floored) output grid."""
        (kh, kw), (sh, sw) = self.kernel, self.stride
        oh, ow = (shape[2] - kh) // sh + 1, (shape[3] - kw) // sw + 1
        return [(slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw))
                for i in range(kh) for j in range(kw)]

    def forward(self, x):
        _check_input("avg_pool2d", x, self.kernel)
        self.x_shape = x.shape
        taps = self._windows(x.shape)
        y = sum(x[:, :, si, sj] for si, sj in taps)  # (N, C, OH, OW)
        return y / x.dtype.type(len(taps))

    def backward(self, gy):
        taps = self._windows(self.x_shape)
        gx = self.xp.zeros(self.x_shape, dtype=gy.dtype)
        g = gy / gy.dtype.type(len(taps))
        for si, sj in taps:
            gx[:, :, si, sj] += g
        return gx


def avg_pool2d(x, kernel_size, stride=None):
    """Mean over KH x KW windows: (N, C, H, W) -> (N, C, OH, OW); stride defaults to kernel."""
    kernel = pair("avg_pool2d", "kernel_size", kernel_size)
    stride = kernel if stride is None else pair("avg_pool2d", "stride", stride)
    return AvgPool2d(kernel, stride)(x)


class GlobalAvgPool2d(Function):
    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"global_avg_pool2d: expected x (N, C, H, W), got shape {x.shape}")
        check_float("global_avg_pool2d", x)
        self.x_shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, gy):
        n, c, h, w = self.x_shape
        g = gy / gy.dtype.type(h * w)
        return self.xp.broadcast_to(g[:, :, None, None], self.x_shape).copy()


def global_avg_pool2d(x):
    """Mean over all spatial positions: (N, C, H, W) -> (N, C)."""
    return GlobalAvgPool2d()(x)
