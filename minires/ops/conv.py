"""2-D convolution (cross-correlation, PyTorch weight layout) through the Numba kernels.

Imports minires.tensor, minires.ops._args (argument checks) and kernels.

Notation used by every conv/pool docstring in minires: N batch size, C input channels,
O output channels, H W input height and width, KH KW kernel height and width,
OH = (H + 2*ph - KH) // sh + 1 and OW likewise the output size, (sh, sw) the stride and
(ph, pw) the zero padding.
"""
from minires import kernels
from minires.ops._args import check_float, pair
from minires.tensor import Function


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
