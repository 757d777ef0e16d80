"""minires.nn: Module discovery, modes, devices, state dicts, repr, and every layer's forward
(closed form) and gradients (gradcheck)."""
import numpy as np
import pytest

import minires
from minires import nn
from minires.tensor import Parameter, Tensor

from conftest import fwd_tol, to_numpy, tol
from helpers import check_module_grad, naive_conv


class Tiny(nn.Module):
    """Parameters and sub-modules interleaved, a list of modules and a shared parameter."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4, rng=0)
        self.scale = Parameter(np.ones(4, np.float32))
        self.stack = [nn.Linear(4, 4, rng=1), nn.ReLU(), nn.Linear(4, 2, bias=False, rng=2)]
        self.again = self.scale  # the same Parameter twice: listed once
        self.norm = nn.BatchNorm2d(2)

    def forward(self, x):
        h = self.first(x) * self.scale
        for m in self.stack:
            h = m(h)
        return self.norm(h)


# --- discovery --------------------------------------------------------------------------------
def test_parameters_in_definition_order_with_lists_and_sharing():
    names = [n for n, _ in Tiny().named_parameters()]
    assert names == ["first.weight", "first.bias", "scale", "stack.0.weight", "stack.0.bias",
                     "stack.2.weight", "norm.weight", "norm.bias"]
    m = Tiny()
    assert len(m.parameters()) == 8
    assert sum(p.size for p in m.parameters()) == 12 + 4 + 4 + 20 + 8 + 2 + 2


def test_parameter_order_is_stable_across_instances():
    a = [n for n, _ in nn.Sequential(Tiny(), nn.Linear(2, 2)).named_parameters()]
    b = [n for n, _ in nn.Sequential(Tiny(), nn.Linear(2, 2)).named_parameters()]
    assert a == b and a[0] == "0.first.weight" and a[-1] == "1.bias"


def test_buffers_are_in_state_dict_after_parameters():
    m = Tiny()
    assert [n for n, _ in m.named_buffers()] == ["norm.running_mean", "norm.running_var"]
    keys = list(m.state_dict())
    assert keys[-2:] == ["norm.running_mean", "norm.running_var"] and len(keys) == 10


def test_register_buffer_rejects_tensors_and_bad_names():
    m = nn.Module()
    with pytest.raises(TypeError, match="raw array"):
        m.register_buffer("b", minires.zeros(2))
    with pytest.raises(ValueError, match="identifier"):
        m.register_buffer("a.b", np.zeros(2))


def test_train_eval_propagate_to_every_submodule():
    m = nn.Sequential(Tiny(), nn.Residual(nn.Sequential(nn.ReLU())))
    assert m.eval() is m
    assert all(not sub.training for sub in m.modules())
    m.train()
    assert all(sub.training for sub in m.modules())
    assert len(list(m.modules())) == 10


def test_zero_grad_clears_every_gradient():
    m = Tiny()
    x = minires.randn(5, 3, rng=0)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_to_device_keeps_parameter_identity(xp):
    m = Tiny()
    before = [id(p) for p in m.parameters()]
    x = minires.randn(4, 3, rng=0)
    m(x).sum().backward()
    device = "cpu" if xp is np else "cuda"
    assert m.to(device) is m
    assert [id(p) for p in m.parameters()] == before
    assert all(p.device == device and type(p.grad) is type(p.data) for p in m.parameters())
    assert all(type(a) is xp.ndarray for _, a in m.named_buffers())
    with pytest.raises(ValueError, match="unknown device"):
        m.to("tpu")


# --- state dicts ------------------------------------------------------------------------------
def _snapshot(m):
    return {k: to_numpy(v).copy() for k, v in m._state_items().items()}


def test_state_dict_round_trip_in_place():
    a, b = Tiny(), Tiny()
    b.first.weight.data += 1
    b.norm.running_var[...] = 3
    ids = [id(p.data) for p in a.parameters()] + [id(a.norm.running_mean)]
    sd = b.state_dict()
    assert a.load_state_dict(sd) == nn.IncompatibleKeys([], [])
    assert [id(p.data) for p in a.parameters()] + [id(a.norm.running_mean)] == ids
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    sd["first.weight"] += 5  # state_dict holds copies
    assert not np.array_equal(b.first.weight.data, sd["first.weight"])


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd.pop("stack.0.bias"), "missing keys \\['stack.0.bias'\\]"),
    (lambda sd: sd.__setitem__("extra.weight", np.zeros(2)), "unexpected keys"),
    (lambda sd: sd.__setitem__("norm.running_var", np.zeros(3, np.float32)),
     "'norm.running_var' has shape \\(3,\\)"),
    (lambda sd: sd.__setitem__("norm.bias", np.zeros(2, np.float64)),
     "'norm.bias' has dtype float64"),
    (lambda sd: sd.__setitem__("scale", 1.0), "'scale' must be an array"),
])
def test_load_state_dict_failures_change_nothing(corrupt, match):
    m, other = Tiny(), Tiny()
    other.first.weight.data += 1  # the first key differs, so a partial load would show
    sd = other.state_dict()
    corrupt(sd)
    before = _snapshot(m)
    with pytest.raises(ValueError, match=match):
        m.load_state_dict(sd)
    after = _snapshot(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_load_state_dict_non_strict_reports_and_loads_the_rest():
    m, other = Tiny(), Tiny()
    other.scale.data[...] = 7
    sd = other.state_dict()
    sd.pop("first.bias")
    sd["bogus"] = np.zeros(1)
    result = m.load_state_dict(sd, strict=False)
    assert result.missing == ["first.bias"] and result.unexpected == ["bogus"]
    np.testing.assert_array_equal(m.scale.data, 7)
    with pytest.raises(ValueError, match="'scale' has shape"):
        m.load_state_dict({"scale": np.zeros(5, np.float32)}, strict=False)


# --- repr and Sequential ----------------------------------------------------------------------
def test_repr_is_nested_and_readable():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, rng=0), nn.ReLU(),
                      nn.Residual(nn.Sequential(nn.Linear(2, 2, rng=0)), relu=True))
    assert repr(m) == (
        "Sequential(\n"
        "  (0): Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=True)\n"
        "  (1): ReLU()\n"
        "  (2): Residual(\n"
        "    relu=True\n"
        "    (block): Sequential(\n"
        "      (0): Linear(2, 2, bias=True)\n"
        "    )\n"
        "  )\n"
        ")")


def test_sequential_indexing_iteration_and_errors():
    layers = [nn.Linear(2, 3, rng=0), nn.ReLU(), nn.Linear(3, 1, rng=1)]
    s = nn.Sequential(*layers)
    assert len(s) == 3 and list(s) == layers and s[-1] is layers[2] and s[0] is layers[0]
    assert list(s[1:]) == layers[1:] and isinstance(s[1:], nn.Sequential)
    with pytest.raises(IndexError, match="out of range"):
        s[3]
    with pytest.raises(TypeError, match="expected a Module"):
        nn.Sequential(np.zeros(2))
    x = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    np.testing.assert_allclose(s(x).data, layers[2](layers[1](layers[0](x))).data)


# --- layers: forward against closed forms -----------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_forward_and_init(dtype, rng):
    layer = nn.Linear(5, 3, rng=1, dtype=dtype)
    x = rng.standard_normal((4, 5)).astype(dtype)
    layer.bias.data[...] = [1, 2, 3]
    y = layer(x)
    assert y.dtype == dtype and y.shape == (4, 3)
    w, b = layer.weight.data.astype(np.float64), layer.bias.data.astype(np.float64)
    np.testing.assert_allclose(y.data, x @ w.T + b, **fwd_tol(dtype, reduce=True))
    w32 = nn.Linear(5, 3, rng=1).weight.data
    np.testing.assert_array_equal(w32, nn.Linear(5, 3, rng=1, dtype=np.float64).weight.data
                                  .astype(np.float32))  # one seed, same draws in either dtype
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.Linear(2, 2, dtype=np.int32)


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_conv2d_forward_matches_direct_loops(stride, padding, rng):
    conv = nn.Conv2d(2, 3, 3, stride, padding, rng=0, dtype=np.float64)
    conv.bias.data[...] = rng.standard_normal(3)
    x = rng.standard_normal((2, 2, 6, 5))
    np.testing.assert_allclose(conv(x).data, naive_conv(x, conv.weight.data, conv.bias.data,
                                                        stride, padding), **tol("fwd_f64"))


def test_kaiming_normal_statistics_and_zero_bias():
    conv = nn.Conv2d(64, 64, 3, rng=0)
    w = conv.weight.data.astype(np.float64)
    # 36864 draws: the std estimate has relative sd ~0.4%; 3% is far outside chance
    assert abs(w.std() / np.sqrt(2 / (64 * 9)) - 1) < 0.03 and abs(w.mean()) < 0.01
    assert not conv.bias.data.any()
    np.testing.assert_array_equal(w, nn.Conv2d(64, 64, 3, rng=0).weight.data)
    gen = np.random.default_rng(5)
    a, b = nn.Linear(3, 3, rng=gen), nn.Linear(3, 3, rng=gen)  # a Generator advances
    assert not np.array_equal(a.weight.data, b.weight.data)
    with pytest.raises(TypeError, match="rng must be"):
        nn.Linear(2, 2, rng=1.5)


def test_pooling_flatten_relu_layers(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    blocks = x.reshape(2, 3, 2, 2, 2, 2)
    np.testing.assert_array_equal(nn.MaxPool2d(2)(x).data, blocks.max(axis=(3, 5)))
    np.testing.assert_allclose(nn.AvgPool2d(2)(x).data, blocks.mean(axis=(3, 5)),
                               **tol("fwd_f64"))
    np.testing.assert_allclose(nn.GlobalAvgPool2d()(x).data, x.mean(axis=(2, 3)),
                               **tol("fwd_f64"))
    np.testing.assert_array_equal(nn.Flatten()(x).data, x.reshape(2, 48))
    np.testing.assert_array_equal(nn.ReLU()(x).data, np.maximum(x, 0))
    assert nn.MaxPool2d(3, stride=1)(x).shape == (2, 3, 2, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_train_then_eval(dtype, rng):
    bn = nn.BatchNorm2d(3, momentum=0.2, dtype=dtype)
    bn.weight.data[...] = [1, 2, 3]
    bn.bias.data[...] = [0, -1, 1]
    x = (rng.standard_normal((4, 3, 2, 2)) * 3 + 1).astype(dtype)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    g, b = bn.weight.data[None, :, None, None], bn.bias.data[None, :, None, None]
    expect = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5) * g + b
    y = bn(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y.data, expect, **fwd_tol(dtype, reduce=True))
    np.testing.assert_allclose(bn.running_mean, 0.2 * mean, **fwd_tol(dtype, reduce=True))
    np.testing.assert_allclose(bn.running_var, 0.8 + 0.2 * var * 16 / 15,
                               **fwd_tol(dtype, reduce=True))
    bn.eval()
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    expect = (x - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + 1e-5) * g + b
    np.testing.assert_allclose(bn(x).data, expect, **fwd_tol(dtype, reduce=True))
    np.testing.assert_array_equal(bn.running_mean, rm)  # eval leaves the statistics alone


def test_dropout_train_mask_and_eval_identity():
    x = np.ones((200, 50), np.float32)
    y = nn.Dropout(0.25, rng=3)(x).data
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.02  # 10,000 draws: sd of the rate ~0.004
    np.testing.assert_array_equal(y, nn.Dropout(0.25, rng=3)(x).data)  # same seed, same mask
    d = nn.Dropout(0.25, rng=3).eval()
    np.testing.assert_array_equal(d(x).data, x)
    with pytest.raises(ValueError, match="Dropout: p"):
        nn.Dropout(1.0)


def _small_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, rng=0), nn.BatchNorm2d(2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.1, rng=0),
                         nn.Linear(8, 3, rng=1))


def test_layers_run_on_every_backend(xp):
    device = "cpu" if xp is np else "cuda"
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    ref = _small_net()  # a host run from the same seeds
    expect = ref(x).data
    m = _small_net().to(device)
    y = m(minires.tensor(x, device=device))
    assert y.device == device
    np.testing.assert_allclose(to_numpy(y), expect, **tol("gpu_vs_cpu_f32"))
    np.testing.assert_allclose(to_numpy(m[1].running_mean), ref[1].running_mean,
                               **tol("gpu_vs_cpu_f32"))


# --- gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(4, 3, rng=0, dtype=np.float64), (2, 4)),
    (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, rng=0, dtype=np.float64), (2, 2, 5, 5)),
    (lambda: nn.BatchNorm2d(3, dtype=np.float64), (3, 3, 2, 2)),
    (lambda: nn.BatchNorm2d(3, dtype=np.float64).eval(), (3, 3, 2, 2)),
])
def test_layer_gradcheck(make, shape, rng):
    layer = make()
    for p in layer.parameters():  # non-trivial values (BN's scale is ones, biases zeros)
        p.data[...] = rng.standard_normal(p.shape)
    check_module_grad(layer, rng.standard_normal(shape))


def test_gradients_reach_parameters_through_module_call():
    lin = nn.Linear(3, 2, rng=0, dtype=np.float64)
    x = np.arange(6.0).reshape(2, 3)
    lin(Tensor(x)).sum().backward()
    np.testing.assert_allclose(lin.weight.grad, np.tile(x.sum(axis=0), (2, 1)), **tol("fwd_f64"))
    np.testing.assert_allclose(lin.bias.grad, [2.0, 2.0], **tol("fwd_f64"))
