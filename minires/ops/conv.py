"""2-D convolution (cross-correlation, PyTorch weight layout) and its transpose, through the
Numba kernels, with gradients of any order.

Imports minires.tensor, minires.ops._args (argument checks), the reduce op (bias gradients as
a graph) and kernels.

Notation used by every conv/pool docstring in minires: N batch size, C input channels,
O output channels, H W input height and width, KH KW kernel height and width,
OH = (H + 2*ph - KH) // sh + 1 and OW likewise the output size, (sh, sw) the stride and
(ph, pw) the zero padding.

Three ops close under differentiation, all linear in each argument. Writing conv(x, w) for
conv2d, T(g, w) for the transposed convolution (conv2d's input gradient) and W(g, x) for
conv2d's weight gradient, every one is an adjoint of another:
    <conv(x, w), g> = <x, T(g, w)> = <w, W(g, x)>
so the gradient of each, for an upstream gradient z, is made of the other two:
    conv:  gx = T(z, w),      gw = W(z, x)
    T:     gg = conv(z, w),   gw = W(g, z)
    W:     gg = conv(x, z),   gx = T(g, z)
"""
from minires import kernels
from minires.ops._args import check_float, pair, relu_masked
from minires.ops.reduce import sum as sum_
from minires.tensor import Function, Tensor

_HW = (0, 2, 3)  # the axes a per-channel bias is broadcast over: N, H, W


def _bias_grad(gy):
    """Sum of gy (N, O, OH, OW) over N, H, W: (O,); raw arrays or Tensors (as a graph)."""
    return sum_(gy, _HW) if isinstance(gy, Tensor) else gy.sum(axis=_HW)


class Conv2d(Function):
    """conv2d, and with relu=True relu(conv2d) as one op: the kernels apply the ReLU as they
    write y and mask gy by y > 0 as they read it (no ReLU pass over y or gy)."""
    uses_kernels = True

    def __init__(self, stride, padding, relu=False):
        self.stride, self.padding, self.relu = stride, padding, relu

    def forward(self, x, w, b=None):
        if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1]:
            raise ValueError(f"conv2d: expected x (N, C, H, W) and w (O, C, KH, KW) with the "
                             f"same C, got x {x.shape} and w {w.shape}")
        check_float("conv2d", *(a for a in (x, w, b) if a is not None))
        y = kernels.conv2d_forward(x, w, b, self.stride, self.padding, relu=self.relu)
        # fused ReLU: the output too, its mask y > 0 is the ReLU's backward
        self.save_for_backward(x, w, *([y] if self.relu else []))
        return y

    def backward(self, gy):
        x, w, *out = self.saved
        need = self.needs_input_grad
        y = out[0] if out else None  # fused ReLU: gy counts only where y > 0
        gx = gw = gb = None
        if need[0]:
            gx = kernels.conv2d_backward_input(gy, w, x.shape, self.stride, self.padding, y=y)
        if any(need[1:]):
            gw, gb = kernels.conv2d_backward_weight(gy, x, w.shape, self.stride, self.padding,
                                                    len(need) > 2, y=y)
        return (gx, gw if need[1] else None, gb)[:len(need)]

    def backward_graph(self, gy):
        """gx = T(gy, w), gw = W(gy, x), gb = sum of gy over N, H, W; with the fused ReLU gy
        is first masked by y > 0, a constant (piecewise: its derivative is zero)."""
        x, w = self.inputs[:2]
        need = self.needs_input_grad
        if self.relu:
            gy = relu_masked(gy, self.saved[2])
        gx = _transpose_to(gy, w, x.shape[2:], self.stride, self.padding) if need[0] else None
        gw = conv2d_weight(gy, x, w.shape[2:], self.stride, self.padding) if need[1] else None
        gb = _bias_grad(gy) if len(need) > 2 and need[2] else None
        return (gx, gw, gb)[:len(need)]


def conv2d(x, w, b=None, stride=1, padding=0, relu=False):
    """2-D cross-correlation, as torch.nn.functional.conv2d; relu=True gives relu of it as ONE
    op (nn.Conv2d.forward_relu, used by Sequential when a ReLU follows).

    Args:
        x: input (N, C, H, W).
        w: weight (O, C, KH, KW).
        b: bias (O,) or None.
        stride, padding: an int or a pair (height, width).
        relu: apply max(., 0) to the result (NaN kept, as relu).
    Returns:
        (N, O, OH, OW) tensor.
    """
    stride, padding = pair("conv2d", "stride", stride), pair("conv2d", "padding", padding)
    f = Conv2d(stride, padding, bool(relu))
    return f(x, w) if b is None else f(x, w, b)


def _transpose_shape(x, w, b, stride, padding, output_padding):
    """The output shape (N, C_out, HO, WO) of conv_transpose2d, or a ValueError naming it."""
    op = "conv_transpose2d"
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[0]:
        raise ValueError(f"{op}: expected x (N, C_in, H, W) and w (C_in, C_out, KH, KW) with "
                         f"the same C_in (the weight's FIRST axis, PyTorch's transposed-conv "
                         f"layout), got x {x.shape} and w {w.shape}")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"{op}: bias shape {b.shape}, expected (C_out,) = ({w.shape[1]},) "
                         f"for w {w.shape}")
    size = tuple((n - 1) * s - 2 * p + k + o for n, s, p, k, o in
                 zip(x.shape[2:], stride, padding, w.shape[2:], output_padding))
    if min(size) < 1:
        raise ValueError(f"{op}: output size {size} < 1 for x {x.shape}, w {w.shape}, "
                         f"stride {stride}, padding {padding}, output_padding "
                         f"{output_padding}")
    return (x.shape[0], w.shape[1]) + size


def check_output_padding(op, output_padding, stride):
    """A ValueError naming op unless 0 <= output_padding < stride on both axes (as PyTorch:
    more would add rows no input pixel reaches, outside conv2d's input sizes)."""
    if min(output_padding) < 0 or any(o >= s for o, s in zip(output_padding, stride)):
        raise ValueError(f"{op}: output_padding must be >= 0 and smaller than stride, got "
                         f"output_padding {output_padding} and stride {stride}")


class ConvTranspose2d(Function):
    """T(x, w) + b: the transposed convolution, conv2d's input gradient as an op.

    x (N, C_in, H, W), w (C_in, C_out, KH, KW) (conv2d's (O, C, ...) read backwards: the conv
    it transposes maps C_out channels to C_in), b (C_out,) -> (N, C_out, HO, WO) with
    HO = (H - 1)*sh - 2*ph + KH + oph (output_padding oph < sh picks among the sizes that
    conv2d with this stride maps to H).
    """
    uses_kernels = True

    def __init__(self, stride, padding, output_padding):
        self.stride, self.padding, self.output_padding = stride, padding, output_padding

    def forward(self, x, w, b=None):
        out_shape = _transpose_shape(x, w, b, self.stride, self.padding, self.output_padding)
        check_float("conv_transpose2d", *(a for a in (x, w, b) if a is not None))
        y = kernels.conv2d_backward_input(x, w, out_shape, self.stride, self.padding)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)  # in place: y is the kernel's fresh output
        self.save_for_backward(x, w)
        return y

    def backward(self, gy):
        x, w = self.saved
        need = self.needs_input_grad
        s, p = self.stride, self.padding
        gx = kernels.conv2d_forward(gy, w, None, s, p) if need[0] else None
        gw = kernels.conv2d_backward_weight(x, gy, w.shape, s, p, False)[0] if need[1] else None
        gb = _bias_grad(gy) if len(need) > 2 and need[2] else None
        return (gx, gw, gb)[:len(need)]

    def backward_graph(self, gy):
        """gx = conv(gy, w), gw = W(x, gy), gb = sum of gy over N, H, W."""
        x, w = self.inputs[:2]
        need = self.needs_input_grad
        s, p = self.stride, self.padding
        gx = conv2d(gy, w, stride=s, padding=p) if need[0] else None
        gw = conv2d_weight(x, gy, w.shape[2:], s, p) if need[1] else None
        gb = _bias_grad(gy) if len(need) > 2 and need[2] else None
        return (gx, gw, gb)[:len(need)]


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0):
    """Transposed 2-D convolution, as torch.nn.functional.conv_transpose2d (no groups or
    dilation): the gradient of conv2d with respect to its input, run forward. It reuses the
    conv backward-input kernel (kernels.conv2d_backward_input); its own gradients are a
    conv2d (to x) and the conv weight-gradient kernel (to w).

    Args:
        x: input (N, C_in, H, W).
        w: weight (C_in, C_out, KH, KW): PyTorch's layout for transposed convolutions.
        b: bias (C_out,) or None.
        stride, padding, output_padding: an int or a pair (height, width); padding crops
            rows and columns from both sides of the output, output_padding (< stride) crops
            that many fewer at the bottom and right.
    Returns:
        (N, C_out, (H - 1)*sh - 2*ph + KH + oph, (W - 1)*sw - 2*pw + KW + opw) tensor.
    """
    op = "conv_transpose2d"
    stride, padding = pair(op, "stride", stride), pair(op, "padding", padding)
    output_padding = pair(op, "output_padding", output_padding)
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    check_output_padding(op, output_padding, stride)
    f = ConvTranspose2d(stride, padding, output_padding)
    return f(x, w) if b is None else f(x, w, b)


def _transpose_to(g, w, size, stride, padding):
    """T(g, w) of size (H, W): conv2d's input gradient for an input of that size. The
    output_padding is what conv2d's floor division dropped: (H + 2*ph - KH) mod sh."""
    opad = tuple((n + 2 * p - k) % s for n, p, k, s in zip(size, padding, w.shape[2:], stride))
    return ConvTranspose2d(stride, padding, opad)(g, w)


class Conv2dWeight(Function):
    """W(gy, x): conv2d's weight gradient as an op, bilinear in gy and x.

    gy (N, O, OH, OW), x (N, C, H, W) -> (O, C, KH, KW), with
    W[o, c, i, j] = sum over n, a, b of gy[n, o, a, b] * xpad[n, c, a*sh + i, b*sw + j].
    """
    uses_kernels = True

    def __init__(self, kernel_size, stride, padding):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, gy, x):
        w_shape = (gy.shape[1], x.shape[1]) + self.kernel_size
        gw, _ = kernels.conv2d_backward_weight(gy, x, w_shape, self.stride, self.padding, False)
        self.save_for_backward(gy, x)
        return gw

    def backward(self, z):
        gy, x = self.saved
        need, s, p = self.needs_input_grad, self.stride, self.padding
        ggy = kernels.conv2d_forward(x, z, None, s, p) if need[0] else None
        gx = kernels.conv2d_backward_input(gy, z, x.shape, s, p) if need[1] else None
        return ggy, gx

    def backward_graph(self, z):
        """ggy = conv(x, z), gx = T(gy, z) (of x's size)."""
        gy, x = self.inputs
        need, s, p = self.needs_input_grad, self.stride, self.padding
        ggy = conv2d(x, z, stride=s, padding=p) if need[0] else None
        gx = _transpose_to(gy, z, x.shape[2:], s, p) if need[1] else None
        return ggy, gx


def conv2d_weight(gy, x, kernel_size, stride=1, padding=0):
    """The gradient of conv2d(x, w, stride, padding) with respect to w (O, C, KH, KW) for the
    output gradient gy (N, O, OH, OW), as a differentiable op (torch.nn.grad.conv2d_weight).

    kernel_size: (KH, KW) (an int or a pair). Used by the backward graphs above; not
    exported from minires.ops.
    """
    op = "conv2d_weight"
    f = Conv2dWeight(pair(op, "kernel_size", kernel_size), pair(op, "stride", stride),
                     pair(op, "padding", padding))
    return f(gy, x)
