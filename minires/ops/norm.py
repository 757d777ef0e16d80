"""Batch normalisation over (N, C) or (N, C, H, W) inputs, per channel C.

Imports minires.tensor and minires.ops._args (argument checks).
"""
from minires.ops._args import check_float, raw
from minires.tensor import Function


class BatchNorm2d(Function):
    def __init__(self, running_mean, running_var, training, momentum, eps):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps

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
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        bshape = (1, c) + (1,) * (x.ndim - 2)  # per-channel values broadcast over N, H, W
        if self.training:
            mean, var = x.mean(axis=axes), x.var(axis=axes)  # biased, as PyTorch normalises
            self._update_running(mean, var, x.size // c)
        elif self.running_mean is None or self.running_var is None:
            raise ValueError("batch_norm: eval mode (training=False) needs running statistics")
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = 1 / self.xp.sqrt(var + self.eps)
        x_hat = (x - mean.reshape(bshape)) * inv_std.reshape(bshape)
        self.axes, self.bshape = axes, bshape
        self.save_for_backward(x_hat, inv_std, gamma)
        return (x_hat * gamma.reshape(bshape) + beta.reshape(bshape)).astype(x.dtype, copy=False)

    def _update_running(self, mean, var, count):
        """In place, unbiased variance (PyTorch's rule); skipped for None buffers."""
        m = self.momentum
        if self.running_mean is not None:
            self.running_mean *= 1 - m
            self.running_mean += m * mean
        if self.running_var is not None:
            self.running_var *= 1 - m
            self.running_var += m * var * (count / max(count - 1, 1))

    def backward(self, gy):
        x_hat, inv_std, gamma = self.saved
        axes, bshape = self.axes, self.bshape
        gbeta = gy.sum(axis=axes)
        ggamma = (gy * x_hat).sum(axis=axes)
        g_hat = gy * gamma.reshape(bshape)
        if self.training:
            # mean and variance depend on x: the standard three-term formula
            m = gy.size // gy.shape[1]
            gx = (inv_std.reshape(bshape) / m) * (
                m * g_hat - g_hat.sum(axis=axes).reshape(bshape)
                - x_hat * (g_hat * x_hat).sum(axis=axes).reshape(bshape))
        else:
            gx = g_hat * inv_std.reshape(bshape)
        return gx, ggamma, gbeta


def batch_norm(x, gamma, beta, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5):
    """Normalise each channel of x (N, C) or (N, C, H, W), then scale by gamma (C,) and shift
    by beta (C,).

    training=True uses the batch mean and biased variance and updates running_mean and
    running_var (raw arrays (C,), in place, unbiased variance, momentum as in PyTorch) unless
    they are None; training=False uses the running statistics.
    """
    return BatchNorm2d(raw(running_mean), raw(running_var), training, momentum, eps)(
        x, gamma, beta)
