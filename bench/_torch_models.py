"""PyTorch twins of minires models, built by walking the minires module tree layer by layer
(no second copy of any model's definition): `mirror(torch, module)` returns a torch.nn.Module
that computes what `module` computes, starting from copies of its current parameters and
buffers.

Imports numpy and minires; torch is passed in (bench/ loads it only when installed).
"""
import numpy as np

from minires import backend, models
from minires import nn as mnn


def _host(a):
    """A NumPy copy of a minires Parameter or raw (NumPy/CuPy) buffer."""
    return np.array(backend.to_device(getattr(a, "data", a), "cpu"))


def _copy(torch, target, source):
    with torch.no_grad():
        target.copy_(torch.from_numpy(_host(source)))


def mirror(torch, module):
    """torch.nn.Module twin of a minires Module (Sequential, Conv2d, Linear, ReLU, MaxPool2d,
    AvgPool2d, GlobalAvgPool2d, Flatten, BatchNorm2d, Residual/BasicBlock, and the Net and
    ResNet containers of minires.models), on the CPU, float32 or float64 as the weights are.

    The twin's parameters() come in the same order as module.parameters(). Raises TypeError
    for a layer it does not know (a new layer needs a line here, not a hand-written model).
    """
    tnn = torch.nn
    m = module
    if isinstance(m, (models.Net, models.ResNet)):  # containers: their forward is a chain
        parts = (m.features, m.skip, m.head) if isinstance(m, models.Net) else (
            m.stem, m.blocks, m.head)
        return tnn.Sequential(*(mirror(torch, p) for p in parts))
    if isinstance(m, mnn.Sequential):
        return tnn.Sequential(*(mirror(torch, child) for child in m))
    if isinstance(m, mnn.Residual):  # also BasicBlock (a Residual with BN blocks)
        shortcut = None if m.shortcut is None else mirror(torch, m.shortcut)
        return _residual(torch)(mirror(torch, m.block), shortcut, m.relu)
    if isinstance(m, mnn.Conv2d):
        t = tnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                       bias=m.bias is not None, dtype=_dtype(torch, m.weight))
        return _with_params(torch, t, m)
    if isinstance(m, mnn.Linear):
        t = tnn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                       dtype=_dtype(torch, m.weight))
        return _with_params(torch, t, m)
    if isinstance(m, mnn.BatchNorm2d):
        t = tnn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum,
                            dtype=_dtype(torch, m.weight))
        _copy(torch, t.running_mean, m.running_mean)
        _copy(torch, t.running_var, m.running_var)
        return _with_params(torch, t, m)
    if isinstance(m, mnn.ReLU):
        return tnn.ReLU()
    if isinstance(m, mnn.AvgPool2d):  # before MaxPool2d: AvgPool2d subclasses it
        return tnn.AvgPool2d(m.kernel_size, m.stride)
    if isinstance(m, mnn.MaxPool2d):
        return tnn.MaxPool2d(m.kernel_size, m.stride)
    if isinstance(m, mnn.GlobalAvgPool2d):
        return tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Flatten())
    if isinstance(m, mnn.Flatten):
        return tnn.Flatten(m.start_dim)
    raise TypeError(f"bench._torch_models.mirror: no PyTorch twin for {type(m).__name__}")


def _dtype(torch, p):
    return torch.float64 if p.dtype == np.float64 else torch.float32


def _with_params(torch, t, m):
    _copy(torch, t.weight, m.weight)
    if m.bias is not None:
        _copy(torch, t.bias, m.bias)
    return t


_RESIDUAL = {}


def _residual(torch):
    """The torch Module class for y = act(shortcut(x) + block(x)) (made once per torch)."""
    if "cls" not in _RESIDUAL:
        class Residual(torch.nn.Module):
            def __init__(self, block, shortcut, relu):
                super().__init__()
                self.block, self.shortcut, self.relu = block, shortcut, relu

            def forward(self, x):
                fx = self.block(x)  # block first, as minires's Residual: same parameter order
                y = (x if self.shortcut is None else self.shortcut(x)) + fx
                return torch.relu(y) if self.relu else y
        _RESIDUAL["cls"] = Residual
    return _RESIDUAL["cls"]
