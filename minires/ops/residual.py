"""The fused residual add: y = act(x + alpha * fx) in one kernel pass, forward and backward
(without alpha the backward is gy itself, or one ReLU-mask pass, shared by both inputs).

Imports minires.tensor, minires.ops._args (dtype check), the reduce and shape ops
(backward_graph) and kernels.
"""
from minires import kernels
from minires.ops._args import check_float, relu_masked
from minires.ops.reduce import sum as sum_
from minires.ops.shape import reshape
from minires.tensor import Function


class ResidualAdd(Function):
    uses_kernels = True

    def __init__(self, relu):
        self.relu = relu

    def forward(self, x, fx, alpha=None):
        if x.shape != fx.shape:
            raise ValueError(f"residual_add: skip x has shape {x.shape} but block output fx "
                             f"has shape {fx.shape}; they must match exactly")
        if alpha is not None and alpha.size != 1:
            raise ValueError(f"residual_add: alpha must be a scalar, got shape {alpha.shape}")
        check_float("residual_add", *(a for a in (x, fx, alpha) if a is not None))
        y = kernels.residual_add_forward(x, fx, alpha, self.relu)
        need_galpha = alpha is not None and self.needs_input_grad[2]
        self.save_for_backward(y if self.relu else None, fx if need_galpha else None, alpha)
        return y

    def backward(self, gy):
        # Without alpha both inputs get the same gradient, so they share ONE array, as Add's
        # do: gy itself (no pass over memory), or gy masked once by the ReLU. Safe because
        # backward never writes into a gradient it was handed (tensor.py: pending gradients
        # are summed into new arrays, a leaf's .grad starts as a copy; hooks must not write).
        y, fx, alpha = self.saved
        if alpha is None:
            g = kernels.relu_backward(gy, y) if self.relu else gy
            return g, g
        if fx is None:
            # alpha is a constant: no galpha reduction needed, so skip the fused kernel
            g = kernels.relu_backward(gy, y) if self.relu else gy
            return g, g * alpha.reshape(()), None
        return kernels.residual_add_backward(gy, y, fx, alpha, self.relu)[:len(self.inputs)]

    def backward_graph(self, gy):
        y = self.saved[0]
        g = relu_masked(gy, y) if self.relu else gy
        if len(self.inputs) == 2:
            return g, g
        _, fx, alpha = self.inputs
        galpha = reshape(sum_(g * fx), alpha.shape) if self.needs_input_grad[2] else None
        return g, g * reshape(alpha, ()), galpha


def residual_add(x, fx, alpha=None, relu=False):
    """act(x + alpha * fx) as ONE fused op: x the skip (N, ...), fx the block output of the
    same shape (never broadcast), alpha None or a scalar tensor (ReZero), act ReLU if relu.

    Backward: without alpha, x and fx get the same gradient array (gy, or gy masked by the
    ReLU); with alpha, the gradients to x, fx and alpha come from one fused kernel pass.
    """
    f = ResidualAdd(bool(relu))
    return f(x, fx) if alpha is None else f(x, fx, alpha)
