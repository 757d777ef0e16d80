"""Skip connections: Residual, ReZero, BasicBlock, Highway, DenseSkip, and the gradient-norm
probes (x_in, x_res) that Residual, ReZero and BasicBlock record on each backward.

Imports minires.ops, minires.tensor, minires.backend and the other nn modules.
"""
import math

import numpy as np

import minires.ops as F
from minires import backend
from minires.nn import init
from minires.nn.layers import BatchNorm2d, Conv2d, ReLU
from minires.nn.module import Module, Sequential
from minires.tensor import Function, Tensor, is_grad_enabled


class _Alias(Function):
    """Identity node (same array, no copy) that gives a hook a tensor of its own.

    Kept private here rather than in minires.ops: it exists only so the skip modules can
    observe the gradient on one path of a tensor that is used twice.
    """

    def forward(self, x):
        return x

    def backward(self, gy):
        return gy


def _l2(g):
    """L2 norm of a raw array as a Python float (accumulated in float64)."""
    xp = backend.array_module(g)
    return math.sqrt(float(xp.sum(xp.square(g, dtype=np.float64))))


class _NormPair:
    """Collects the (x_in, x_res) norms of one forward's graph; appends the pair to `out`
    once both hooks have fired (again on each backward through a retained graph)."""

    def __init__(self, out):
        self.out, self.pending = out, [None, None]

    def probe(self, x, slot):
        """A tensor equal to x whose gradient norm lands in `slot` (0: x_in, 1: x_res)."""
        if isinstance(x, Tensor) and x.requires_grad:
            t = _Alias()(x)
        else:  # x needs no gradient: a throwaway leaf still lets us see dL/dx
            t = Tensor(x.data if isinstance(x, Tensor) else x, requires_grad=True)
        t.register_hook(lambda g: self._record(slot, g))
        return t

    def _record(self, slot, g):
        self.pending[slot] = _l2(g)
        if None not in self.pending:
            self.out.append(tuple(self.pending))
            self.pending = [None, None]


class _Skip(Module):
    """Shared gradient-norm bookkeeping of Residual and ReZero.

    With `track_grad_norms` set, each backward appends (x_in, x_res) to `grad_norms`:
    x_in is the L2 norm of the gradient arriving at the block's input along the block path,
    x_res the L2 norm of the gradient the residual add passes to its skip input. When off
    (the default) forward builds no extra nodes and registers no hooks.
    """

    def __init__(self, track_grad_norms):
        super().__init__()
        self.track_grad_norms = bool(track_grad_norms)
        self.grad_norms = []

    def _probes(self):
        """A _NormPair for this forward, or None when not tracking (or under no_grad)."""
        if self.track_grad_norms and is_grad_enabled():
            return _NormPair(self.grad_norms)
        return None


def _check_same(layer, skip_name, s, fx):
    if tuple(s.shape) != tuple(fx.shape):
        raise ValueError(f"{layer}: the {skip_name} output has shape {tuple(s.shape)} but the "
                         f"block output has shape {tuple(fx.shape)}; they must match "
                         f"(use a projection shortcut to change shape)")


class Residual(_Skip):
    """y = act(shortcut(x) + block(x)) through one fused F.residual_add; act = ReLU if relu.

    shortcut None is the identity. The shortcut and block outputs must have the same shape.
    """

    def __init__(self, block, shortcut=None, relu=False, track_grad_norms=False):
        super().__init__(track_grad_norms)
        self.block, self.shortcut, self.relu = block, shortcut, bool(relu)

    def forward(self, x):
        probes = self._probes()
        x_block = x if probes is None else probes.probe(x, 0)
        fx = self.block(x_block)
        s = x if self.shortcut is None else self.shortcut(x)
        _check_same(type(self).__name__, "shortcut", s, fx)
        if probes is not None:
            s = probes.probe(s, 1)
        return F.residual_add(s, fx, relu=self.relu)

    def extra_repr(self):
        return f"relu={self.relu}" if self.relu else ""


class ReZero(_Skip):
    """y = x + alpha * block(x) with alpha a scalar Parameter initialised to 0 (Bachlechner
    et al.), so the network starts as the identity through this block."""

    def __init__(self, block, track_grad_norms=False, dtype=np.float32):
        super().__init__(track_grad_norms)
        self.block = block
        self.alpha = init.zeros((), init.float_dtype(dtype, "ReZero"))

    def forward(self, x):
        probes = self._probes()
        x_block = x if probes is None else probes.probe(x, 0)
        fx = self.block(x_block)
        _check_same("ReZero", "skip (input)", x, fx)
        s = x if probes is None else probes.probe(x, 1)
        return F.residual_add(s, fx, alpha=self.alpha)


class BasicBlock(Residual):
    """ResNet basic block: relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x)))))).

    conv1 3x3 (stride `stride`), conv2 3x3, both without bias (BN follows). The shortcut is
    the identity, or a 1x1 conv (stride `stride`) + BN projection when stride != 1 or
    in_channels != channels. x (N, in_channels, H, W) -> (N, channels, OH, OW).
    """

    def __init__(self, in_channels, channels, stride=1, rng=None, track_grad_norms=False,
                 dtype=np.float32):
        rng = init.as_rng(rng)
        block = Sequential(
            Conv2d(in_channels, channels, 3, stride, 1, bias=False, rng=rng, dtype=dtype),
            BatchNorm2d(channels, dtype=dtype), ReLU(),
            Conv2d(channels, channels, 3, 1, 1, bias=False, rng=rng, dtype=dtype),
            BatchNorm2d(channels, dtype=dtype))
        shortcut = None
        if stride != 1 or in_channels != channels:
            shortcut = Sequential(
                Conv2d(in_channels, channels, 1, stride, bias=False, rng=rng, dtype=dtype),
                BatchNorm2d(channels, dtype=dtype))
        super().__init__(block, shortcut, relu=True, track_grad_norms=track_grad_norms)
        self.in_channels, self.channels, self.stride = in_channels, channels, stride

    def extra_repr(self):
        return f"{self.in_channels}, {self.channels}, stride={self.stride}"


class Highway(Module):
    """y = T(x) * H(x) + (1 - T(x)) * x with T = sigmoid(gate(x)), H = transform(x)
    (Srivastava et al.). gate.bias is set to `gate_bias` (negative: start close to the
    identity); gate_bias=None keeps the gate's own initialisation."""

    def __init__(self, transform, gate, gate_bias=-2.0):
        super().__init__()
        self.transform, self.gate = transform, gate
        if gate_bias is not None:
            bias = getattr(gate, "bias", None)
            if not isinstance(bias, Tensor):
                raise ValueError(f"Highway: gate {type(gate).__name__} has no bias Parameter "
                                 f"to set to {gate_bias}; pass gate_bias=None")
            bias.data[...] = gate_bias

    def forward(self, x):
        h, t = self.transform(x), F.sigmoid(self.gate(x))
        for name, a in (("transform", h), ("gate", t)):
            if tuple(a.shape) != tuple(x.shape):
                raise ValueError(f"Highway: the {name} output has shape {tuple(a.shape)} but "
                                 f"the input has shape {tuple(x.shape)}; they must match")
        return x + t * (h - x)  # = t*h + (1-t)*x with one multiply fewer


class DenseSkip(Module):
    """Concatenation skip (DenseNet): y = concat([x, block(x)], axis=1).

    x (N, C, ...) and block(x) (N, K, ...) -> (N, C + K, ...); the other axes must match.
    """

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        fx = self.block(x)
        if fx.ndim != x.ndim or fx.shape[0] != x.shape[0] or fx.shape[2:] != x.shape[2:]:
            raise ValueError(f"DenseSkip: block output shape {tuple(fx.shape)} must match the "
                             f"input shape {tuple(x.shape)} on every axis but 1")
        return F.concat([x, fx], axis=1)
