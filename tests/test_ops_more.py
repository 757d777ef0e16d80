"""The ops added with higher-order gradients: min, clip, leaky_relu, mse_loss, astype and
sum_to. Forward against closed forms (float32 and float64), float64 gradcheck and
gradgradcheck of every input, bad arguments, and PyTorch side by side where installed."""
import numpy as np
import pytest

import minires.ops as F
from conftest import to_numpy
from helpers import check_forward, check_grad, check_gradgrad
from minires.gradcheck import away_from_kinks, distinct
from minires.tensor import Tensor

DTYPES = [np.float32, np.float64]


def on(xp, a, dtype=np.float64):
    return xp.asarray(np.array(a, dtype=dtype))


@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (1, True), ((0, 2), False),
                                           (-1, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_min_forward_and_gradients(xp, rng, axis, keepdims, dtype):
    a = distinct(rng.standard_normal((3, 4, 2)))
    y = F.min(on(xp, a, dtype), axis=axis, keepdims=keepdims)
    check_forward(y, np.min(a, axis=axis, keepdims=keepdims), dtype)
    fn = lambda x: F.min(x, axis=axis, keepdims=keepdims)  # noqa: E731
    check_grad(fn, [on(xp, a)])
    check_gradgrad(fn, [on(xp, a)])


def test_min_splits_the_gradient_among_ties(xp):
    x = Tensor(on(xp, [[1.0, 1.0, 2.0], [3.0, 0.0, 0.0]]), requires_grad=True)
    F.min(x, axis=1).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    assert Tensor(on(xp, [2.0, -1.0])).min().item() == -1.0


def test_min_errors(xp):
    with pytest.raises(ValueError, match=r"min: axis 2 out of range for an array of shape"):
        F.min(on(xp, np.ones((2, 2))), axis=2)
    with pytest.raises(ValueError, match=r"min: cannot reduce an empty array of shape \(0,\)"):
        F.min(on(xp, np.ones(0)))


@pytest.mark.parametrize("low,high", [(-0.5, 0.5), (None, 0.3), (-0.2, None), (1.0, -1.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_forward_and_gradients(xp, rng, low, high, dtype):
    a = rng.standard_normal((4, 5))
    for k in (low, high):  # keep the numerical differences off the bounds (the kinks)
        a = a if k is None else k + away_from_kinks(a - k)
    y = F.clip(on(xp, a, dtype), low, high)
    expected = np.minimum(np.maximum(a, -np.inf if low is None else low),
                          np.inf if high is None else high)  # min > max: max everywhere
    check_forward(y, expected, dtype)
    fn = lambda x: F.clip(x, low, high)  # noqa: E731
    check_grad(fn, [on(xp, a)])
    check_gradgrad(fn, [on(xp, a)])


def test_clip_gradient_includes_the_bounds(xp):
    x = Tensor(on(xp, [-2.0, -1.0, 0.0, 1.0, 2.0]), requires_grad=True)
    F.clip(x, -1.0, 1.0).sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), [0, 1, 1, 1, 0])


def test_clip_errors(xp):
    x = on(xp, [1.0, 2.0])
    with pytest.raises(ValueError, match="clip: at least one of min and max must be given"):
        F.clip(x)
    with pytest.raises(TypeError, match="clip: max must be a number or None, got str"):
        F.clip(x, 0.0, "1")
    with pytest.raises(TypeError, match="clip: expected a float32 or float64 input, got int64"):
        F.clip(xp.asarray(np.array([1, 2])), 0, 1)


@pytest.mark.parametrize("slope", [0.01, 0.2, 0.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_leaky_relu_forward_and_gradients(xp, rng, slope, dtype):
    a = away_from_kinks(rng.standard_normal((2, 3, 4)))
    y = F.leaky_relu(on(xp, a, dtype), slope)
    check_forward(y, np.where(a > 0, a, slope * a), dtype)
    fn = lambda x: F.leaky_relu(x, slope)  # noqa: E731
    check_grad(fn, [on(xp, a)])
    check_gradgrad(fn, [on(xp, a)])
    assert F.leaky_relu(Tensor(on(xp, [-1.0]))).item() == pytest.approx(-0.01)  # the default


def test_leaky_relu_errors(xp):
    with pytest.raises(TypeError, match="leaky_relu: negative_slope must be a number, got str"):
        F.leaky_relu(on(xp, [1.0]), "0.1")
    with pytest.raises(TypeError, match="leaky_relu: expected a float32 or float64 input"):
        F.leaky_relu(xp.asarray(np.array([1, -1])))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_loss_forward_and_gradients(xp, rng, reduction, dtype):
    a, b = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 4))
    y = F.mse_loss(on(xp, a, dtype), on(xp, b, dtype), reduction)
    sq = (a - b) ** 2
    check_forward(y, {"mean": sq.mean(), "sum": sq.sum(), "none": sq}[reduction], dtype,
                  reduce=reduction != "none")
    fn = lambda x, t: F.mse_loss(x, t, reduction)  # noqa: E731
    check_grad(fn, [on(xp, a), on(xp, b)])
    check_gradgrad(fn, [on(xp, a), on(xp, b)])


def test_mse_loss_errors(xp):
    a = on(xp, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"mse_loss: input shape \(2, 3\) != target shape "
                                         r"\(3,\) \(no broadcasting"):
        F.mse_loss(a, on(xp, np.ones(3)))
    with pytest.raises(ValueError, match="mse_loss: reduction must be 'mean', 'sum' or 'none', "
                                         "got 'avg'"):
        F.mse_loss(a, a, "avg")
    with pytest.raises(TypeError, match="mse_loss: expected float32 or float64 inputs of one "
                                        "dtype, got float64, float32"):
        F.mse_loss(a, on(xp, np.ones((2, 3)), np.float32))


def test_astype_converts_and_converts_the_gradient_back(xp):
    x = Tensor(on(xp, [1.5, -2.25]), requires_grad=True)
    y = F.astype(x, np.float32)
    assert y.dtype == np.float32 and x.astype("float32").dtype == np.float32
    (y * y).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(to_numpy(x.grad), [3.0, -4.5])
    check_gradgrad(lambda t: F.astype(t, np.float64) ** 3, [on(xp, [1.5, -2.25])])


@pytest.mark.parametrize("shape,target", [((2, 3, 4), (3, 1)), ((2, 3), (2, 3)),
                                          ((4, 1, 5), (1, 5)), ((3, 2), ())])
def test_sum_to_is_broadcast_to_s_adjoint(xp, rng, shape, target):
    a = rng.standard_normal(shape)
    y = F.sum_to(on(xp, a), target)
    lead = len(shape) - len(target)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(target) if n == 1
                                      and shape[lead + i] != 1)
    check_forward(y, a.sum(axis=axes).reshape(target) if axes else a, np.float64, reduce=True)
    fn = lambda x: F.sum_to(x, target)  # noqa: E731
    check_grad(fn, [on(xp, a)])
    check_gradgrad(fn, [on(xp, a)])


def test_sum_to_error(xp):
    with pytest.raises(ValueError, match=r"sum_to: shape \(3,\) does not broadcast to the "
                                         r"input's shape \(2, 4\)"):
        F.sum_to(on(xp, np.ones((2, 4))), (3,))


@pytest.mark.parametrize("name", ["clip", "leaky_relu", "mse_loss", "min"])
def test_against_torch(rng, name):
    torch = pytest.importorskip("torch")
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    ours = {"clip": lambda x: F.clip(x, -0.5, 0.3), "leaky_relu": lambda x: F.leaky_relu(x, .1),
            "mse_loss": lambda x: F.mse_loss(x, b), "min": lambda x: F.min(x, axis=1)}[name]
    theirs = {"clip": lambda x: torch.clip(x, -0.5, 0.3),
              "leaky_relu": lambda x: torch.nn.functional.leaky_relu(x, .1),
              "mse_loss": lambda x: torch.nn.functional.mse_loss(x, torch.tensor(b)),
              "min": lambda x: torch.amin(x, dim=1)}[name]
    x = Tensor(a, requires_grad=True)
    tx = torch.tensor(a, requires_grad=True)
    y, ty = ours(x), theirs(tx)
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-12)
    y.sum().backward()
    ty.sum().backward()
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-12)
