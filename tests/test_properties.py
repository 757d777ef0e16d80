"""Hypothesis property tests: elementwise, reduction and shape ops against NumPy over random
shapes and broadcasts; forward values and the gradient of sum(W * op(...)) in closed form.

Index-moving ops (broadcast, transpose, reshape, getitem, concat) use one independent oracle:
apply the NumPy op to an array of flat indices; the forward is a gather and the gradient the
matching scatter-add (np.bincount). Examples are derandomized, so CI runs are reproducible.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import minires as mr
import minires.ops as F

from conftest import fwd_tol, tol

SETTINGS = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def floats(low, high):
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


DOMAINS = {
    "any": floats(-3, 3),
    "positive": floats(0.25, 3),
    "nonzero": floats(0.25, 3) | floats(-3, -0.25),
    "exponent": floats(-2, 2),
}


def arrays(shape, domain="any"):
    return hnp.arrays(np.float64, shape, elements=DOMAINS[domain])


def scatter(index, w, size):
    """Gradient oracle: add each w[k] into the flat input position index[k]."""
    return np.bincount(index.ravel(), weights=w.ravel(), minlength=size)


def run(fn, x_arrays, w):
    """fn(*tensors) forward and backward(w); returns (output array, [input gradients])."""
    ts = [mr.tensor(a, requires_grad=True) for a in x_arrays]
    y = fn(*ts)
    y.backward(w)
    return y.data, [t.grad for t in ts]


def assert_close(actual, expected, key="fwd_f64"):
    assert np.shape(actual) == np.shape(expected), (np.shape(actual), np.shape(expected))
    np.testing.assert_allclose(actual, expected, **tol(key))


# --- elementwise -------------------------------------------------------------------------------
# name -> (op, numpy forward, (da, db) closed-form partial derivatives, domains of a and b)
BINARY = {
    "add": (F.add, np.add, lambda a, b: (np.ones_like(a * b), np.ones_like(a * b)), "any", "any"),
    "sub": (F.sub, np.subtract, lambda a, b: (np.ones_like(a * b), -np.ones_like(a * b)),
            "any", "any"),
    "mul": (F.mul, np.multiply, lambda a, b: (b + 0 * a, a + 0 * b), "any", "any"),
    "div": (F.div, np.divide, lambda a, b: (1 / b + 0 * a, -a / b ** 2), "any", "nonzero"),
    "pow": (F.pow, np.power, lambda a, b: (b * a ** (b - 1), a ** b * np.log(a)),
            "positive", "exponent"),
}


@st.composite
def binary_cases(draw, name):
    shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=4))
    dom_a, dom_b = BINARY[name][3:]
    a = draw(arrays(shapes.input_shapes[0], dom_a))
    b = draw(arrays(shapes.input_shapes[1], dom_b))
    w = draw(arrays(shapes.result_shape))
    return a, b, w


@pytest.mark.parametrize("name", BINARY)
@SETTINGS
@given(data=st.data())
def test_binary_broadcast_forward_and_gradient(name, data):
    a, b, w = data.draw(binary_cases(name))
    op, ref, partials = BINARY[name][:3]
    y, (ga, gb) = run(op, [a, b], w)
    assert_close(y, ref(a, b))
    da, db = partials(a, b)  # each of the broadcast output shape
    for x, g, d in ((a, ga, da), (b, gb, db)):
        index = np.broadcast_to(np.arange(x.size).reshape(x.shape), w.shape)
        assert_close(g, scatter(index, w * d, x.size).reshape(x.shape))


@pytest.mark.parametrize("name", BINARY)
@SETTINGS
@given(data=st.data())
def test_binary_float32_forward(name, data):
    a, b, _ = data.draw(binary_cases(name))
    op, ref = BINARY[name][:2]
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    y = op(mr.tensor(a32), mr.tensor(b32))
    assert y.dtype == np.float32
    expected = ref(a32.astype(np.float64), b32.astype(np.float64))
    np.testing.assert_allclose(y.data, expected, **fwd_tol(np.float32))


UNARY = {
    "neg": (F.neg, np.negative, lambda x: -np.ones_like(x), "any"),
    "exp": (F.exp, np.exp, np.exp, "any"),
    "log": (F.log, np.log, lambda x: 1 / x, "positive"),
}


@pytest.mark.parametrize("name", UNARY)
@SETTINGS
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), data=st.data())
def test_unary_forward_and_gradient(name, shape, data):
    x, w = data.draw(arrays(shape, UNARY[name][3])), data.draw(arrays(shape))
    op, ref, deriv = UNARY[name][:3]
    y, (gx,) = run(op, [x], w)
    assert_close(y, ref(x))
    assert_close(gx, w * deriv(x))
    y32 = op(mr.tensor(x.astype(np.float32)))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32.data, ref(x.astype(np.float32).astype(np.float64)),
                               **fwd_tol(np.float32))


# --- reductions --------------------------------------------------------------------------------
@st.composite
def reduction_cases(draw):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
    ndim = len(shape)
    axes = draw(st.none() | st.lists(st.integers(0, max(ndim - 1, 0)), unique=True,
                                     max_size=ndim))
    if axes is not None:
        axes = tuple(a - ndim if draw(st.booleans()) else a for a in axes)  # some negative
        if len(axes) == 1 and draw(st.booleans()):
            axes = axes[0]  # a plain int
    keepdims = draw(st.booleans())
    # few distinct values, so max sees ties (the gradient is split equally among them)
    x = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([-1.5, 0.0, 0.5, 2.0]))
             | arrays(shape))
    w = draw(arrays(np.sum(x, axis=axes, keepdims=keepdims).shape))
    return x, axes, keepdims, w


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
@SETTINGS
@given(case=reduction_cases())
def test_reduction_forward_and_gradient(name, case):
    x, axis, keepdims, w = case
    op, ref = getattr(F, name), getattr(np, name)
    y, (gx,) = run(lambda t: op(t, axis=axis, keepdims=keepdims), [x], w)
    assert_close(y, ref(x, axis=axis, keepdims=keepdims))
    wk = w.reshape(np.sum(x, axis=axis, keepdims=True).shape)  # broadcasts against x
    if name == "sum":
        expected = np.broadcast_to(wk, x.shape)
    elif name == "mean":
        expected = np.broadcast_to(wk * y.size / max(x.size, 1), x.shape)
    else:
        hit = x == np.max(x, axis=axis, keepdims=True)
        expected = wk * hit / hit.sum(axis=axis, keepdims=True)
    assert_close(gx, expected)


# --- index-moving ops --------------------------------------------------------------------------
def check_index_op(op, np_op, x, w_domain_draw):
    """op on x vs the gather oracle, and its gradient vs the scatter oracle; float32 too."""
    index = np_op(np.arange(x.size).reshape(x.shape))
    w = w_domain_draw(index.shape)
    y, (gx,) = run(op, [x], w)
    assert_close(y, x.ravel()[index])
    assert_close(gx, scatter(index, w, x.size).reshape(x.shape))
    y32 = op(mr.tensor(x.astype(np.float32)))
    assert y32.dtype == np.float32
    np.testing.assert_array_equal(y32.data, x.astype(np.float32).ravel()[index])


def _w_drawer(data):
    return lambda shape: data.draw(arrays(shape))


shapes = hnp.array_shapes(min_dims=1, max_dims=4, max_side=4)


@SETTINGS
@given(shapes, st.data())
def test_transpose(shape, data):
    x = data.draw(arrays(shape))
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    check_index_op(lambda t: F.transpose(t, perm), lambda v: v.transpose(perm), x,
                   _w_drawer(data))
    check_index_op(lambda t: t.T, lambda v: v.T, x, _w_drawer(data))


@SETTINGS
@given(shapes, st.data())
def test_reshape_and_flatten(shape, data):
    x = data.draw(arrays(shape))
    new = list(data.draw(st.permutations(shape)))
    if data.draw(st.booleans()):
        new[data.draw(st.integers(0, len(new) - 1))] = -1
    check_index_op(lambda t: F.reshape(t, tuple(new)), lambda v: v.reshape(new), x,
                   _w_drawer(data))
    start = data.draw(st.integers(0, len(shape) - 1))
    check_index_op(lambda t: F.flatten(t, start),
                   lambda v: v.reshape(v.shape[:start] + (-1,)), x, _w_drawer(data))


@SETTINGS
@given(shapes, st.data())
def test_broadcast_to(shape, data):
    x = data.draw(arrays(shape))
    other = data.draw(hnp.broadcastable_shapes(shape, max_dims=4, max_side=4))
    target = np.broadcast_shapes(shape, other)
    check_index_op(lambda t: F.broadcast_to(t, target), lambda v: np.broadcast_to(v, target),
                   x, _w_drawer(data))


@st.composite
def basic_keys(draw, shape):
    """A basic index: ints and slices (any step) for some leading axes, maybe None/Ellipsis."""
    n = draw(st.integers(0, len(shape)))
    key = [draw(st.integers(-size, size - 1) | st.slices(size)) for size in shape[:n]]
    if draw(st.booleans()):
        key.insert(draw(st.integers(0, len(key))), None)
    if draw(st.booleans()) and n < len(shape):
        key.append(Ellipsis)
        key.append(draw(st.integers(-shape[-1], shape[-1] - 1)))
    return tuple(key)


@SETTINGS
@given(shapes, st.data())
def test_getitem(shape, data):
    x = data.draw(arrays(shape))
    key = data.draw(basic_keys(shape))
    check_index_op(lambda t: F.getitem(t, key), lambda v: v[key], x, _w_drawer(data))


@SETTINGS
@given(shapes, st.data())
def test_concat(shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    parts = []
    for n in sizes:
        s = list(shape)
        s[axis] = n
        parts.append(data.draw(arrays(tuple(s))))
    offsets = np.cumsum([0] + [p.size for p in parts])
    w = data.draw(arrays(np.concatenate(parts, axis=axis).shape))
    y, grads = run(lambda *ts: F.concat(list(ts), axis=axis), parts, w)
    assert_close(y, np.concatenate(parts, axis=axis))
    index = np.concatenate([np.arange(p.size).reshape(p.shape) + o
                            for p, o in zip(parts, offsets)], axis=axis)
    flat = scatter(index, w, offsets[-1])
    for p, o, g in zip(parts, offsets, grads):
        assert_close(g, flat[o:o + p.size].reshape(p.shape))
