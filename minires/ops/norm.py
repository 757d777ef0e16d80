"""Batch normalisation over (N, C) or (N, C, H, W) inputs, per channel C, optionally fused
with the ReLU that follows it (one op, one kernel pass each way).

Imports minires.tensor, minires.ops._args (argument checks), the reduce and shape ops
(backward_graph) and kernels.
"""
from minires import kernels
from minires.ops._args import check_float, raw, relu_masked
from minires.ops.reduce import mean as mean_, sum as sum_
from minires.ops.shape import reshape
from minires.tensor import Function


class BatchNorm2d(Function):
    uses_kernels = True

    def __init__(self, running_mean, running_var, training, momentum, eps, relu=False):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps, self.relu = training, momentum, eps, relu

    def forward(self, x, gamma, beta):
        if x.ndim not in (2, 4):
            raise ValueError(f"batch_norm: expected x (N, C) or (N, C, H, W), got {x.shape}")
        c = x.shape[1]
        for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", self.running_mean),
                        ("running_var", self.running_var)):
            if a is not None and a.shape != (c,):
                raise ValueError(f"batch_norm: {name} shape {a.shape}, expected ({c},) for "
                                 f"x {x.shape}")
        check_float("batch_norm", x, gamma, beta)
        if not self.training and (self.running_mean is None or self.running_var is None):
            raise ValueError("batch_norm: eval mode (training=False) needs running statistics")
        y, mean, inv_std = kernels.batch_norm_forward(
            x, gamma, beta, self.running_mean, self.running_var, self.training, self.momentum,
            self.eps, self.relu)
        # x is held as this op's input anyway: saving it (not x_hat) costs no memory, and
        # backward recomputes x_hat and the ReLU mask on the fly
        self.save_for_backward(x, gamma, beta, mean, inv_std)
        return y

    def backward(self, gy):
        return kernels.batch_norm_backward(gy, *self.saved, self.training, self.relu)

    def backward_graph(self, gy):
        """The formulas of kernels.reference.batch_norm_backward, as ops. In training the
        statistics are recomputed as ops of x (the gradient depends on x through them); in
        eval they are constants."""
        x, gamma, beta = self.inputs
        mean, inv_std = self.saved[3:]
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        bshape = (1, -1) + (1,) * (x.ndim - 2)
        if self.training:
            centered = x - mean_(x, axes, keepdims=True)
            inv = (mean_(centered * centered, axes, keepdims=True) + self.eps) ** -0.5
            x_hat = centered * inv
        else:
            inv = inv_std.reshape(bshape)
            x_hat = (x - mean.reshape(bshape)) * inv
        if self.relu:  # the output recomputed from x, as the kernels do
            y = x_hat.data * gamma.data.reshape(bshape) + beta.data.reshape(bshape)
            gy = relu_masked(gy, y)
        scale = reshape(gamma, bshape) * inv
        ggamma, gbeta = sum_(gy * x_hat, axes), sum_(gy, axes)
        if not self.training:
            return gy * scale, ggamma, gbeta
        return (scale * (gy - mean_(gy, axes, keepdims=True)
                         - x_hat * mean_(gy * x_hat, axes, keepdims=True)), ggamma, gbeta)


def batch_norm(x, gamma, beta, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5, relu=False):
    """Normalise each channel of x (N, C) or (N, C, H, W), then scale by gamma (C,) and shift
    by beta (C,); with relu=True, relu of that as ONE op (the mask is recomputed in backward).

    training=True uses the batch mean and biased variance and updates running_mean and
    running_var (raw arrays (C,), in place, unbiased variance, momentum as in PyTorch) unless
    they are None; training=False uses the running statistics.
    """
    return BatchNorm2d(raw(running_mean), raw(running_var), training, momentum, eps,
                       bool(relu))(x, gamma, beta)
