"""Arithmetic, reduction, shape and matrix ops: forward against NumPy closed forms (float32 and
float64), float64 gradcheck for every input, and clear errors for bad input."""
import numpy as np
import pytest

import minires as mr
import minires.ops as F
from minires.gradcheck import distinct

from conftest import to_numpy, tol
from helpers import check_forward, check_grad

DTYPES = [np.float32, np.float64]


def rand(xp, rng, shape, dtype=np.float64, low=None, high=None, signed=False):
    """Standard normal (or uniform in [low, high], with random signs if `signed`) on xp."""
    if low is None:
        a = rng.standard_normal(shape)
    else:
        a = rng.uniform(low, high, shape)
        if signed:
            a *= rng.choice([-1.0, 1.0], shape)
    return xp.asarray(np.asarray(a, dtype=dtype))


def host64(*arrays):
    return [to_numpy(a).astype(np.float64) for a in arrays]


def as_tensor(a):
    return a if isinstance(a, mr.Tensor) else mr.Tensor(a)  # no device argument: no copy


# --- broadcasting arithmetic -------------------------------------------------------------------
# name -> (op, numpy reference, domain of a, domain of b) with domain (low, high, signed) or None
BINARY = {
    "add": (F.add, np.add, None, None),
    "sub": (F.sub, np.subtract, None, None),
    "mul": (F.mul, np.multiply, None, None),
    "div": (F.div, np.divide, None, (0.5, 2.0, True)),
    "pow": (F.pow, np.power, (0.5, 2.0, False), (-2.0, 2.0, False)),
}
BROADCASTS = [((3, 4), (3, 4)), ((3, 4), ()), ((), (3, 4)), ((3, 4), (4,)), ((3, 1), (1, 4)),
              ((2, 3, 4), (3, 1)), ((4,), (2, 3, 4)), ((2, 1, 4), (3, 1))]


def binary_inputs(xp, rng, name, shapes, dtype=np.float64):
    _, _, dom_a, dom_b = BINARY[name]
    return [rand(xp, rng, s, dtype, *(d or ())) for s, d in zip(shapes, (dom_a, dom_b))]


@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_forward(xp, rng, name, shapes, dtype):
    op, ref = BINARY[name][:2]
    a, b = binary_inputs(xp, rng, name, shapes, dtype)
    check_forward(op(a, b), ref(*host64(a, b)), dtype)


@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("name", BINARY)
def test_binary_gradcheck(xp, rng, name, shapes):
    op = BINARY[name][0]
    a, b = binary_inputs(xp, rng, name, shapes)
    check_grad(op, [a, b])
    check_grad(op, [a, b], check=(True, False))  # b constant: backward must skip it
    check_grad(op, [a, b], check=(False, True))


@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_with_python_scalar(xp, rng, name, dtype):
    op, ref = BINARY[name][:2]
    x = rand(xp, rng, (2, 3), dtype, 0.5, 2.0)
    check_forward(op(x, 1.5), ref(*host64(x), 1.5), dtype)
    check_forward(op(1.5, x), ref(1.5, *host64(x)), dtype)
    check_grad(lambda t: op(t, 1.5), [x])
    check_grad(lambda t: op(1.5, t), [x])


UNARY = {
    "neg": (F.neg, np.negative, None),
    "exp": (F.exp, np.exp, None),
    "log": (F.log, np.log, (0.5, 3.0)),
}


@pytest.mark.parametrize("name", UNARY)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unary_forward_and_gradcheck(xp, rng, name, dtype):
    op, ref, dom = UNARY[name]
    x = rand(xp, rng, (3, 4), dtype, *(dom or ()))
    check_forward(op(x), ref(*host64(x)), dtype)
    check_grad(op, [rand(xp, rng, (3, 4), np.float64, *(dom or ()))])


def test_pow_gradient_at_zero_base(xp):
    a = mr.Tensor(xp.asarray([0.0, 2.0]), requires_grad=True)
    b = mr.Tensor(xp.asarray([2.0, 3.0]), requires_grad=True)
    F.pow(a, b).sum().backward()
    np.testing.assert_allclose(to_numpy(a.grad), [0.0, 12.0], **tol("fwd_f64"))
    np.testing.assert_allclose(to_numpy(b.grad), [0.0, 8 * np.log(2.0)], **tol("fwd_f64"))


# --- reductions --------------------------------------------------------------------------------
REDUCTIONS = {"sum": (F.sum, np.sum), "mean": (F.mean, np.mean), "max": (F.max, np.max)}
AXES = [None, 0, 1, -1, (0, 2), (-1, 0), (), np.int64(-2)]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("name", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduction_forward(xp, rng, name, axis, keepdims, dtype):
    op, ref = REDUCTIONS[name]
    x = rand(xp, rng, (2, 3, 4), dtype)
    y = op(x, axis=axis, keepdims=keepdims)
    check_forward(y, ref(*host64(x), axis=axis, keepdims=keepdims), dtype, reduce=True)


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("name", REDUCTIONS)
def test_reduction_gradcheck(xp, rng, name, axis, keepdims):
    op = REDUCTIONS[name][0]
    x = distinct(rand(xp, rng, (2, 3, 4)))  # no ties: max is differentiable everywhere here
    check_grad(lambda t: op(t, axis=axis, keepdims=keepdims), [x])


def test_max_splits_gradient_among_ties(xp):
    x = mr.Tensor(xp.asarray([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True)
    F.max(x, axis=1).backward(xp.asarray([1.0, 6.0]))
    np.testing.assert_allclose(to_numpy(x.grad), [[0, 0.5, 0.5], [2, 2, 2]], **tol("fwd_f64"))


# --- shape ops ---------------------------------------------------------------------------------
# name -> (op on a (2, 3, 4) input, the same on a numpy array)
SHAPE_OPS = {
    "reshape_args": (lambda t: F.reshape(t, 4, 6), lambda v: v.reshape(4, 6)),
    "reshape_tuple": (lambda t: F.reshape(t, (2, -1)), lambda v: v.reshape(2, -1)),
    "reshape_flat": (lambda t: F.reshape(t, -1), lambda v: v.reshape(-1)),
    "transpose_none": (lambda t: F.transpose(t), lambda v: v.transpose()),
    "transpose_perm": (lambda t: F.transpose(t, (1, 0, 2)), lambda v: v.transpose(1, 0, 2)),
    "transpose_neg": (lambda t: F.transpose(t, (-1, 0, 1)), lambda v: v.transpose(2, 0, 1)),
    "flatten_default": (F.flatten, lambda v: v.reshape(2, 12)),
    "flatten_0": (lambda t: F.flatten(t, 0), lambda v: v.reshape(24)),
    "flatten_2": (lambda t: F.flatten(t, 2), lambda v: v),
    "broadcast_lead": (lambda t: F.broadcast_to(t, (5, 2, 3, 4)),
                       lambda v: np.broadcast_to(v, (5, 2, 3, 4))),
    "broadcast_inner": (lambda t: F.broadcast_to(t[:, :1], (2, 3, 4)),
                        lambda v: np.broadcast_to(v[:, :1], (2, 3, 4))),
    "getitem_int": (lambda t: F.getitem(t, 1), lambda v: v[1]),
    "getitem_neg": (lambda t: F.getitem(t, -1), lambda v: v[-1]),
    "getitem_slice": (lambda t: F.getitem(t, slice(1, None)), lambda v: v[1:]),
    "getitem_tuple": (lambda t: F.getitem(t, (slice(None), 0)), lambda v: v[:, 0]),
    "getitem_ellipsis": (lambda t: F.getitem(t, (Ellipsis, 1)), lambda v: v[..., 1]),
    "getitem_newaxis": (lambda t: F.getitem(t, (None, 0)), lambda v: v[None, 0]),
    "getitem_steps": (lambda t: F.getitem(t, (slice(None, None, 2), slice(1, 3), -1)),
                      lambda v: v[::2, 1:3, -1]),
    "getitem_reverse": (lambda t: F.getitem(t, (0, slice(None, None, -1))),
                        lambda v: v[0, ::-1]),
    "getitem_np_int": (lambda t: F.getitem(t, (np.int64(1), 2)), lambda v: v[1, 2]),
    "getitem_dunder": (lambda t: as_tensor(t)[1:, ::2], lambda v: v[1:, ::2]),
}


@pytest.mark.parametrize("name", SHAPE_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shape_op_forward(xp, rng, name, dtype):
    op, ref = SHAPE_OPS[name]
    x = rand(xp, rng, (2, 3, 4), dtype)
    y = op(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(to_numpy(y), ref(to_numpy(x)))


@pytest.mark.parametrize("name", SHAPE_OPS)
def test_shape_op_gradcheck(xp, rng, name):
    check_grad(SHAPE_OPS[name][0], [rand(xp, rng, (2, 3, 4))])


CONCATS = [([(2, 3), (1, 3), (4, 3)], 0), ([(2, 1), (2, 3)], 1), ([(2, 2, 1), (2, 2, 3)], -1),
           ([(3,), (2,)], 0)]


@pytest.mark.parametrize("shapes,axis", CONCATS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_forward(xp, rng, shapes, axis, dtype):
    xs = [rand(xp, rng, s, dtype) for s in shapes]
    y = F.concat(xs, axis=axis)
    assert y.dtype == dtype
    np.testing.assert_array_equal(to_numpy(y), np.concatenate(host64(*xs), axis=axis))


@pytest.mark.parametrize("shapes,axis", CONCATS, ids=str)
def test_concat_gradcheck(xp, rng, shapes, axis):
    xs = [rand(xp, rng, s) for s in shapes]
    check_grad(lambda *ts: F.concat(list(ts), axis=axis), xs)
    check_grad(lambda *ts: F.concat(list(ts), axis=axis), xs,
         check=[i % 2 == 0 for i in range(len(xs))])  # some inputs constant


# --- matmul and linear -------------------------------------------------------------------------
MATMULS = [((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)),
           ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
           ((4,), (2, 4, 5)), ((2, 3, 4), (4,)), ((3, 4), (2, 4, 5))]


@pytest.mark.parametrize("shapes", MATMULS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_forward(xp, rng, shapes, dtype):
    a, b = (rand(xp, rng, s, dtype) for s in shapes)
    check_forward(F.matmul(a, b), np.matmul(*host64(a, b)), dtype, reduce=True)


@pytest.mark.parametrize("shapes", MATMULS, ids=str)
def test_matmul_gradcheck(xp, rng, shapes):
    a, b = (rand(xp, rng, s) for s in shapes)
    check_grad(F.matmul, [a, b])
    check_grad(F.matmul, [a, b], check=(False, True))
    check_grad(F.matmul, [a, b], check=(True, False))


LINEARS = [((5, 4), True), ((5, 4), False), ((2, 5, 4), True), ((2, 5, 4), False),
           ((4,), True)]


def _linear_ref(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


@pytest.mark.parametrize("x_shape,bias", LINEARS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_forward(xp, rng, x_shape, bias, dtype):
    x, w, b = rand(xp, rng, x_shape, dtype), rand(xp, rng, (3, 4), dtype), None
    if bias:
        b = rand(xp, rng, (3,), dtype)
    y = F.linear(x, w, b)
    ref = _linear_ref(*host64(x, w), None if b is None else host64(b)[0])
    check_forward(y, ref, dtype, reduce=True)


@pytest.mark.parametrize("x_shape,bias", LINEARS, ids=str)
def test_linear_gradcheck(xp, rng, x_shape, bias):
    x, w = rand(xp, rng, x_shape), rand(xp, rng, (3, 4))
    if bias:
        b = rand(xp, rng, (3,))
        check_grad(F.linear, [x, w, b])
        check_grad(F.linear, [x, w, b], check=(False, True, False))  # first-layer case
    else:
        check_grad(F.linear, [x, w])
        check_grad(F.linear, [x, w], check=(True, False))


# --- bad input ---------------------------------------------------------------------------------
def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


def test_mismatched_broadcast_shapes_raise(xp):
    a, b = xp.ones((3, 4)), xp.ones((3,))
    for op in (F.add, F.sub, F.mul, F.div, F.pow):
        name = op.__name__
        _raises(ValueError, rf"^{name}: .*\(3, 4\).*\(3,\)", op, a, b)
    _raises(ValueError, r"broadcast_to.*\(3,\).*\(2, 4\)", F.broadcast_to, b, (2, 4))


def test_matmul_and_linear_misalignment_raise(xp):
    _raises(ValueError, r"matmul.*\(3, 4\).*\(5, 6\)", F.matmul, xp.ones((3, 4)), xp.ones((5, 6)))
    _raises(ValueError, r"matmul.*\(3,\).*\(4,\)", F.matmul, xp.ones(3), xp.ones(4))
    _raises(ValueError, r"matmul.*\(\)", F.matmul, xp.ones(()), xp.ones(3))
    _raises(ValueError, r"linear.*\(5, 4\).*\(3, 5\)", F.linear, xp.ones((5, 4)), xp.ones((3, 5)))
    _raises(ValueError, r"linear.*bias.*\(4,\)", F.linear, xp.ones((5, 4)), xp.ones((3, 4)),
            xp.ones(4))


def test_bad_reshape_raises(xp):
    _raises(ValueError, r"reshape.*\(2, 3\).*\(4,\)", F.reshape, xp.ones((2, 3)), 4)


@pytest.mark.parametrize("op", [F.sum, F.mean, F.max])
def test_bad_reduction_axis_raises(xp, op):
    _raises(ValueError, rf"{op.__name__}.*axis 3.*\(2, 3\)", op, xp.ones((2, 3)), axis=3)
    _raises(ValueError, rf"{op.__name__}.*axis -3.*\(2, 3\)", op, xp.ones((2, 3)), axis=-3)


def test_bad_transpose_axes_raise(xp):
    x = xp.ones((2, 3))
    for axes in ((0, 0), (0, 1, 2), (0, 5), (0,)):
        _raises(ValueError, r"transpose.*\(2, 3\)", F.transpose, x, axes)


def test_bad_concat_raises(xp):
    _raises(ValueError, r"concat.*\(2, 3\).*\(2, 4\)", F.concat, [xp.ones((2, 3)),
                                                                  xp.ones((2, 4))], 0)
    _raises(ValueError, r"concat.*axis 2.*\(2, 3\)", F.concat, [xp.ones((2, 3))] * 2, 2)
    _raises(ValueError, r"concat", F.concat, [])


@pytest.mark.parametrize("key", [[0, 1], np.array([0, 1]), np.array([True, False])],
                         ids=["list", "int_array", "bool_mask"])
def test_non_basic_getitem_key_raises(xp, key):
    _raises(TypeError, r"getitem.*basic indexing", F.getitem, xp.ones((2, 3)), key)


def test_getitem_out_of_range_names_shape(xp):
    _raises(IndexError, r"getitem.*\(2, 3\)", F.getitem, xp.ones((2, 3)), (0, 5))
