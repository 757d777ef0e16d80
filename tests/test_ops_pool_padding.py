"""Padded pooling (PyTorch semantics: -inf / zero padding, at most half the kernel,
count_include_pad) and gradients of every order of max_pool2d, avg_pool2d and
global_avg_pool2d, against a direct NumPy closed form and, where installed, PyTorch. Runs on
every `xp` backend."""
import numpy as np
import pytest

import minires
import minires.ops as F
from conftest import to_numpy
from helpers import adjoint, check_forward, check_grad, check_gradgrad
from minires import nn
from minires.gradcheck import distinct
from minires.tensor import Tensor

DTYPES = [np.float32, np.float64]


def on(xp, a, dtype=np.float64):
    """A copy of host data `a` as an xp array of `dtype` (never an alias of `a`)."""
    return xp.asarray(np.array(a, dtype=dtype))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def direct_pool(x, kernel, stride, padding, kind, count_include_pad=True):
    """The definition on sliding windows of the explicitly padded input (float64 closed form):
    kind "max" pads with -inf, "avg" with zeros and divides by KH*KW or, without
    count_include_pad, by the number of elements of x in the window."""
    (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
    sh, sw = _pair(kernel if stride is None else stride)
    frame = ((0, 0), (0, 0), (ph, ph), (pw, pw))
    xpad = np.pad(x, frame, constant_values=-np.inf if kind == "max" else 0.0)
    win = np.lib.stride_tricks.sliding_window_view(xpad, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    if kind == "max":
        return win.max(axis=(4, 5))
    if count_include_pad:
        return win.mean(axis=(4, 5))
    real = np.pad(np.ones(x.shape[2:]), frame[2:])
    count = np.lib.stride_tricks.sliding_window_view(real, (kh, kw))[::sh, ::sw].sum(axis=(2, 3))
    return win.sum(axis=(4, 5)) / count


CASES = [  # x shape, kernel, stride, padding
    ((2, 2, 4, 4), 2, None, 1),
    ((1, 3, 5, 5), 3, 1, 1),                  # overlapping, output as big as the input
    ((2, 1, 5, 7), 3, 2, 1),                  # the ResNet stem's 3x3 stride-2 pool
    ((1, 2, 6, 5), (3, 2), (2, 1), (1, 0)),   # pairs; one axis unpadded
    ((1, 1, 3, 4), (4, 5), 1, 2),             # kernel larger than x; padding = half of it
    ((2, 2, 5, 4), 3, 1, 0),                  # no padding
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, kernel, stride, padding", CASES)
def test_padded_pool_forward(xp, rng, dtype, xs, kernel, stride, padding):
    x = rng.standard_normal(xs).astype(dtype)  # the reference sees the same rounded values
    y = F.max_pool2d(on(xp, x, dtype), kernel, stride, padding)
    check_forward(y, direct_pool(x.astype(np.float64), kernel, stride, padding, "max"), dtype)
    for include in (True, False):
        y = F.avg_pool2d(on(xp, x, dtype), kernel, stride, padding, count_include_pad=include)
        expected = direct_pool(x.astype(np.float64), kernel, stride, padding, "avg", include)
        check_forward(y, expected, dtype, reduce=True)


def test_count_include_pad_by_hand(xp):
    x = on(xp, np.ones((1, 1, 3, 3)))
    with_pad = F.avg_pool2d(x, 3, stride=1, padding=1)  # zeros of the frame count
    np.testing.assert_allclose(to_numpy(with_pad)[0, 0],
                               np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]]) / 9)
    without = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    np.testing.assert_allclose(to_numpy(without)[0, 0], np.ones((3, 3)))


def test_max_pool_padding_never_wins(xp, rng):
    x = Tensor(on(xp, -1e30 - rng.random((2, 3, 5, 5))), requires_grad=True)  # all below 0
    y = F.max_pool2d(x, 3, stride=2, padding=1)
    assert np.isfinite(to_numpy(y)).all()
    check_forward(y, direct_pool(to_numpy(x), 3, 2, 1, "max"), np.float64)
    gy = rng.standard_normal(y.shape)
    y.backward(on(xp, gy))  # each window's gradient reaches an element of x, none is cropped
    np.testing.assert_allclose(to_numpy(x.grad).sum(axis=(2, 3)), gy.sum(axis=(2, 3)))


def test_padding_free_path_never_pads(xp, rng, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("padding=0 must not copy x into a padded array")

    monkeypatch.setattr(xp, "pad", refuse)
    x = Tensor(on(xp, rng.standard_normal((1, 2, 4, 4))), requires_grad=True)
    (F.max_pool2d(x, 2, padding=0) + F.avg_pool2d(x, 2)).sum().backward()
    assert x.grad.shape == (1, 2, 4, 4)


# --- gradients of every order ----------------------------------------------------------------
def pools(kernel, stride, padding):
    """(name, x -> pooled x) for max pooling and both kinds of average pooling."""
    return [("max", lambda x: F.max_pool2d(x, kernel, stride, padding)),
            ("avg", lambda x: F.avg_pool2d(x, kernel, stride, padding)),
            ("avg_real_only", lambda x: F.avg_pool2d(x, kernel, stride, padding,
                                                      count_include_pad=False))]


@pytest.mark.parametrize("xs, kernel, stride, padding", CASES)
def test_padded_pool_grad_and_gradgrad(xp, rng, xs, kernel, stride, padding):
    x = on(xp, distinct(rng.standard_normal(xs)))  # ties make max pooling non-differentiable
    for name, pool in pools(kernel, stride, padding):
        check_grad(pool, [x])
        check_gradgrad(pool, [x])


@pytest.mark.parametrize("xs, kernel, stride, padding", [CASES[2], CASES[3], CASES[5]])
def test_pool_backward_ops_differentiate_to_any_order(xp, rng, xs, kernel, stride, padding):
    """max: the scatter to the argmax and the gather from it; avg: the transpose and the
    pooling again; each is the other's gradient, so both orders are checked."""
    x = on(xp, distinct(rng.standard_normal(xs)))
    for name, pool in pools(kernel, stride, padding):
        gy = on(xp, rng.standard_normal(pool(x).shape))
        scatter = adjoint(pool, x)        # gy -> gx: records the backward op
        gather = adjoint(scatter, gy)     # gx-shaped g -> gy-shaped: records its transpose
        for fn, arg in ((scatter, gy), (gather, x)):
            check_grad(fn, [arg])
            check_gradgrad(fn, [arg])


@pytest.mark.parametrize("xs", [(2, 3, 4, 5), (1, 1, 1, 1)])
def test_global_avg_pool2d_gradgrad(xp, rng, xs):
    x = on(xp, rng.standard_normal(xs))
    check_gradgrad(F.global_avg_pool2d, [x])
    check_gradgrad(adjoint(F.global_avg_pool2d, x), [on(xp, rng.standard_normal(xs[:2]))])


def test_max_pool_second_derivative_is_zero(xp, rng):
    """d(gx)/dx = 0 (the argmax is locally constant); with windows apart, gx holds each gy
    once, so d<gx, gx>/d(gy) = 2 gy."""
    x = Tensor(on(xp, distinct(rng.standard_normal((1, 2, 5, 5)))), requires_grad=True)
    gy = Tensor(on(xp, rng.standard_normal((1, 2, 3, 3))), requires_grad=True)
    (gx,) = minires.grad(F.max_pool2d(x, 2, padding=1), [x], gy, create_graph=True)
    ggx, ggy = minires.grad((gx * gx).sum(), [x, gy], allow_unused=True)
    assert ggx is None or not to_numpy(ggx).any()
    check_forward(ggy, 2 * to_numpy(gy), np.float64)


# --- errors ---------------------------------------------------------------------------------
def z(xp, *shape, dtype=np.float64):
    return Tensor(xp.zeros(shape, dtype=dtype))


BAD_INPUTS = {  # name: (call(xp), error type, message regex)
    "max_padding_over_half": (lambda xp: F.max_pool2d(z(xp, 1, 1, 6, 6), 3, padding=2),
                              ValueError, r"max_pool2d: padding \(2, 2\) must be between 0 and "
                                          r"half of kernel_size \(3, 3\)"),
    "avg_padding_pair": (lambda xp: F.avg_pool2d(z(xp, 1, 1, 6, 6), (2, 4), padding=(1, 3)),
                         ValueError, r"avg_pool2d: padding \(1, 3\) .*kernel_size \(2, 4\)"),
    "negative_padding": (lambda xp: F.max_pool2d(z(xp, 1, 1, 4, 4), 2, padding=-1), ValueError,
                         r"max_pool2d: padding \(-1, -1\) must be between 0"),
    "padding_type": (lambda xp: F.avg_pool2d(z(xp, 1, 1, 4, 4), 2, padding=1.5), ValueError,
                     "avg_pool2d: padding must be an int or a pair of ints, got 1.5"),
    "zero_stride": (lambda xp: F.max_pool2d(z(xp, 1, 1, 4, 4), 2, stride=0), ValueError,
                    r"max_pool2d: kernel_size and stride must be positive, got kernel_size "
                    r"\(2, 2\) and stride \(0, 0\)"),
    "kernel_over_padded": (lambda xp: F.max_pool2d(z(xp, 1, 1, 2, 2), 5, padding=1), ValueError,
                           r"max_pool2d: kernel \(5, 5\) larger than input \(2, 2\) padded by "
                           r"\(1, 1\)"),
    "avg_int": (lambda xp: F.avg_pool2d(z(xp, 1, 1, 4, 4, dtype=np.int64), 3, padding=1),
                TypeError, "avg_pool2d: expected a float32 or float64 input, got int64"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(xp, case):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call(xp)


# --- layers ---------------------------------------------------------------------------------
def test_pool_layers_with_padding(xp, rng):
    x = on(xp, rng.standard_normal((2, 3, 7, 6)))
    layer = nn.MaxPool2d(3, stride=2, padding=1)
    assert layer(x).shape == (2, 3, 4, 3)  # floor((7 + 2 - 3) / 2) + 1, floor((6 + 2 - 3) / 2) + 1
    check_forward(layer(x), direct_pool(to_numpy(x), 3, 2, 1, "max"), np.float64)
    for include in (True, False):
        layer = nn.AvgPool2d((3, 2), stride=1, padding=(1, 1), count_include_pad=include)
        expected = direct_pool(to_numpy(x), (3, 2), 1, (1, 1), "avg", include)
        check_forward(layer(x), expected, np.float64)


def test_pool_layer_repr_and_defaults():
    assert repr(nn.MaxPool2d(2)) == "MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0))"
    assert repr(nn.AvgPool2d(3, 2, 1, count_include_pad=False)) == (
        "AvgPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), count_include_pad=False)")
    assert nn.AvgPool2d(2).count_include_pad is True


@pytest.mark.parametrize("make, message", [
    (lambda: nn.MaxPool2d(3, padding=2), r"MaxPool2d: padding \(2, 2\) .*kernel_size \(3, 3\)"),
    (lambda: nn.AvgPool2d(2, padding=(0, 2)),
     r"AvgPool2d: padding \(0, 2\) .*kernel_size \(2, 2\)"),
    (lambda: nn.AvgPool2d(2, padding="same"), "AvgPool2d: padding must be an int or a pair"),
])
def test_pool_layers_refuse_bad_padding_when_built(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- PyTorch, where installed ---------------------------------------------------------------
@pytest.mark.parametrize("xs, kernel, stride, padding", CASES)
def test_padded_pool_matches_torch(rng, xs, kernel, stride, padding):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    x = distinct(rng.standard_normal(xs))
    ours = {"max": lambda t: F.max_pool2d(t, kernel, stride, padding)}
    theirs = {"max": lambda t: tf.max_pool2d(t, kernel, stride, padding)}
    for include in (True, False):
        ours[include] = lambda t, i=include: F.avg_pool2d(t, kernel, stride, padding, i)
        theirs[include] = lambda t, i=include: tf.avg_pool2d(t, kernel, stride, padding,
                                                             count_include_pad=i)
    for key in ours:
        t, tt = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        y, ty = ours[key](t), theirs[key](tt)
        gy = rng.standard_normal(ty.shape)
        y.backward(gy)
        ty.backward(torch.tensor(gy))
        check_forward(y, ty.detach().numpy(), np.float64)
        check_forward(t.grad, tt.grad.numpy(), np.float64)
