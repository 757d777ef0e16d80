"""Pooling: max_pool2d (kernel dispatch), avg_pool2d and global_avg_pool2d (plain xp), with
PyTorch's padding and gradients of any order.

Imports minires.tensor, minires.ops._args (argument checks), the shape ops (global average
pooling's backward graph) and kernels. Notation as in minires/ops/conv.py: the output size is
floored, OH = (H + 2*ph - KH) // sh + 1, as in PyTorch without ceil_mode; padding is at most
half the kernel, so every window holds at least one element of x.

Both poolings pass gy back through a map that is linear in gy, so each backward is an op
whose own gradient is that map's transpose, and the pair closes under differentiation:
    max_pool2d: gx = scatter(gy) to each window's argmax tap;  scatter <-> gather
                (the argmax is piecewise constant in x: a constant of the gradient graph)
    avg_pool2d: gx = A^T gy, A the (linear) average pooling;    A^T <-> A
"""
import numpy as np

from minires import kernels
from minires.ops._args import check_float, pair
from minires.ops.shape import broadcast_to, reshape
from minires.tensor import Function


class Windows:
    """Pooling geometry: kernel, stride and padding, (h, w) pairs of ints (checked by
    pool_windows), and the padding, cropping and tap slicing every pooling op shares."""

    def __init__(self, kernel, stride, padding):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def padded(self, shape):
        """(N, C, H, W) -> (N, C, H + 2*ph, W + 2*pw)."""
        (ph, pw) = self.padding
        return tuple(shape[:2]) + (shape[2] + 2 * ph, shape[3] + 2 * pw)

    def pad(self, xp, x, value):
        """x (N, C, H, W) framed by `value`: (N, C, H + 2*ph, W + 2*pw); without padding x
        itself, so the padding-free path copies nothing."""
        (ph, pw) = self.padding
        if not (ph or pw):
            return x
        return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)

    def crop(self, xp, g):
        """The adjoint of pad for a gradient g of the padded input: its (N, C, H, W) interior,
        contiguous (the next op's kernels may need it so)."""
        (ph, pw) = self.padding
        if not (ph or pw):
            return g
        return xp.ascontiguousarray(g[:, :, ph:g.shape[2] - ph, pw:g.shape[3] - pw])

    def unpool(self, x_shape):
        """The padded input's shape, kernel and stride: the arguments after gy and argmax of
        kernels.max_pool2d_backward, which scatters into the padded input."""
        return self.padded(x_shape), self.kernel, self.stride

    def taps(self, padded_shape):
        """(slice_h, slice_w) of every kernel tap i*KW + j over the output grid: x[:, :, si, sj]
        of a padded input is that tap of every window, (N, C, OH, OW)."""
        (kh, kw), (sh, sw) = self.kernel, self.stride
        oh, ow = (padded_shape[2] - kh) // sh + 1, (padded_shape[3] - kw) // sw + 1
        return [(slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw))
                for i in range(kh) for j in range(kw)]


def pool_windows(op, kernel_size, stride=None, padding=0):
    """Windows from a pooling op's (or layer's) arguments: ints or pairs; stride defaults to
    the kernel size. A ValueError naming `op` unless kernel and stride are positive and
    0 <= padding <= kernel / 2 (PyTorch's rule: a window never lies in the padding alone)."""
    kernel = pair(op, "kernel_size", kernel_size)
    stride = kernel if stride is None else pair(op, "stride", stride)
    padding = pair(op, "padding", padding)
    if min(kernel) < 1 or min(stride) < 1:
        raise ValueError(f"{op}: kernel_size and stride must be positive, got kernel_size "
                         f"{kernel} and stride {stride}")
    if min(padding) < 0 or any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"{op}: padding {padding} must be between 0 and half of kernel_size "
                         f"{kernel} (pad should be at most half of the kernel size)")
    return Windows(kernel, stride, padding)


def _check_input(op, x, windows):
    if x.ndim != 4:
        raise ValueError(f"{op}: expected x (N, C, H, W), got shape {x.shape}")
    check_float(op, x)
    h, w = windows.padded(x.shape)[2:]
    if windows.kernel[0] > h or windows.kernel[1] > w:
        padded = f" padded by {windows.padding}" if any(windows.padding) else ""
        raise ValueError(f"{op}: kernel {windows.kernel} larger than input "
                         f"{x.shape[2:]}{padded}")


# --- max pooling ----------------------------------------------------------------------------
def _gather(xp, g, argmax, windows):
    """The transpose of max_pool2d's backward (whose kernel adds each window's gy at its
    argmax tap of the padded input, the padding then cropped): g (N, C, H, W) -> argmax's
    shape (N, C, OH, OW), out[n, c, p, q] = gpad[n, c, p*sh + i, q*sw + j] where
    argmax[n, c, p, q] = i*KW + j."""
    gpad = windows.pad(xp, g, 0)
    (sh, sw), kw = windows.stride, windows.kernel[1]
    n, c, oh, ow = argmax.shape
    rows = xp.arange(oh).reshape(-1, 1) * sh + argmax // kw
    cols = xp.arange(ow) * sw + argmax % kw
    flat = (rows * gpad.shape[3] + cols).reshape(n, c, -1)
    return xp.take_along_axis(gpad.reshape(n, c, -1), flat, axis=2).reshape(argmax.shape)


class MaxPool2d(Function):
    uses_kernels = True

    def __init__(self, windows):
        self.windows = windows

    def forward(self, x):
        _check_input("max_pool2d", x, self.windows)
        # -inf never wins a window (each holds an element of x): the argmax stays inside x
        xpad = self.windows.pad(self.xp, x, -np.inf)
        y, argmax = kernels.max_pool2d_forward(xpad, self.windows.kernel, self.windows.stride)
        self.x_shape = x.shape
        self.save_for_backward(argmax)  # the argmax indices, not x
        return y

    def backward(self, gy):
        gx = kernels.max_pool2d_backward(gy, self.saved[0], *self.windows.unpool(self.x_shape))
        return self.windows.crop(self.xp, gx)

    def backward_graph(self, gy):
        return MaxPoolScatter(self.saved[0], self.windows, self.x_shape)(gy)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max over KH x KW windows of x framed by -inf: (N, C, H, W) -> (N, C, OH, OW); stride
    defaults to the kernel size, padding (int or pair) is at most half the kernel, as in
    PyTorch. The gradient of each window goes to its (first) maximum."""
    return MaxPool2d(pool_windows("max_pool2d", kernel_size, stride, padding))(x)


class _MaxPoolLinear(Function):
    """Base of the scatter/gather pair: both linear in their input, with a constant argmax
    (N, C, OH, OW) from the forward max_pool2d and its geometry."""

    def __init__(self, argmax, windows, x_shape):
        self.windows, self.x_shape = windows, x_shape
        self.save_for_backward(argmax)  # __call__ drops it when no graph is recorded


class MaxPoolScatter(_MaxPoolLinear):
    """max_pool2d's gradient as an op: g (N, C, OH, OW) -> (N, C, H, W), each window's value
    added at its argmax; its own gradient is MaxPoolGather."""
    uses_kernels = True

    def forward(self, g):
        gx = kernels.max_pool2d_backward(g, self.saved[0], *self.windows.unpool(self.x_shape))
        return self.windows.crop(self.xp, gx)

    def backward(self, gy):
        return _gather(self.xp, gy, self.saved[0], self.windows)

    def backward_graph(self, gy):
        return MaxPoolGather(self.saved[0], self.windows, self.x_shape)(gy)


class MaxPoolGather(_MaxPoolLinear):
    """g (N, C, H, W) read at each window's argmax -> (N, C, OH, OW): the transpose of
    MaxPoolScatter, whose gradient it is (and the reverse)."""
    uses_kernels = True  # backward: the scatter kernel

    def forward(self, g):
        return _gather(self.xp, g, self.saved[0], self.windows)

    def backward(self, gy):
        gx = kernels.max_pool2d_backward(gy, self.saved[0], *self.windows.unpool(self.x_shape))
        return self.windows.crop(self.xp, gx)

    def backward_graph(self, gy):
        return MaxPoolScatter(self.saved[0], self.windows, self.x_shape)(gy)


# --- average pooling ------------------------------------------------------------------------
def _divisor(xp, x_shape, windows, count_include_pad, dtype):
    """What each window's sum is divided by: KH*KW, a scalar of `dtype`; or, for
    count_include_pad=False with padding, the number of elements of x in each window, an
    (OH, OW) array (the same for every image and channel)."""
    if count_include_pad or not any(windows.padding):
        return dtype.type(windows.kernel[0] * windows.kernel[1])
    ones = windows.pad(xp, xp.ones((1, 1) + tuple(x_shape[2:]), dtype=dtype), 0)
    return sum(ones[:, :, si, sj] for si, sj in windows.taps(ones.shape))[0, 0]


def _avg_pool(xp, x, windows, count_include_pad):
    """A x: (N, C, H, W) -> (N, C, OH, OW), the sum of each zero-padded window / divisor."""
    xpad = windows.pad(xp, x, 0)
    y = sum(xpad[:, :, si, sj] for si, sj in windows.taps(xpad.shape))
    return y / _divisor(xp, x.shape, windows, count_include_pad, x.dtype)


def _avg_pool_transpose(xp, g, windows, count_include_pad, x_shape):
    """A^T g: (N, C, OH, OW) -> x_shape (N, C, H, W), each g / divisor added to every tap of
    its window, the padding cropped."""
    g = g / _divisor(xp, x_shape, windows, count_include_pad, g.dtype)
    gx = xp.zeros(windows.padded(x_shape), dtype=g.dtype)
    for si, sj in windows.taps(gx.shape):
        gx[:, :, si, sj] += g
    return windows.crop(xp, gx)


class AvgPool2d(Function):
    def __init__(self, windows, count_include_pad):
        self.windows, self.count_include_pad = windows, count_include_pad

    def forward(self, x):
        _check_input("avg_pool2d", x, self.windows)
        self.x_shape = x.shape
        return _avg_pool(self.xp, x, self.windows, self.count_include_pad)

    def backward(self, gy):
        return _avg_pool_transpose(self.xp, gy, self.windows, self.count_include_pad,
                                   self.x_shape)

    def backward_graph(self, gy):
        return AvgPoolTranspose(self.windows, self.count_include_pad, self.x_shape)(gy)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Mean over KH x KW windows of x framed by zeros: (N, C, H, W) -> (N, C, OH, OW); stride
    defaults to the kernel size, padding (int or pair) is at most half the kernel, as in
    PyTorch. count_include_pad=True divides every window by KH*KW, padded zeros included;
    False divides by the number of elements of x in the window."""
    windows = pool_windows("avg_pool2d", kernel_size, stride, padding)
    return AvgPool2d(windows, bool(count_include_pad))(x)


class AvgPoolTranspose(Function):
    """avg_pool2d's gradient as an op, g (N, C, OH, OW) -> x_shape (N, C, H, W); its own
    gradient is avg_pool2d again (with the same geometry and divisor)."""

    def __init__(self, windows, count_include_pad, x_shape):
        self.windows, self.count_include_pad = windows, count_include_pad
        self.x_shape = x_shape

    def forward(self, g):
        return _avg_pool_transpose(self.xp, g, self.windows, self.count_include_pad,
                                   self.x_shape)

    def backward(self, gy):
        return _avg_pool(self.xp, gy, self.windows, self.count_include_pad)

    def backward_graph(self, gy):
        return AvgPool2d(self.windows, self.count_include_pad)(gy)


# --- global average pooling -----------------------------------------------------------------
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

    def backward_graph(self, gy):
        n, c, h, w = self.x_shape
        return broadcast_to(reshape(gy, (n, c, 1, 1)), self.x_shape) / (h * w)


def global_avg_pool2d(x):
    """Mean over all spatial positions: (N, C, H, W) -> (N, C)."""
    return GlobalAvgPool2d()(x)
