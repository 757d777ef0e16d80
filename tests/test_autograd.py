"""minires.grad (torch.autograd.grad semantics) and create_graph=True: gradients of gradients
against closed forms, the argument rules, graph lifetime, and that every op has a
backward_graph (gradgradcheck of each op runs in test_cli via `minires gradcheck`)."""
import importlib
import inspect
import pkgutil

import numpy as np
import pytest

import minires
import minires.ops as F
from conftest import to_numpy
from helpers import check_gradgrad
from minires.gradcheck import GradcheckError
from minires.tensor import Function, Tensor


def leaf(xp, values, dtype=np.float64):
    return Tensor(xp.asarray(np.array(values, dtype=dtype)), requires_grad=True)


def test_grad_equals_backward_and_leaves_dot_grad_alone(xp, rng):
    a = rng.standard_normal((3, 4))
    x, w = leaf(xp, a), leaf(xp, rng.standard_normal((4, 2)))
    gx, gw = minires.grad(F.tanh(x @ w).sum(), [x, w])
    assert x.grad is None and w.grad is None
    F.tanh(x @ w).sum().backward()
    np.testing.assert_array_equal(to_numpy(gx), to_numpy(x.grad))
    np.testing.assert_array_equal(to_numpy(gw), to_numpy(w.grad))
    assert gx.creator is None and not gx.requires_grad  # no create_graph: constants


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_derivatives_of_x_cubed_to_third_order(xp, dtype):
    x = leaf(xp, [-1.5, 0.5, 2.0], dtype)
    (d1,) = minires.grad((x ** 3).sum(), x, create_graph=True)
    (d2,) = minires.grad(d1.sum(), x, create_graph=True)
    (d3,) = minires.grad(d2.sum(), x)
    v = np.array([-1.5, 0.5, 2.0])
    for d, expected in ((d1, 3 * v ** 2), (d2, 6 * v), (d3, np.full(3, 6.0))):
        assert d.dtype == dtype
        np.testing.assert_allclose(to_numpy(d), expected, rtol=1e-6)


def test_hessian_vector_product_of_a_quadratic_form(xp, rng):
    """f(x) = 0.5 x^T A x + sin-free closed form: H = (A + A^T) / 2, so Hv is exact."""
    a, v, x0 = rng.standard_normal((5, 5)), rng.standard_normal(5), rng.standard_normal(5)
    x, a_t = leaf(xp, x0), Tensor(xp.asarray(a))
    f = 0.5 * (x * (a_t @ x)).sum()
    (g,) = minires.grad(f, x, create_graph=True)
    np.testing.assert_allclose(to_numpy(g), 0.5 * (a + a.T) @ x0, rtol=1e-12)
    (hv,) = minires.grad((g * Tensor(xp.asarray(v))).sum(), x)
    np.testing.assert_allclose(to_numpy(hv), 0.5 * (a + a.T) @ v, rtol=1e-12)


def test_several_outputs_grad_outputs_and_an_intermediate_input(xp, rng):
    x = leaf(xp, rng.standard_normal(4))
    h = x * 2.0
    y1, y2 = (h * h).sum(), h * 3.0
    g2 = rng.standard_normal(4)
    gh, gx = minires.grad([y1, y2], [h, x], [None, xp.asarray(g2)])
    hv = 2 * to_numpy(x)
    np.testing.assert_allclose(to_numpy(gh), 2 * hv + 3 * g2)
    np.testing.assert_allclose(to_numpy(gx), 2 * (2 * hv + 3 * g2))


def test_differentiating_through_grad_outputs(xp, rng):
    """A grad_output that requires grad is part of the graph: d/dv <J^T v, u> = J u."""
    x = leaf(xp, rng.standard_normal(3))
    v, u = leaf(xp, rng.standard_normal(3)), rng.standard_normal(3)
    y = F.exp(x)
    (jtv,) = minires.grad(y, x, v, create_graph=True)
    (gv,) = minires.grad((jtv * Tensor(xp.asarray(u))).sum(), v)
    np.testing.assert_allclose(to_numpy(gv), np.exp(to_numpy(x)) * u, rtol=1e-12)


def test_allow_unused(xp):
    x, z = leaf(xp, [1.0, 2.0]), leaf(xp, [3.0])
    y = (x * x).sum()
    with pytest.raises(RuntimeError, match=r"grad: input 1 \(shape \(1,\)\) was not used.*"
                                           r"allow_unused=True"):
        minires.grad(y, [x, z])
    gx, gz = minires.grad(y, [x, z], allow_unused=True)  # the error freed nothing
    assert gz is None
    np.testing.assert_allclose(to_numpy(gx), [2.0, 4.0])


def test_argument_errors(xp):
    x, c = leaf(xp, [1.0, 2.0]), Tensor(xp.asarray([1.0, 2.0]))
    y = (x * x).sum()
    with pytest.raises(RuntimeError, match=r"grad: input 0 \(shape \(2,\)\) does not require"):
        minires.grad(y, c)
    with pytest.raises(RuntimeError, match=r"grad: output 0 .* does not require grad"):
        minires.grad(c.sum(), x)
    with pytest.raises(TypeError, match=r"grad: inputs\[0\] must be a Tensor, got ndarray"):
        minires.grad(y, np.ones(2))
    with pytest.raises(ValueError, match="grad: got 2 grad_outputs for 1 outputs"):
        minires.grad(y, x, [None, None])
    with pytest.raises(RuntimeError, match="grad: gradient can be implied only for a "
                                           "one-element output, got shape .*; pass "
                                           r"grad_outputs\[0\]"):
        minires.grad(x * x, x)
    with pytest.raises(ValueError, match=r"grad: grad_outputs\[0\] shape \(3,\) != tensor shape"):
        minires.grad(x * x, x, xp.ones(3))


def test_retain_graph_defaults_to_create_graph(xp):
    x = leaf(xp, [1.0, 2.0])
    y = (x * x).sum()
    minires.grad(y, x)  # create_graph=False: the graph is freed
    with pytest.raises(RuntimeError, match="graph through Sum was already freed"):
        minires.grad(y, x)
    y = (x * x).sum()
    minires.grad(y, x, create_graph=True)  # kept: a second call works
    (g,) = minires.grad(y, x)
    np.testing.assert_allclose(to_numpy(g), [2.0, 4.0])


def test_results_never_alias_the_callers_gradient(xp):
    x = leaf(xp, [1.0, 2.0])
    gy = xp.asarray([5.0, 6.0])
    (g,) = minires.grad(x + 0.0, x, gy)
    g.data[...] = 0
    np.testing.assert_array_equal(to_numpy(gy), [5.0, 6.0])


class _Counted(Function):
    """y = 2 x, counting backward calls."""
    calls = 0

    def forward(self, x):
        return 2 * x

    def backward(self, gy):
        type(self).calls += 1
        return 2 * gy


def test_only_the_part_of_the_graph_leading_to_the_inputs_runs():
    x = leaf(np, [1.0, 2.0])
    h = _Counted()(x)
    y = (h * h).sum()
    _Counted.calls = 0
    (gh,) = minires.grad(y, h)  # stops at h: nothing below it runs
    assert _Counted.calls == 0
    np.testing.assert_allclose(gh.data, [4.0, 8.0])


def test_an_op_without_backward_graph_says_so_and_backward_still_works():
    x = leaf(np, [1.0, 2.0])
    with pytest.raises(NotImplementedError, match="_Counted does not support "
                                                  "create_graph=True"):
        minires.grad(_Counted()(x).sum(), x, create_graph=True)
    _Counted()(x).sum().backward()  # the raw-array path never needs backward_graph
    np.testing.assert_allclose(x.grad, [2.0, 2.0])


def test_backward_never_calls_backward_graph(monkeypatch):
    from minires.ops import arith

    def refuse(self, gy):
        raise AssertionError("backward_graph called on the fast path")

    monkeypatch.setattr(arith.Mul, "backward_graph", refuse)
    x = leaf(np, [1.0, 2.0])
    (x * x).sum().backward()
    minires.grad((x * x).sum(), x)
    np.testing.assert_allclose(x.grad, [2.0, 4.0])


def test_hooks_see_arrays_and_cannot_replace_a_recorded_gradient():
    x = leaf(np, [1.0, 2.0])
    h = x * 3.0
    seen = []
    h.register_hook(lambda g: seen.append(g.copy()))
    minires.grad((h * h).sum(), x, create_graph=True)
    np.testing.assert_allclose(seen[0], [6.0, 12.0])
    h2 = x * 3.0
    h2.register_hook(lambda g: g * 0)
    with pytest.raises(RuntimeError, match="replaces the gradient cannot be used with "
                                           "create_graph=True"):
        minires.grad((h2 * h2).sum(), x, create_graph=True)


def test_create_graph_works_inside_no_grad():
    x = leaf(np, [3.0])
    y = (x ** 2).sum()
    with minires.no_grad():
        (g,) = minires.grad(y, x, create_graph=True)
    assert g.requires_grad and g.creator is not None


def test_gradient_penalty_on_parameters(rng):
    """d/dw ||d f / d x||^2 for f = sum(tanh(x @ w)): a second derivative through a matmul,
    checked numerically by gradgradcheck's machinery (gradcheck of the penalty)."""
    from helpers import check_grad

    x0, w0 = rng.standard_normal((2, 3)), rng.standard_normal((3, 2))

    def penalty(x, w):
        # gradcheck's numerical passes run without grad and with constant inputs
        x = x if x.requires_grad else Tensor(x.data, requires_grad=True)
        with minires.enable_grad():
            (gx,) = minires.grad(F.tanh(x @ w).sum(), x, create_graph=True)
            return (gx * gx).sum()

    check_grad(penalty, [x0, w0])


class _SquareWrongGraph(Function):
    """x * x with a right backward and a wrong backward_graph (gy * x instead of 2 gy x)."""

    def forward(self, x):
        return x * x

    def backward(self, gy):
        return 2 * gy * self.inputs[0].data

    def backward_graph(self, gy):
        return gy * self.inputs[0]


def test_gradgradcheck_catches_a_wrong_backward_graph(rng):
    x = rng.standard_normal((2, 3))
    with pytest.raises(GradcheckError, match=r"gradgradcheck failed for .*<lambda>: input 0 "
                                             r"\(shape \(2, 3\)\): backward_graph and "
                                             r"backward disagree"):
        check_gradgrad(lambda t: _SquareWrongGraph()(t), [x])
    check_gradgrad(lambda t: t * t, [x])


def _op_functions():
    """Every Function subclass defined in the minires.ops modules."""
    found = {}
    for info in pkgutil.iter_modules(F.__path__):
        module = importlib.import_module(f"minires.ops.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Function) and cls.__module__ == module.__name__ \
                    and not name.startswith("_"):  # _Binary: an abstract base
                found[f"{info.name}.{name}"] = cls
    return found


def test_every_op_has_a_backward_graph():
    functions = _op_functions()
    assert len(functions) > 30
    missing = [name for name, cls in functions.items()
               if cls.backward_graph is Function.backward_graph]
    assert not missing, f"ops without backward_graph: {missing}"
