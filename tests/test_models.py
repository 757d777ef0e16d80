"""minires.models: seed_net's structure, shapes, parameter count, gradients and (optionally)
its forward against PyTorch; resnet, plain_net and residual_net."""
import numpy as np
import pytest

from minires import models, nn
from minires.tensor import Tensor

from conftest import fwd_tol, tol
from helpers import check_module_grad


def _images(n, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(dtype)


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("skip, skip_type, count", [
    ("residual", nn.Residual, 10890), ("rezero", nn.ReZero, 10891), ("none", nn.Sequential, 10890)])
def test_seed_net_structure_shape_and_parameter_count(skip, skip_type, count):
    # 3x3 convs: 1*9*16+16 = 160, then four of 16*9*16+16 = 2320; linear 144*10+10 = 1450
    model = models.seed_net(skip=skip)
    assert isinstance(model.skip, skip_type)
    assert sum(p.size for p in model.parameters()) == count
    convs = _convs(model)
    assert len(convs) == 5 and all(c.padding == (1, 1) and c.kernel_size == (3, 3)
                                   for c in convs)
    assert model(_images(3)).shape == (3, 10)


def test_seed_net_variants_share_weights_and_rezero_starts_without_block():
    plain, res, rz = (models.seed_net(skip=s, rng=7) for s in ("none", "residual", "rezero"))
    rz_params = [p for p in rz.parameters() if p is not rz.skip.alpha]
    for a, b, c in zip(plain.parameters(), res.parameters(), rz_params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.data, c.data)
    x = _images(2)
    h = res.features(x)
    np.testing.assert_allclose(res(x).data, res.head(h.data + res.skip.block(h).data).data,
                               **fwd_tol(np.float32, reduce=True))
    np.testing.assert_array_equal(rz(x).data, rz.head(rz.features(x)).data)  # alpha = 0
    with pytest.raises(ValueError, match="seed_net: skip must be one of"):
        models.seed_net(skip="dense")


def test_seed_net_records_grad_norms_each_step():
    model = models.seed_net(channels=4, track_grad_norms=True)
    for _ in range(2):
        model(_images(2)).sum().backward()
    assert len(model.skip.grad_norms) == 2
    assert all(a > 0 and b > 0 for a, b in model.skip.grad_norms)


def test_seed_net_gradcheck_float64():
    model = models.seed_net(channels=2, rng=1, dtype=np.float64)
    # fast mode: one random direction per input (full mode would need ~2,000 forwards)
    check_module_grad(model, _images(1, dtype=np.float64), fast=True)


def test_seed_net_forward_matches_torch():
    torch = pytest.importorskip("torch")
    model = models.seed_net(channels=4, rng=3, dtype=np.float64)
    tn = torch.nn
    ref = tn.Sequential(
        tn.Conv2d(1, 4, 3, padding=1), tn.ReLU(), tn.Conv2d(4, 4, 3, padding=1), tn.ReLU(),
        tn.Conv2d(4, 4, 3, padding=1), tn.ReLU(), tn.MaxPool2d(4),
        tn.Conv2d(4, 4, 3, padding=1), tn.ReLU(), tn.Conv2d(4, 4, 3, padding=1), tn.ReLU(),
        tn.MaxPool2d(2), tn.Flatten(), tn.Linear(36, 10)).double()
    torch_params = [p for m in ref if list(m.parameters()) for p in m.parameters()]
    with torch.no_grad():
        for p, q in zip(torch_params, model.parameters()):
            p.copy_(torch.from_numpy(q.data))
    x = _images(2, dtype=np.float64)
    with torch.no_grad():
        h = ref[:7](torch.from_numpy(x))
        y = ref[12:](ref[11](ref[7:11](h) + h))
    np.testing.assert_allclose(model(x).data, y.numpy(), **tol("fwd_f64"))


def test_resnet_stages_shapes_and_projections():
    model = models.resnet(depth=8, channels=4)
    assert len(model.blocks) == 3 and all(isinstance(b, nn.BasicBlock) for b in model.blocks)
    assert [b.stride for b in model.blocks] == [1, 2, 2]
    assert [b.shortcut is not None for b in model.blocks] == [False, True, True]
    assert [b.channels for b in model.blocks] == [4, 8, 16]
    assert model(_images(2)).shape == (2, 10)
    assert len(models.resnet(blocks=(2, 1), channels=4).blocks) == 3
    assert len(models.resnet(depth=14, channels=2).blocks) == 6
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.resnet(depth=10)


def test_resnet_eval_uses_running_statistics():
    model = models.resnet(depth=8, channels=2)
    x = _images(4)
    y_train = model(x).data
    model.eval()
    assert not np.allclose(model(x).data, y_train)
    bn = model.stem[1]
    assert bn.running_mean.any() and not bn.training


@pytest.mark.parametrize("batch_norm", [True, False])
def test_plain_and_residual_nets_share_convs(batch_norm):
    plain = models.plain_net(3, channels=4, batch_norm=batch_norm, rng=2)
    res = models.residual_net(3, channels=4, batch_norm=batch_norm, rng=2,
                              track_grad_norms=True)
    assert len(_convs(plain)) == len(_convs(res)) == 7
    for a, b in zip(plain.parameters(), res.parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    assert all(isinstance(b, nn.Residual) and b.relu for b in res.blocks)
    x = Tensor(_images(2))
    assert plain(x).shape == res(x).shape == (2, 10)
    res(x).sum().backward()
    assert all(len(b.grad_norms) == 1 for b in res.blocks)
    with pytest.raises(ValueError, match="depth"):
        models.plain_net(0)
