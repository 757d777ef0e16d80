"""gather (torch.gather semantics) and nn.Embedding built on it: forward against a direct loop,
the scatter-add gradient (repeated indices accumulate), gradients of every order, errors, and
PyTorch where installed. Runs on every `xp` backend."""
import numpy as np
import pytest

import minires.ops as F
from conftest import to_numpy
from helpers import (adjoint, check_forward, check_grad, check_gradgrad, check_module_grad,
                     param_fn)
from minires import nn
from minires.tensor import Tensor

DTYPES = [np.float32, np.float64]


def on(xp, a, dtype=np.float64):
    """A copy of host data `a` as an xp array of `dtype` (never an alias of `a`)."""
    return xp.asarray(np.array(a, dtype=dtype))


def nondet(xp):
    """gradcheck's nondet_tol: CuPy's scatter-add sums repeated indices with atomics, in no
    fixed order, so two identical backward passes may differ in the last bits (NumPy's add.at
    is sequential: exactly 0)."""
    return 0.0 if xp is np else 1e-12


def direct_gather(x, dim, index):
    """out[p] = x[p with p[dim] replaced by index[p]], one element at a time."""
    out = np.empty(index.shape, x.dtype)
    for p in np.ndindex(*index.shape):
        src = list(p)
        src[dim] = index[p]
        out[p] = x[tuple(src)]
    return out


def direct_scatter_add(shape, dim, index, g):
    """zeros(shape) with g[p] added at x's position of out[p], one element at a time."""
    gx = np.zeros(shape)
    for p in np.ndindex(*index.shape):
        src = list(p)
        src[dim] = index[p]
        gx[tuple(src)] += g[p]
    return gx


CASES = [  # x shape, index shape, dim: index longer than x along dim repeats indices surely
    ((5,), (7,), 0),
    ((4, 3), (6, 3), 0),
    ((4, 3), (2, 5), 1),                  # index shorter than x along the other dim
    ((3, 4, 5), (2, 4, 3), -1),
    ((3, 4, 5), (3, 6, 2), 1),
    ((2, 3, 2, 2), (1, 3, 2, 4), 3),
]


def case_data(rng, xs, index_shape, dim):
    return rng.standard_normal(xs), rng.integers(0, xs[dim], size=index_shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, index_shape, dim", CASES)
def test_gather_forward(xp, rng, dtype, xs, index_shape, dim):
    x, index = case_data(rng, xs, index_shape, dim)
    expected = direct_gather(x.astype(dtype), dim % len(xs), index)
    for idx in (xp.asarray(index), Tensor(xp.asarray(index)), index.tolist()):
        y = F.gather(on(xp, x, dtype), dim, idx)
        check_forward(y, expected.astype(np.float64), dtype)


@pytest.mark.parametrize("dim", [-3, -2, -1, 0, 1, 2])
def test_gather_every_dim(xp, rng, dim):
    x = rng.standard_normal((3, 4, 5))
    shape = [2, 3, 4]
    shape[dim] = 7  # longer than x along dim: repeats
    index = rng.integers(0, x.shape[dim], size=shape)
    y = F.gather(on(xp, x), dim, xp.asarray(index))
    check_forward(y, direct_gather(x, dim % 3, index), np.float64)


def test_gather_keeps_integer_values(xp):
    y = F.gather(xp.arange(5), 0, xp.asarray([4, 0, 4]))
    assert y.dtype.kind == "i"  # no float conversion on the way
    np.testing.assert_array_equal(to_numpy(y), [4, 0, 4])


def test_gather_gradient_accumulates_repeated_indices(xp):
    x = Tensor(on(xp, [10.0, 20.0, 30.0]), requires_grad=True)
    F.gather(x, 0, xp.asarray([0, 0, 2, 0])).backward(on(xp, [1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(to_numpy(x.grad), [7.0, 0.0, 3.0])
    x2 = Tensor(on(xp, np.zeros((2, 3))), requires_grad=True)
    F.gather(x2, 1, xp.asarray([[2, 2], [0, 2]])).backward(on(xp, [[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(to_numpy(x2.grad), [[0, 0, 3], [3, 0, 4]])


@pytest.mark.parametrize("xs, index_shape, dim", CASES)
def test_gather_gradient_is_a_scatter_add(xp, rng, xs, index_shape, dim):
    x, index = case_data(rng, xs, index_shape, dim)
    t = Tensor(on(xp, x), requires_grad=True)
    gy = rng.standard_normal(index_shape)
    F.gather(t, dim, xp.asarray(index)).backward(on(xp, gy))
    check_forward(t.grad, direct_scatter_add(xs, dim % len(xs), index, gy), np.float64)


@pytest.mark.parametrize("xs, index_shape, dim", CASES)
def test_gather_grad_and_gradgrad(xp, rng, xs, index_shape, dim):
    x, index = case_data(rng, xs, index_shape, dim)
    x, index = on(xp, x), xp.asarray(index)
    gather = lambda x: F.gather(x, dim, index)  # noqa: E731
    check_grad(gather, [x], nondet_tol=nondet(xp))
    check_gradgrad(gather, [x], nondet_tol=nondet(xp))
    # the scatter-add the gradient records, and the gather its own gradient records
    scatter = adjoint(gather, x)
    gy = on(xp, rng.standard_normal(index.shape))
    for fn, arg in ((scatter, gy), (adjoint(scatter, gy), x)):
        check_grad(fn, [arg], nondet_tol=nondet(xp))
        check_gradgrad(fn, [arg], nondet_tol=nondet(xp))


def test_gather_empty_index(xp):
    x = Tensor(on(xp, np.ones((3, 2))), requires_grad=True)
    y = F.gather(x, 0, xp.zeros((0, 2), dtype=np.int64))
    assert y.shape == (0, 2)
    y.backward(xp.zeros((0, 2)))
    assert not to_numpy(x.grad).any()


# --- errors ---------------------------------------------------------------------------------
def z(xp, *shape, dtype=np.float64):
    return Tensor(xp.zeros(shape, dtype=dtype))


def ints(xp, a):
    return xp.asarray(np.array(a, dtype=np.int64))


BAD_INPUTS = {  # name: (call(xp), error type, message regex)
    "index_too_big": (lambda xp: F.gather(z(xp, 3, 2), 0, ints(xp, [[0, 3]])), IndexError,
                      r"gather: index values must be in \[0, 3\) \(x.shape\[0\] = 3.*got values "
                      r"in \[0, 3\]"),
    "negative_index": (lambda xp: F.gather(z(xp, 3, 2), 1, ints(xp, [[-1, 1]])), IndexError,
                       r"gather: index values must be in \[0, 2\).*negative indices are "
                       r"refused.*got values in \[-1, 1\]"),
    "float_index": (lambda xp: F.gather(z(xp, 3), 0, xp.zeros(2)), TypeError,
                    "gather: index must be an integer array, got float64"),
    "bool_index": (lambda xp: F.gather(z(xp, 3), 0, xp.asarray([True, False])), TypeError,
                   "gather: index must be an integer array, got bool"),
    "index_ndim": (lambda xp: F.gather(z(xp, 3, 2), 0, ints(xp, [0, 1])), ValueError,
                   r"gather: index must have x's number of dimensions, got index shape \(2,\) "
                   r"for x shape \(3, 2\)"),
    "dim_too_big": (lambda xp: F.gather(z(xp, 3, 2), 2, ints(xp, [[0]])), ValueError,
                    r"gather: dim 2 out of range for x of shape \(3, 2\) \(expected -2 <= dim "
                    r"< 2\)"),
    "dim_too_negative": (lambda xp: F.gather(z(xp, 3, 2), -3, ints(xp, [[0]])), ValueError,
                         r"gather: dim -3 out of range"),
    "dim_float": (lambda xp: F.gather(z(xp, 3, 2), 1.0, ints(xp, [[0]])), TypeError,
                  "gather: dim must be an int, got float"),
    "index_wider_elsewhere": (lambda xp: F.gather(z(xp, 3, 2), 0, ints(xp, [[0, 1, 2]])),
                              ValueError, r"gather: index shape \(1, 3\) is larger than x shape "
                                          r"\(3, 2\) along dim 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(xp, case):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call(xp)


def test_gather_index_on_another_device(xp):
    if xp is np:
        pytest.skip("needs a GPU: x and index on different devices")
    with pytest.raises(ValueError, match="gather: index is on cpu but x is on cuda"):
        F.gather(z(xp, 3), 0, np.array([0, 1]))


# --- nn.Embedding ---------------------------------------------------------------------------
def embedding(xp, *args, **kwargs):
    layer = nn.Embedding(*args, **kwargs)
    return layer.to("cpu" if xp is np else "cuda")


def test_embedding_shapes_and_lookup(xp):
    emb = embedding(xp, 10, 4, rng=0)
    weight = to_numpy(emb.weight)
    assert weight.shape == (10, 4) and weight.dtype == np.float32
    idx = np.array([[1, 9, 1], [0, 3, 3]])
    for indices in (xp.asarray(idx), Tensor(xp.asarray(idx)), idx.tolist()):
        y = emb(indices)
        assert y.shape == (2, 3, 4) and y.dtype == np.float32
        np.testing.assert_array_equal(to_numpy(y), weight[idx])  # exactly the rows
    assert emb(xp.asarray(7)).shape == (4,)  # a 0-d index: one vector
    assert emb(xp.zeros((0, 5), dtype=np.int64)).shape == (0, 5, 4)


def test_embedding_init_is_standard_normal_and_seeded():
    weight = nn.Embedding(1000, 50, rng=0).weight.data
    assert abs(weight.mean()) < 0.02 and abs(weight.std() - 1) < 0.02  # N(0, 1) as PyTorch
    again = nn.Embedding(1000, 50, rng=0, dtype=np.float64).weight.data
    np.testing.assert_array_equal(weight, again.astype(np.float32))  # one draw, rounded


def test_embedding_gradient_accumulates_repeated_indices(xp, rng):
    emb = embedding(xp, 5, 3, rng=0, dtype=np.float64)
    gy = rng.standard_normal((2, 2, 3))
    emb(xp.asarray([[1, 4], [1, 1]])).backward(on(xp, gy))
    expected = np.zeros((5, 3))
    expected[1], expected[4] = gy[0, 0] + gy[1, 0] + gy[1, 1], gy[0, 1]
    check_forward(emb.weight.grad, expected, np.float64)


def test_embedding_gradcheck(xp, rng):
    emb = embedding(xp, 6, 3, rng=1, dtype=np.float64)
    idx = xp.asarray(rng.integers(0, 6, size=(4, 5)))  # 20 lookups of 6 rows: repeats
    fn, params = param_fn(emb)  # before check_module_grad, which swaps in its own weight
    check_module_grad(emb, idx, nondet_tol=nondet(xp))
    check_gradgrad(lambda w: (fn(idx, w) ** 2).sum(), params, nondet_tol=nondet(xp))


def test_embedding_repr_and_errors(xp):
    emb = embedding(xp, 5, 2, rng=0)
    assert repr(emb) == "Embedding(5, 2)"
    with pytest.raises(IndexError, match=r"Embedding\(5, 2\): gather: index values must be in "
                                         r"\[0, 5\).*got values in \[0, 5\]"):
        emb(xp.asarray([0, 5]))
    with pytest.raises(IndexError, match=r"Embedding\(5, 2\): .*got values in \[-2, 1\]"):
        emb(xp.asarray([1, -2]))
    with pytest.raises(TypeError, match=r"Embedding\(5, 2\): gather: index must be an integer "
                                        r"array, got float64"):
        emb(xp.asarray([0.0, 1.0]))
    for bad in ({"num_embeddings": 0, "embedding_dim": 2}, {"num_embeddings": 3,
                                                             "embedding_dim": 2.5}):
        with pytest.raises(ValueError, match="Embedding: .* must be a positive int"):
            nn.Embedding(**bad)
    with pytest.raises(TypeError, match="Embedding: dtype must be float32 or float64"):
        nn.Embedding(3, 2, dtype=np.int32)


# --- PyTorch, where installed ---------------------------------------------------------------
@pytest.mark.parametrize("xs, index_shape, dim", CASES)
def test_gather_matches_torch(rng, xs, index_shape, dim):
    torch = pytest.importorskip("torch")
    x, index = case_data(rng, xs, index_shape, dim)
    t, tt = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    y, ty = F.gather(t, dim, index), torch.gather(tt, dim, torch.tensor(index))
    gy = rng.standard_normal(index_shape)
    y.backward(gy)
    ty.backward(torch.tensor(gy))
    check_forward(y, ty.detach().numpy(), np.float64)
    check_forward(t.grad, tt.grad.numpy(), np.float64)


def test_embedding_matches_torch(rng):
    torch = pytest.importorskip("torch")
    emb = nn.Embedding(7, 3, rng=0, dtype=np.float64)
    ref = torch.nn.Embedding(7, 3, _weight=torch.tensor(emb.weight.data.copy()))
    idx = rng.integers(0, 7, size=(3, 4))
    gy = rng.standard_normal((3, 4, 3))
    y, ty = emb(idx), ref(torch.tensor(idx))
    y.backward(gy)
    ty.backward(torch.tensor(gy))
    check_forward(y, ty.detach().numpy(), np.float64)
    check_forward(emb.weight.grad, ref.weight.grad.numpy(), np.float64)
