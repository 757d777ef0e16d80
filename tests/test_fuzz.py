"""Hypothesis fuzzing (issue 8): random shapes, strides, paddings and dtypes through the Numba
kernels (the `kernels` dispatch on NumPy arrays) against kernels.reference, and through the ops
against the numerical gradient (minires.gradcheck, float64, tiny shapes). Bounded and
derandomized: the same examples on every run."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from minires import kernels
import minires.ops as F
from conftest import fwd_tol, tol
from minires.kernels import reference as ref
from minires.gradcheck import away_from_kinks, distinct, gradcheck

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
GRAD = settings(FUZZ, max_examples=20)  # each example runs ~2 * numel forward passes
DTYPES = st.sampled_from([np.float32, np.float64])


def _normal(seed, shape, dtype, contiguous=True):
    """Standard normal samples; contiguous=False: the same values in a strided view."""
    a = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    if contiguous:
        return a
    wide = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
    wide[..., ::2] = a
    return wide[..., ::2]


@st.composite
def conv_cases(draw, max_hw=12, max_c=6, max_n=4):
    """(x shape, w shape, stride, padding) with at least one output pixel; padding may
    exceed the kernel (border outputs are then the bias alone)."""
    n, c, o = (draw(st.integers(1, m)) for m in (max_n, max_c, max_c))
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    assume(h + 2 * padding[0] >= kh and w + 2 * padding[1] >= kw)
    return (n, c, h, w), (o, c, kh, kw), stride, padding


def _out_shape(x_shape, w_shape, stride, padding):
    return (x_shape[0], w_shape[0],
            (x_shape[2] + 2 * padding[0] - w_shape[2]) // stride[0] + 1,
            (x_shape[3] + 2 * padding[1] - w_shape[3]) // stride[1] + 1)


@FUZZ
@given(case=conv_cases(), dtype=DTYPES, bias=st.booleans(), contiguous=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv2d_kernels_match_reference(case, dtype, bias, contiguous, seed):
    x_shape, w_shape, stride, padding = case
    x, w = _normal(seed, x_shape, dtype, contiguous), _normal(seed + 1, w_shape, dtype)
    b = _normal(seed + 2, w_shape[:1], dtype) if bias else None
    gy = _normal(seed + 3, _out_shape(x_shape, w_shape, stride, padding), dtype, contiguous)
    close = fwd_tol(dtype, reduce=True)
    y = kernels.conv2d_forward(x, w, b, stride, padding)
    assert y.dtype == dtype and y.shape == gy.shape
    np.testing.assert_allclose(y, ref.conv2d_forward(x, w, b, stride, padding), **close)
    gx = kernels.conv2d_backward_input(gy, w, x_shape, stride, padding)
    assert gx.dtype == dtype and gx.shape == x_shape
    np.testing.assert_allclose(gx, ref.conv2d_backward_input(gy, w, x_shape, stride, padding),
                               **close)
    gw, gb = kernels.conv2d_backward_weight(gy, x, w_shape, stride, padding, bias)
    rgw, rgb = ref.conv2d_backward_weight(gy, x, w_shape, stride, padding, bias)
    np.testing.assert_allclose(gw, rgw, **close)
    assert (gb is None) == (not bias)
    if bias:
        np.testing.assert_allclose(gb, rgb, **close)


@GRAD
@given(case=conv_cases(max_hw=5, max_c=2, max_n=2), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv2d_gradient_matches_numerical(case, bias, seed):
    x_shape, w_shape, stride, padding = case
    inputs = [_normal(seed, x_shape, np.float64), _normal(seed + 1, w_shape, np.float64)]
    inputs += [_normal(seed + 2, w_shape[:1], np.float64)] if bias else []
    gradcheck(lambda *t: F.conv2d(*t, stride=stride, padding=padding), inputs, seed=seed,
              **tol("grad_f64"))


@st.composite
def pool_cases(draw):
    """(x shape, kernel, stride) with the kernel inside the input."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(kernel[0], 9)), draw(st.integers(kernel[1], 9))
    return (n, c, h, w), kernel, stride


@FUZZ
@given(case=pool_cases(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_max_pool2d_kernels_match_reference(case, dtype, seed):
    x_shape, kernel, stride = case
    x = distinct(_normal(seed, x_shape, np.float64)).astype(dtype)  # no ties: one argmax
    y, argmax = kernels.max_pool2d_forward(x, kernel, stride)
    ry, rargmax = ref.max_pool2d_forward(x, kernel, stride)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(argmax, rargmax)
    gy = _normal(seed + 1, y.shape, dtype)
    np.testing.assert_allclose(kernels.max_pool2d_backward(gy, argmax, x_shape, kernel, stride),
                               ref.max_pool2d_backward(gy, argmax, x_shape, kernel, stride),
                               **fwd_tol(dtype))  # overlapping windows add in any order


def _avg_pool_loops(x, kernel, stride):
    """The definition, one window at a time."""
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            y[:, :, i, j] = x[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].mean(axis=(2, 3))
    return y


@FUZZ
@given(case=pool_cases(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_avg_pool2d_matches_its_definition(case, dtype, seed):
    x_shape, kernel, stride = case
    x = _normal(seed, x_shape, dtype)
    y = F.avg_pool2d(x, kernel, stride)
    assert y.dtype == dtype
    np.testing.assert_allclose(y.data, _avg_pool_loops(x, kernel, stride), **fwd_tol(dtype))


@GRAD
@given(case=pool_cases(), op=st.sampled_from(["max", "avg"]), seed=st.integers(0, 2**16))
def test_pool_gradients_match_numerical(case, op, seed):
    x_shape, kernel, stride = case
    x = distinct(_normal(seed, x_shape, np.float64))  # max: ties further apart than eps
    pool = F.max_pool2d if op == "max" else F.avg_pool2d
    gradcheck(lambda t: pool(t, kernel, stride), [x], seed=seed, **tol("grad_f64"))


SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@FUZZ
@given(shape=SHAPES, dtype=DTYPES, alpha=st.booleans(), relu=st.booleans(),
       seed=st.integers(0, 2**16))
def test_residual_add_kernels_match_reference(shape, dtype, alpha, relu, seed):
    x, fx, gy = (_normal(seed + k, shape, dtype) for k in range(3))
    a = _normal(seed + 3, (1,), dtype) if alpha else None
    y = kernels.residual_add_forward(x, fx, a, relu)
    np.testing.assert_allclose(y, ref.residual_add_forward(x, fx, a, relu), **fwd_tol(dtype))
    got = kernels.residual_add_backward(gy, y, fx, a, relu)
    want = ref.residual_add_backward(gy, y, fx, a, relu)
    for g, r, reduce in zip(got, want, (False, False, True)):  # galpha is a sum
        assert (g is None) == (r is None)
        if g is not None:
            np.testing.assert_allclose(g, r, **fwd_tol(dtype, reduce=reduce))
    np.testing.assert_array_equal(kernels.relu_forward(x), ref.relu_forward(x))
    np.testing.assert_array_equal(kernels.relu_backward(gy, y), ref.relu_backward(gy, y))


@GRAD
@given(shape=SHAPES, alpha=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_residual_add_gradient_matches_numerical(shape, alpha, relu, seed):
    x, fx = _normal(seed, shape, np.float64), _normal(seed + 1, shape, np.float64)
    a = np.array(0.7) if alpha else None
    if relu:  # keep x + alpha * fx away from ReLU's kink at 0
        scale = 0.7 if alpha else 1.0
        x = away_from_kinks(x + scale * fx, 0.05) - scale * fx
    inputs = [x, fx] + ([a] if alpha else [])
    gradcheck(lambda *t: F.residual_add(*t, relu=relu), inputs, seed=seed, **tol("grad_f64"))


BINARY = {  # op -> (minires op, NumPy, input maker: positive where the op needs it)
    "add": (F.add, np.add, False), "sub": (F.sub, np.subtract, False),
    "mul": (F.mul, np.multiply, False), "div": (F.div, np.divide, True),
    "pow": (F.pow, np.power, True),
}


def _operands(seed, shapes, dtype, positive):
    a, b = (_normal(seed + k, s, dtype) for k, s in enumerate(shapes))
    if positive:  # div: no zero divisor; pow: a > 0 so a ** b and d/db are real
        a, b = np.abs(a) + dtype(0.5), np.abs(b) + dtype(0.5)
    return a, b


@FUZZ
@given(op=st.sampled_from(sorted(BINARY)),
       shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4),
       dtype=DTYPES, seed=st.integers(0, 2**16))
def test_broadcasting_arithmetic_matches_numpy(op, shapes, dtype, seed):
    fn, np_fn, positive = BINARY[op]
    a, b = _operands(seed, shapes.input_shapes, dtype, positive)
    y = fn(a, b)
    assert y.shape == shapes.result_shape and y.dtype == dtype
    np.testing.assert_allclose(y.data, np_fn(a, b), **fwd_tol(dtype))


@GRAD
@given(op=st.sampled_from(sorted(BINARY)),
       shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3),
       seed=st.integers(0, 2**16))
def test_broadcasting_arithmetic_gradients(op, shapes, seed):
    """Both inputs' gradients, summed back over the broadcast axes, match the numerical
    ones."""
    fn, _, positive = BINARY[op]
    a, b = _operands(seed, shapes.input_shapes, np.float64, positive)
    gradcheck(fn, [a, b], seed=seed, **tol("grad_f64"))


@pytest.mark.parametrize("op", ["exp", "log", "neg"])
@FUZZ
@given(shape=SHAPES, dtype=DTYPES, seed=st.integers(0, 2**16))
def test_unary_arithmetic_matches_numpy_and_gradient(op, shape, dtype, seed):
    x = np.abs(_normal(seed, shape, dtype)) + dtype(0.5)  # log needs x > 0
    fn, np_fn = getattr(F, op), {"exp": np.exp, "log": np.log, "neg": np.negative}[op]
    np.testing.assert_allclose(fn(x).data, np_fn(x), **fwd_tol(dtype))
    if dtype == np.float64:
        gradcheck(fn, [x], seed=seed, **tol("grad_f64"))
