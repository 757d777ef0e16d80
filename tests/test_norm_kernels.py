"""Batch-norm kernels (kernels.batch_norm_forward / batch_norm_backward, optionally fused with
the ReLU that follows) against kernels/reference.py on every `xp` backend, at tiny sizes and at
sizes that take the threaded path; F.batch_norm(..., relu=True) by gradcheck;
nn.BatchNorm2d.forward_relu; argument errors."""
import numpy as np
import pytest

import minires.ops as F
from conftest import fwd_tol, to_numpy
from helpers import check_grad
from minires import kernels, nn
from minires.kernels import reference as ref
from minires.tensor import Tensor

DTYPES = [np.float32, np.float64]
# tiny (one thread), (N, C) input, 1x1 planes; then threaded: 24x24 planes, short 7x7 rows,
# and (N, C) input with a single-element "plane"
SHAPES = [(2, 3, 4, 5), (6, 3), (5, 4, 1, 1), (16, 8, 24, 24), (96, 16, 7, 7), (40000, 3)]


def arrays(xp, rng, shape, dtype):
    """x, gamma, beta, running_mean, running_var as xp arrays of dtype."""
    c = shape[1]
    host = [2 * rng.standard_normal(shape) + 1, rng.standard_normal(c), rng.standard_normal(c),
            0.3 * rng.standard_normal(c), rng.random(c) + 0.5]
    return [xp.asarray(a.astype(dtype)) for a in host]


def wide(*arrays):
    """float64 host copies (the oracle runs in float64)."""
    return [to_numpy(a).astype(np.float64) for a in arrays]


def close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    np.testing.assert_allclose(to_numpy(actual), expected, **fwd_tol(dtype, reduce=True))


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(xp, rng, shape, dtype, training, relu):
    x, gamma, beta, rm, rv = args = arrays(xp, rng, shape, dtype)
    oracle = wide(*args)  # its running buffers are updated in place by the reference
    inputs = wide(x, gamma, beta, rm, rv)
    got = kernels.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.2, 1e-3, relu)
    want = ref.batch_norm_forward(*oracle, training, 0.2, 1e-3, relu)
    for a, b in zip(got, want):
        close(a, b, dtype)
    close(rm, oracle[3], dtype)  # updated in place in training
    close(rv, oracle[4], dtype)
    for before, after in zip(inputs, wide(x, gamma, beta, *(() if training else (rm, rv)))):
        np.testing.assert_array_equal(before, after)  # inputs are read, never modified


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(xp, rng, shape, dtype, training, relu):
    x, gamma, beta, rm, rv = arrays(xp, rng, shape, dtype)
    y, mean, inv_std = kernels.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.1, 1e-5,
                                                  relu)
    gy = xp.asarray(rng.standard_normal(shape).astype(dtype))
    inputs = wide(gy, x)
    got = kernels.batch_norm_backward(gy, x, gamma, beta, mean, inv_std, training, relu)
    g, xw, gw, bw, mw, sw = wide(gy, x, gamma, beta, mean, inv_std)
    if relu:  # the mask backward recomputes from x must be exactly forward's y > 0
        g = g * (to_numpy(y) > 0)
    want = ref.batch_norm_backward(g, xw, gw, bw, mw, sw, training, False)
    for a, b in zip(got, want):
        close(a, b, dtype)
    for before, after in zip(inputs, wide(gy, x)):
        np.testing.assert_array_equal(before, after)


def test_cpu_threaded_split_is_bitwise_the_serial_result(rng, monkeypatch):
    """Each channel is computed the same way whichever thread runs it: deterministic."""
    cpu_norm = pytest.importorskip("minires.kernels.cpu.norm")
    x, gamma, beta, _, _ = arrays(np, rng, (8, 5, 6, 7), np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)

    def run():
        y, mean, inv_std = cpu_norm.batch_norm_forward(x, gamma, beta, None, None, True, 0.1,
                                                       1e-5, True)
        return (y.copy(), mean, inv_std, *(a.copy() for a in cpu_norm.batch_norm_backward(
            gy, x, gamma, beta, mean, inv_std, True, True)))

    serial = run()
    monkeypatch.setattr(cpu_norm, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(cpu_norm, "threads", lambda: 3)  # 5 channels over 3 ranges
    for a, b in zip(serial, run()):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_input_and_other_dtype_running_stats(xp, rng):
    base, gamma, beta, _, _ = arrays(xp, rng, (3, 4, 6, 5), np.float32)
    x = base.transpose(0, 1, 3, 2)  # (3, 4, 5, 6), strided
    rm, rv = xp.zeros(4), xp.ones(4)  # float64 buffers for float32 data: updated in place
    oracle = wide(x, gamma, beta) + [np.zeros(4), np.ones(4)]
    got = kernels.batch_norm_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5, False)
    want = ref.batch_norm_forward(*oracle, True, 0.1, 1e-5, False)
    close(got[0], want[0], np.float32)
    close(rm.astype(np.float32), oracle[3], np.float32)
    close(rv.astype(np.float32), oracle[4], np.float32)
    assert rm.dtype == np.float64 and not x.flags.c_contiguous


EVAL_STATS = 0.1, 1.5  # running mean and var of the eval-mode gradchecks


def bn_data(xp, shape):
    """float64 x, gamma, beta (the first seeded draw) with |bn(x)| >= 1e-3 in both modes:
    gradcheck's finite differences (eps 1e-6) never straddle the ReLU's kink."""
    c = shape[1]
    for seed in range(100):
        rng = np.random.default_rng(seed)
        x = 2 * rng.standard_normal(shape) + 1
        gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
        ys = [ref.batch_norm_forward(x, gamma, beta, None, None, True, 0.1, 1e-5, False)[0],
              ref.batch_norm_forward(x, gamma, beta, *(np.full(c, v) for v in EVAL_STATS),
                                     False, 0.1, 1e-5, False)[0]]
        if min(np.abs(y).min() for y in ys) >= 1e-3:
            return [xp.asarray(a) for a in (x, gamma, beta)]
    raise AssertionError("no seed gave data away from the kink")


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("shape", [(2, 3, 3, 4), (6, 3)])
def test_gradcheck(xp, shape, relu):
    args = bn_data(xp, shape)
    check_grad(lambda x, g, b: F.batch_norm(x, g, b, training=True, relu=relu), args)
    rm, rv = (xp.full(shape[1], v) for v in EVAL_STATS)
    check_grad(lambda x, g, b: F.batch_norm(x, g, b, rm, rv, training=False, relu=relu), args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_forward_relu_is_relu_of_forward(rng, training):
    layers = [nn.BatchNorm2d(3, momentum=0.2, dtype=np.float64) for _ in range(2)]
    params = rng.standard_normal(3), rng.standard_normal(3)
    for layer in layers:
        layer.weight.data[...], layer.bias.data[...] = params
        layer.train(training)
    x = rng.standard_normal((4, 3, 5, 5))
    xs = [Tensor(x, requires_grad=True) for _ in layers]
    fused, composed = layers[0].forward_relu(xs[0]), F.relu(layers[1](xs[1]))
    gy = rng.standard_normal(x.shape)
    fused.backward(gy)
    composed.backward(gy)
    got = [fused.data, xs[0].grad, layers[0].weight.grad, layers[0].bias.grad,
           layers[0].running_mean, layers[0].running_var]
    want = [composed.data, xs[1].grad, layers[1].weight.grad, layers[1].bias.grad,
            layers[1].running_mean, layers[1].running_var]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, **fwd_tol(np.float64, reduce=True))


def _z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


ERRORS = {
    "ndim": (lambda: kernels.batch_norm_forward(_z(2, 3, 4), _z(3), _z(3), None, None, True,
                                                0.1, 1e-5), ValueError,
             r"batch_norm_forward: expected x \(N, C\) or \(N, C, H, W\), got shape \(2, 3, 4\)"),
    "gamma": (lambda: kernels.batch_norm_forward(_z(2, 3), _z(4), _z(3), None, None, True, 0.1,
                                                 1e-5), ValueError,
              r"batch_norm_forward: gamma has shape \(4,\), expected \(3,\)"),
    "dtypes": (lambda: kernels.batch_norm_forward(_z(2, 3), _z(3, dtype=np.float64), _z(3),
                                                  None, None, True, 0.1, 1e-5), TypeError,
               "batch_norm_forward: expected float32 or float64 arrays of one dtype"),
    "int_stats": (lambda: kernels.batch_norm_forward(_z(2, 3), _z(3), _z(3),
                                                     _z(3, dtype=np.int64), None, True, 0.1,
                                                     1e-5), TypeError,
                  "batch_norm_forward: running_mean must be a float array"),
    "eval_no_stats": (lambda: kernels.batch_norm_forward(_z(2, 3), _z(3), _z(3), _z(3), None,
                                                         False, 0.1, 1e-5), ValueError,
                      r"batch_norm_forward: eval mode .* needs running_mean and running_var"),
    "gy_shape": (lambda: kernels.batch_norm_backward(_z(2, 4), _z(2, 3), _z(3), _z(3), _z(3),
                                                     _z(3), True), ValueError,
                 r"batch_norm_backward: gy has shape \(2, 4\), expected \(2, 3\)"),
    "stats_shape": (lambda: kernels.batch_norm_backward(_z(2, 3), _z(2, 3), _z(3), _z(3),
                                                        _z(2), _z(3), True), ValueError,
                    r"batch_norm_backward: mean has shape \(2,\), expected \(3,\)"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_arguments_are_refused(case):
    fn, error, message = ERRORS[case]
    with pytest.raises(error, match=message):
        fn()


def test_empty_batch_does_not_reach_the_kernels():
    """An empty batch goes to the reference (NaN statistics, as NumPy's mean of nothing)."""
    with np.errstate(invalid="ignore", divide="ignore"), pytest.warns(RuntimeWarning):
        y, mean, _ = kernels.batch_norm_forward(_z(0, 3, 2, 2), _z(3), _z(3), None, None, True,
                                                0.1, 1e-5)
    assert y.shape == (0, 3, 2, 2) and mean.shape == (3,)
    gx, ggamma, _ = kernels.batch_norm_backward(_z(0, 3), _z(0, 3), _z(3), _z(3), _z(3), _z(3),
                                                False)
    assert gx.shape == (0, 3) and np.all(ggamma == 0)
