"""Thin layers: each owns its Parameters and buffers and calls one functional op.

Imports minires.ops, minires.tensor (through nn.module/nn.init) and numpy. Shapes use the
notation of minires/ops/conv.py. Weights are drawn on the host (see nn.init), then `.to()`.
Linear, Conv2d and BatchNorm2d check their input's shape and dtype and name themselves in the
error: an input whose dtype differs from the layer's (float64 data into a float32 model) is
refused with a TypeError, never cast silently.
"""
import numpy as np

import minires.ops as F
from minires.nn import init
from minires.nn.module import Module
from minires.ops._args import pair
from minires.ops.conv import check_output_padding
from minires.ops.pool import pool_windows


def _check_input(layer, x, shape_ok, expected, hint=""):
    """TypeError/ValueError naming `layer` (its repr) unless x (anything with .shape and
    .dtype; other inputs are left to the op) has the layer's dtype and shape_ok(shape)."""
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return
    own = layer.weight.dtype
    if dtype != own:
        other = (f" or build the model with dtype=np.{dtype}" if np.dtype(dtype).kind == "f"
                 else "")
        raise TypeError(f"{layer!r}: input dtype {dtype} differs from the layer's {own} "
                        f"parameters; convert the input (x.astype(np.{own})){other} (inputs "
                        f"are never cast silently)")
    if not shape_ok(tuple(shape)):
        raise ValueError(f"{layer!r}: expected input of shape {expected}, got "
                         f"{tuple(shape)}{hint}")


class Linear(Module):
    """y = x @ weight.T + bias: x (..., in_features) -> (..., out_features).

    weight (out, in) Kaiming-normal (fan_in = in_features), bias (out,) zeros. x must have
    the layer's dtype (float32 by default): a float64 x raises TypeError.
    """

    def __init__(self, in_features, out_features, bias=True, rng=None, dtype=np.float32):
        super().__init__()
        dtype = init.float_dtype(dtype, "Linear")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = init.kaiming_normal((out_features, in_features), in_features,
                                          init.as_rng(rng), dtype)
        self.bias = init.zeros((out_features,), dtype) if bias else None

    def forward(self, x):
        n = self.in_features
        shape = getattr(x, "shape", ())
        flat = len(shape) > 2 and int(np.prod(shape[1:])) == n
        _check_input(self, x, lambda s: len(s) >= 1 and s[-1] == n, f"(..., {n})",
                     " (flatten it first: nn.Flatten())" if flat else "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution: x (N, C, H, W) -> (N, O, OH, OW).

    weight (O, C, KH, KW) Kaiming-normal (fan_in = C*KH*KW), bias (O,) zeros. x must have
    the layer's dtype (float32 by default): a float64 x raises TypeError.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None, dtype=np.float32):
        super().__init__()
        dtype = init.float_dtype(dtype, "Conv2d")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair("Conv2d", "kernel_size", kernel_size)
        self.stride = pair("Conv2d", "stride", stride)
        self.padding = pair("Conv2d", "padding", padding)
        kh, kw = self.kernel_size
        self.weight = init.kaiming_normal((out_channels, in_channels, kh, kw),
                                          in_channels * kh * kw, init.as_rng(rng), dtype)
        self.bias = init.zeros((out_channels,), dtype) if bias else None

    def forward(self, x):
        return self._conv(x, relu=False)

    def forward_relu(self, x):
        """relu(self(x)) as ONE op (ReLU applied as the kernel writes y, gy masked as the
        backward kernels read it); Sequential calls it when an nn.ReLU follows."""
        return self._conv(x, relu=True)

    def _conv(self, x, relu):
        c = self.in_channels
        _check_input(self, x, lambda s: len(s) == 4 and s[1] == c, f"(N, {c}, H, W)",
                     " (add the batch axis: x[None])" if getattr(x, "ndim", 0) == 3 else "")
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, relu=relu)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class ConvTranspose2d(Module):
    """Transposed 2-D convolution (conv2d's input gradient run forward, as PyTorch's
    nn.ConvTranspose2d): x (N, C_in, H, W) -> (N, C_out, HO, WO), with
    HO = (H - 1)*sh - 2*ph + KH + oph and WO likewise.

    weight (C_in, C_out, KH, KW) Kaiming-normal with PyTorch's fan-in for this layout, from
    the weight's second axis (fan_in = C_out*KH*KW), bias (C_out,) zeros. output_padding must
    be smaller than stride. x must have the layer's dtype (float32 by default).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, bias=True, rng=None, dtype=np.float32):
        super().__init__()
        name = "ConvTranspose2d"
        dtype = init.float_dtype(dtype, name)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(name, "kernel_size", kernel_size)
        self.stride, self.padding = pair(name, "stride", stride), pair(name, "padding", padding)
        self.output_padding = pair(name, "output_padding", output_padding)
        check_output_padding(name, self.output_padding, self.stride)  # fail at build time
        kh, kw = self.kernel_size
        self.weight = init.kaiming_normal((in_channels, out_channels, kh, kw),
                                          out_channels * kh * kw, init.as_rng(rng), dtype)
        self.bias = init.zeros((out_channels,), dtype) if bias else None

    def forward(self, x):
        c = self.in_channels
        _check_input(self, x, lambda s: len(s) == 4 and s[1] == c, f"(N, {c}, H, W)",
                     " (add the batch axis: x[None])" if getattr(x, "ndim", 0) == 3 else "")
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                  self.output_padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                f"output_padding={self.output_padding}, bias={self.bias is not None}")


class ReLU(Module):
    """max(x, 0), elementwise."""

    def forward(self, x):
        return F.relu(x)


class MaxPool2d(Module):
    """Max over kernel_size windows; stride defaults to kernel_size; padding (with -inf, at
    most half the kernel) and the floored output size as in PyTorch."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        name = type(self).__name__  # AvgPool2d shares this __init__: errors name the real class
        windows = pool_windows(name, kernel_size, stride, padding)  # refused here, not later
        self.kernel_size, self.stride = windows.kernel, windows.stride
        self.padding = windows.padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(MaxPool2d):
    """Mean over kernel_size windows; stride defaults to kernel_size; zero padding (at most
    half the kernel), counted in the divisor unless count_include_pad=False, as in PyTorch."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                            self.count_include_pad)

    def extra_repr(self):
        return f"{super().extra_repr()}, count_include_pad={self.count_include_pad}"


class GlobalAvgPool2d(Module):
    """Mean over all spatial positions: (N, C, H, W) -> (N, C)."""

    def forward(self, x):
        return F.global_avg_pool2d(x)


class Flatten(Module):
    """Merge the axes from start_dim on: (N, C, H, W) -> (N, C*H*W) by default."""

    def __init__(self, start_dim=1):
        super().__init__()
        self.start_dim = int(start_dim)

    def forward(self, x):
        return F.flatten(x, self.start_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}"


class BatchNorm2d(Module):
    """Per-channel batch normalisation of (N, C, H, W) (or (N, C)) inputs.

    weight (C,) ones and bias (C,) zeros are Parameters; running_mean (C,) zeros and
    running_var (C,) ones are buffers, updated in place while training (PyTorch's rule).
    `.training` is passed explicitly into F.batch_norm.
    """

    def __init__(self, num_features, momentum=0.1, eps=1e-5, dtype=np.float32):
        super().__init__()
        dtype = init.float_dtype(dtype, "BatchNorm2d")
        self.num_features, self.momentum, self.eps = int(num_features), momentum, eps
        self.weight = init.constant((num_features,), 1.0, dtype)
        self.bias = init.zeros((num_features,), dtype)
        self.register_buffer("running_mean", np.zeros(num_features, dtype))
        self.register_buffer("running_var", np.ones(num_features, dtype))

    def forward(self, x):
        return self._normalise(x, relu=False)

    def forward_relu(self, x):
        """relu(self(x)) as ONE op (one kernel pass each way); Sequential calls it when an
        nn.ReLU follows this layer."""
        return self._normalise(x, relu=True)

    def _normalise(self, x, relu):
        c = self.num_features
        _check_input(self, x, lambda s: len(s) in (2, 4) and s[1] == c,
                     f"(N, {c}, H, W) or (N, {c})")
        return F.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                            training=self.training, momentum=self.momentum, eps=self.eps,
                            relu=relu)

    def extra_repr(self):
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"


class Dropout(Module):
    """Zero each element with probability p while training (mask drawn on the host from rng,
    so CPU and GPU runs drop the same elements); identity in eval mode."""

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p, self.rng = float(p), init.as_rng(rng)

    def forward(self, x):
        return F.dropout(x, self.p, training=self.training, rng=self.rng)

    def extra_repr(self):
        return f"p={self.p}"
