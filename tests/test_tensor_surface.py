"""The Tensor surface: dtype rules, devices, operators and reflected operators, properties,
methods and constructors, checked against closed forms."""
import numpy as np
import pytest

import minires as mr
import minires.ops as F
from minires import backend

from conftest import tol


def leaf(values, dtype=np.float64):
    return mr.tensor(np.asarray(values, dtype=dtype), requires_grad=True)


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, **tol("fwd_f64"))


# --- dtypes and devices ------------------------------------------------------------------------
def test_dtype_rules():
    with pytest.raises(TypeError, match="int64"):
        mr.tensor([1, 2, 3], requires_grad=True)  # only floating tensors can require grad
    with pytest.raises(TypeError):
        mr.Parameter(np.arange(3))
    for dtype in (np.float32, np.float64):  # Python scalars adopt the tensor's dtype
        t = mr.tensor(np.array([1.0, 2.0], dtype=dtype))
        assert all(y.dtype == dtype for y in (t + 1, t * 2.5, 2 - t, 3.0 / t, t ** 2, 2 ** t))
    x = leaf([1.0, 2.0], dtype=np.float32)
    y = np.array([2.0, 3.0]) * x  # NumPy promotion: float64 array * float32 tensor -> float64
    y.sum().backward()
    assert y.dtype == np.float64 and x.grad.dtype == np.float32  # grads take the input dtype
    assert x.grad.tolist() == [2.0, 3.0]
    assert mr.tensor([1.0, 2.0]).dtype == np.float32  # Python floats -> float32
    assert mr.tensor(2.5).dtype == np.float32
    assert mr.tensor([1, 2]).dtype == np.int64
    assert mr.tensor(np.zeros(2)).dtype == np.float64  # NumPy arrays keep their dtype
    assert mr.tensor([1, 2], dtype=np.float64).dtype == np.float64


def test_mixed_devices_rejected_naming_the_op(monkeypatch):
    fake, real = np.ones(3), backend.device_of  # pretend this one host array lives on a GPU
    monkeypatch.setattr(backend, "device_of", lambda a: "cuda" if a is fake else real(a))
    on_gpu, on_cpu = mr.Tensor(fake), mr.Tensor(np.ones(3))  # device=None: no transfer
    assert on_gpu.device == "cuda" and on_cpu.device == "cpu"
    with pytest.raises(ValueError, match=r"^Add: .*cuda.*cpu"):
        on_gpu + on_cpu
    with pytest.raises(ValueError, match=r"^MatMul: "):
        F.matmul(on_cpu, on_gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cupy_available(), reason="no usable GPU/CuPy")
def test_mixed_devices_rejected_on_a_real_gpu():
    x = mr.tensor(np.ones(3), device="cuda")
    with pytest.raises(ValueError, match=r"^Mul: "):
        x * mr.tensor(np.ones(3))
    y = leaf([1.0, 2.0, 3.0]).to("cuda")
    with pytest.raises(ValueError, match="backward"):
        y.backward(np.ones(3))


def test_to_device():
    t = mr.tensor([1.0])
    assert t.to("cpu") is t
    with pytest.raises(ValueError, match="tpu"):
        t.to("tpu")
    if not backend.cupy_available():
        with pytest.raises(RuntimeError, match="cuda"):  # a clear message, not a CuPy trace
            t.to("cuda")


# --- operators -------------------------------------------------------------------------------
ARR = np.array([[1.5, -2.0], [0.5, 3.0]])
# expression (works on a Tensor and on an ndarray alike) -> d sum(expr) / dv in closed form
OPERATORS = {
    "2 - t": (lambda t: 2 - t, lambda v: -1 + 0 * v),
    "2 + t": (lambda t: 2 + t, lambda v: 1 + 0 * v),
    "3 * t": (lambda t: 3 * t, lambda v: 3 + 0 * v),
    "2 / t": (lambda t: 2 / t, lambda v: -2 / v ** 2),
    "2 ** t": (lambda t: 2 ** t, lambda v: 2 ** v * np.log(2)),
    "-t": (lambda t: -t, lambda v: -1 + 0 * v),
    "t ** 3": (lambda t: t ** 3, lambda v: 3 * v ** 2),
    "t - 1.5 / t": (lambda t: t - 1.5 / t, lambda v: 1 + 1.5 / v ** 2),
    "arr * t": (lambda t: ARR * t, lambda v: ARR),
    "arr - t": (lambda t: ARR - t, lambda v: -1 + 0 * v),
    "arr + t": (lambda t: ARR + t, lambda v: 1 + 0 * v),
    "arr / t": (lambda t: ARR / t, lambda v: -ARR / v ** 2),
    "arr @ t": (lambda t: ARR @ t, lambda v: ARR.sum(0)[:, None] + 0 * v),
    "t @ arr": (lambda t: t @ ARR, lambda v: ARR.sum(1)[None, :] + 0 * v),
    "t * t / t": (lambda t: t * t / t, lambda v: 1 + 0 * v),
}


@pytest.mark.parametrize("expr", OPERATORS)
def test_operators_and_reflected_operators(expr):
    fn, deriv = OPERATORS[expr]
    v = np.array([[0.5, 1.25], [2.0, 0.75]])
    t = leaf(v)
    y = fn(t)
    assert isinstance(y, mr.Tensor) and y.creator is not None
    close(y.data, fn(v))
    y.sum().backward()
    close(t.grad, deriv(v))


# --- surface -----------------------------------------------------------------------------------
def test_properties_repr_and_hash():
    t = mr.tensor(np.zeros((2, 3, 4), np.float32), requires_grad=True)
    assert (t.shape, t.ndim, t.size, t.dtype, t.device, t.is_leaf, len(t)) == (
        (2, 3, 4), 3, 24, np.float32, "cpu", True, 2)
    assert not (t * 2).is_leaf
    t = leaf([1.0, 2.0], dtype=np.float32)
    r = repr(t)
    assert r.startswith("tensor(") and all(s in r for s in ("(2,)", "float32", "requires_grad"))
    assert "grad_fn=Mul" in repr(t * 2)
    assert len(repr(mr.zeros(1000, 1000))) < 400
    a, b = mr.tensor([1.0]), mr.tensor([1.0])  # hashing by identity (the engine relies on it)
    assert hash(a) == object.__hash__(a) and len({a, b}) == 2 and {a: 1, b: 2}[b] == 2


def test_item_numpy_detach():
    assert mr.tensor([[2.5]]).item() == 2.5 and isinstance(mr.tensor([[2.5]]).item(), float)
    with pytest.raises(ValueError, match=r"item.*\(2,\)"):
        mr.tensor([1.0, 2.0]).item()
    y = leaf([1.0, 2.0]) * 2.0
    a, d = y.numpy(), y.detach()
    assert isinstance(a, np.ndarray) and a.tolist() == [2.0, 4.0]
    assert d.data is y.data and d.creator is None and not d.requires_grad


def test_shape_methods():
    v = np.arange(24.0).reshape(2, 3, 4)
    t = leaf(v)
    for y, ref in ((t.T, v.T), (t.transpose(), v.T), (t.transpose(1, 0, 2), v.transpose(1, 0, 2)),
                   (t.transpose((2, 0, 1)), v.transpose(2, 0, 1)), (t.flatten(), v.reshape(2, 12)),
                   (t.flatten(0), v.ravel()), (t.reshape(4, 6), v.reshape(4, 6)),
                   (t.reshape((6, -1)), v.reshape(6, 4)), (t[1, :, 2], v[1, :, 2])):
        np.testing.assert_array_equal(y.data, ref)
    w = np.random.default_rng(0).standard_normal((4, 3, 2))
    (t.T * w).sum().backward()
    close(t.grad, w.T)


def test_reduction_and_elementwise_methods():
    v = np.array([[1.0, 5.0, -2.0], [4.0, 0.5, 3.0]])
    t = mr.tensor(v)
    assert t.sum().item() == 11.5 and t.mean().item() == 11.5 / 6 and t.max().item() == 5.0
    close(t.sum(axis=0).data, v.sum(0))
    close(t.max(axis=1, keepdims=True).data, [[5.0], [4.0]])
    close(t.exp().data, np.exp(v))
    close(t.relu().data, np.maximum(v, 0))
    close((t * t + 1).log().data, np.log(v * v + 1))


def test_constructors():
    for make, value in ((mr.zeros, 0.0), (mr.ones, 1.0)):
        a, b = make(2, 3), make((2, 3), dtype=np.float64, requires_grad=True)
        assert a.shape == b.shape == (2, 3) and a.dtype == np.float32 and b.dtype == np.float64
        assert np.all(a.data == value) and b.requires_grad and not a.requires_grad
    r = mr.randn(3, 4, rng=np.random.default_rng(7))
    expected = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    assert r.dtype == np.float32 and np.array_equal(r.data, expected)
    assert np.array_equal(mr.randn((3, 4), rng=7).data, expected)
    assert mr.randn(5, rng=1, dtype=np.float64).dtype == np.float64

