"""Skip connections: forward against closed forms, gradcheck, shape errors, and the recorded
(x_in, x_res) gradient norms against norms read with register_hook on the same graph."""
import numpy as np
import pytest

import minires
from minires import nn
from minires.ops.residual import ResidualAdd
from minires.tensor import Tensor

from conftest import fwd_tol, tol
from helpers import check_module_grad, naive_conv

F64 = np.float64


def _lin(n_in, n_out, seed):
    return nn.Linear(n_in, n_out, rng=seed, dtype=F64)


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


class Probe(nn.Module):
    """Identity that records the gradient reaching its input, through register_hook."""

    def __init__(self):
        super().__init__()
        self.grads = []

    def forward(self, x):
        x.register_hook(lambda g: self.grads.append(g.copy()))
        return x


# --- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("relu", [False, True])
def test_residual_forward(relu, rng):
    block = nn.Sequential(_lin(4, 4, 0), nn.ReLU(), _lin(4, 4, 1))
    x = rng.standard_normal((3, 4))
    y = nn.Residual(block, relu=relu)(x)
    expect = x + block(x).data
    np.testing.assert_allclose(y.data, np.maximum(expect, 0) if relu else expect,
                               **tol("fwd_f64"))
    assert isinstance(y.creator, ResidualAdd)  # one fused op, not an add and a relu


def test_residual_with_shortcut_and_shape_error(rng):
    block, shortcut = _lin(4, 2, 0), _lin(4, 2, 1)
    x = rng.standard_normal((3, 4))
    y = nn.Residual(block, shortcut)(x)
    np.testing.assert_allclose(y.data, shortcut(x).data + block(x).data, **tol("fwd_f64"))
    with pytest.raises(ValueError, match=r"Residual: the shortcut output has shape \(3, 4\) "
                                         r"but the block output has shape \(3, 2\)"):
        nn.Residual(block)(x)


def test_rezero_starts_as_identity_then_scales_the_block(rng):
    block = _lin(4, 4, 0)
    rz = nn.ReZero(block, dtype=F64)
    assert [n for n, _ in rz.named_parameters()] == ["block.weight", "block.bias", "alpha"]
    assert rz.alpha.shape == () and rz.alpha.item() == 0
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(rz(x).data, x)
    rz.alpha.data[...] = 0.5
    np.testing.assert_allclose(rz(x).data, x + 0.5 * block(x).data, **tol("fwd_f64"))
    with pytest.raises(ValueError, match="ReZero"):
        nn.ReZero(_lin(4, 3, 0))(x)


@pytest.mark.parametrize("c_in, c, stride, projection", [(3, 3, 1, False), (3, 4, 1, True),
                                                         (3, 3, 2, True)])
def test_basic_block_matches_functional_composition(c_in, c, stride, projection, rng):
    bb = nn.BasicBlock(c_in, c, stride, rng=0, dtype=F64)
    assert (bb.shortcut is not None) == projection
    x = rng.standard_normal((2, c_in, 6, 6))

    def bn(h):
        m, v = h.mean(axis=(0, 2, 3), keepdims=True), h.var(axis=(0, 2, 3), keepdims=True)
        return (h - m) / np.sqrt(v + 1e-5)  # BN at init: scale 1, shift 0, batch statistics

    w1, w2 = bb.block[0].weight.data, bb.block[3].weight.data
    zero = np.zeros(c)
    h = bn(naive_conv(np.maximum(bn(naive_conv(x, w1, zero, stride, 1)), 0), w2, zero, 1, 1))
    s = bn(naive_conv(x, bb.shortcut[0].weight.data, zero, stride, 0)) if projection else x
    y = bb(x)
    assert y.shape == (2, c, 6 // stride, 6 // stride)
    np.testing.assert_allclose(y.data, np.maximum(s + h, 0), **fwd_tol(F64, reduce=True))


def test_highway_forward_and_gate_bias(rng):
    transform, gate = _lin(4, 4, 0), _lin(4, 4, 1)
    hw = nn.Highway(transform, gate)
    np.testing.assert_array_equal(gate.bias.data, -2.0)
    x = rng.standard_normal((3, 4))
    t = _sigmoid(gate(x).data)
    np.testing.assert_allclose(hw(x).data, t * transform(x).data + (1 - t) * x,
                               **tol("fwd_f64"))
    with pytest.raises(ValueError, match="has no bias"):
        nn.Highway(transform, nn.ReLU())
    with pytest.raises(ValueError, match="Highway: the transform output has shape"):
        nn.Highway(_lin(4, 2, 0), _lin(4, 4, 1))(x)


def test_dense_skip_concatenates_on_channels(rng):
    conv = nn.Conv2d(2, 3, 3, padding=1, rng=0, dtype=F64)
    x = rng.standard_normal((2, 2, 4, 4))
    y = nn.DenseSkip(conv)(x)
    assert y.shape == (2, 5, 4, 4)
    np.testing.assert_array_equal(y.data[:, :2], x)
    np.testing.assert_array_equal(y.data[:, 2:], conv(x).data)
    with pytest.raises(ValueError, match="DenseSkip"):
        nn.DenseSkip(nn.Conv2d(2, 3, 3, rng=0, dtype=F64))(x)


# --- gradients ----------------------------------------------------------------------------------
def _highway():
    return nn.Highway(_lin(3, 3, 0), _lin(3, 3, 1))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Residual(nn.Sequential(_lin(3, 3, 0), nn.ReLU(), _lin(3, 3, 1))), (4, 3)),
    (lambda: nn.Residual(_lin(3, 2, 0), _lin(3, 2, 1), relu=True), (4, 3)),
    (lambda: nn.ReZero(nn.Sequential(_lin(3, 3, 0), nn.ReLU()), dtype=F64), (4, 3)),
    (lambda: nn.BasicBlock(2, 2, rng=0, dtype=F64), (2, 2, 3, 3)),
    (lambda: nn.BasicBlock(1, 2, stride=2, rng=0, dtype=F64), (2, 1, 4, 4)),
    (_highway, (4, 3)),
    (lambda: nn.DenseSkip(nn.Conv2d(2, 1, 3, padding=1, rng=0, dtype=F64)), (2, 2, 3, 3)),
], ids=["residual", "residual-shortcut-relu", "rezero", "basic", "basic-projection",
        "highway", "dense"])
def test_skip_gradcheck(make, shape, rng):
    module = make()
    for p in module.parameters():  # alpha != 0, BN scales != 1: every path contributes
        p.data[...] = rng.standard_normal(p.shape)
    check_module_grad(module, rng.standard_normal(shape))


# --- gradient norms -----------------------------------------------------------------------------
def _norm(a):
    return float(np.sqrt((a.astype(F64) ** 2).sum()))


@pytest.mark.parametrize("kind", ["residual", "residual-relu", "rezero", "basic",
                                  "basic-projection"])
def test_recorded_grad_norms_match_hooks(kind, rng):
    probe = Probe()
    if kind.startswith("basic"):
        m = nn.BasicBlock(2, 3 if kind.endswith("projection") else 2, rng=0,
                          track_grad_norms=True)
        m.block = nn.Sequential(probe, *m.block)
        x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    else:
        block = nn.Sequential(probe, nn.Linear(4, 4, rng=0), nn.ReLU())
        m = (nn.ReZero(block, track_grad_norms=True) if kind == "rezero" else
             nn.Residual(block, relu=kind.endswith("relu"), track_grad_norms=True))
        if kind == "rezero":
            m.alpha.data[...] = 0.7
        x = rng.standard_normal((3, 4)).astype(np.float32)
    x = Tensor(x, requires_grad=True)
    y = m(x)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(gy)
    # what the add passes to its skip input: gy, masked by the ReLU after the add if any
    g_res = gy * (y.data > 0) if kind != "residual" and kind != "rezero" else gy
    assert len(m.grad_norms) == 1 and len(probe.grads) == 1
    x_in, x_res = m.grad_norms[0]
    np.testing.assert_allclose(x_in, _norm(probe.grads[0]), **tol("fwd_f32_reduce"))
    np.testing.assert_allclose(x_res, _norm(g_res), **tol("fwd_f32_reduce"))
    if kind in ("residual", "rezero"):  # identity skip: the two paths sum to x's gradient
        np.testing.assert_allclose(x.grad, probe.grads[0] + gy, **tol("fwd_f32"))


def test_grad_norms_one_entry_per_backward_and_raw_inputs(rng):
    m = nn.Residual(nn.Linear(3, 3, rng=0), track_grad_norms=True)
    x = rng.standard_normal((2, 3)).astype(np.float32)  # a raw array needs no gradient
    y = m(x)
    y.backward(np.ones((2, 3), np.float32), retain_graph=True)
    y.backward(np.ones((2, 3), np.float32))
    assert len(m.grad_norms) == 2 and m.grad_norms[0] == m.grad_norms[1]
    w_col = m.block.weight.data.sum(axis=0)  # d(sum)/dx along the block path, per row
    np.testing.assert_allclose(m.grad_norms[0], (_norm(np.tile(w_col, (2, 1))), np.sqrt(6)),
                               **tol("fwd_f32"))
    with minires.no_grad():
        m(x)
    assert len(m.grad_norms) == 2


def test_grad_norm_tracking_off_adds_no_nodes(rng):
    x = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    for m in (nn.Residual(_lin(3, 3, 0)), nn.ReZero(_lin(3, 3, 0), dtype=F64)):
        y = m(x)
        assert y.creator.inputs[0] is x  # the skip input is x itself: no alias node
        assert y.creator.inputs[1].creator.inputs[0] is x and not x._hooks
        y.sum().backward()
        assert m.grad_norms == []
