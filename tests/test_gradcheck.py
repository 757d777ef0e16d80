"""Tests of the gradient checker itself: correct ops pass, each kind of broken backward fails."""
import re

import numpy as np
import pytest

import minires.ops as F
from conftest import to_numpy, tol
from helpers import check_grad
from minires.gradcheck import GradcheckError, away_from_kinks, distinct, gradcheck
from minires.tensor import Function, Tensor


class Square(Function):
    """y = x * x with a configurable backward, to break it in one controlled way at a time."""

    def __init__(self, mode="ok", bad_index=None):
        self.mode, self.bad_index = mode, bad_index
        self.calls = 0

    def forward(self, x):
        self.save_for_backward(x)
        return x * x

    def backward(self, gy):
        x = self.saved[0]
        self.calls += 1
        if self.mode == "scale":  # wrong constant: 3x instead of 2x
            return 3 * x * gy
        if self.mode == "ignores_gy":  # the chain rule forgotten: d(x*x)/dx alone
            return 2 * x
        if self.mode == "offset":  # nonzero even for gy = 0
            return 2 * x * gy + 1e-3
        if self.mode == "nondet":  # a different rounding each call, as atomics can give
            return 2 * x * gy * (1 + 1e-9 * self.calls)
        gx = 2 * x * gy
        if self.mode == "one_element":
            gx[self.bad_index] += 5 * gy[self.bad_index]
        return gx


def square(x, **kwargs):
    return Square(**kwargs)(x)


class FlipIdentity(Function):
    """y = x, but backward reverses gy: invisible to an all-ones upstream gradient."""

    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        return gy[::-1].copy()


def test_passes_on_correct_ops(xp, rng):
    x = xp.asarray(rng.standard_normal((3, 4)))
    w = xp.asarray(rng.standard_normal((5, 4)))
    b = xp.asarray(rng.standard_normal(5))
    report = check_grad(square, [x])
    assert set(report) == {"max_abs", "max_rel"}  # the largest errors seen, as floats
    assert all(isinstance(v, float) and 0 <= v < 1e-3 for v in report.values()), report
    check_grad(F.linear, [x, w, b])
    check_grad(F.linear, [x, w, b], fast=True)
    check_grad(lambda a: F.tanh(a).sum(axis=1), [x])


@pytest.mark.parametrize("fast", [False, True])
def test_catches_wrong_backward(xp, rng, fast):
    x = xp.asarray(rng.standard_normal((3, 4)))
    with pytest.raises(GradcheckError, match="numerical and analytical gradients differ"):
        gradcheck(lambda a: square(a, mode="scale"), [x], fast=fast)


def test_catches_backward_ignoring_gy(xp, rng):
    x = xp.asarray(rng.standard_normal((3, 4)))
    with pytest.raises(GradcheckError, match="zero grad_output gave a nonzero gradient"):
        gradcheck(lambda a: square(a, mode="ignores_gy"), [x])


def test_catches_nonzero_gradient_for_zero_gy(xp, rng):
    x = xp.asarray(rng.standard_normal((3, 4)))
    with pytest.raises(GradcheckError, match=r"zero grad_output .* max abs 1\.000e-03"):
        gradcheck(lambda a: square(a, mode="offset"), [x])


def test_catches_nondeterministic_backward(xp, rng):
    x = xp.asarray(rng.standard_normal((3, 4)))
    with pytest.raises(GradcheckError, match=r"not deterministic.*nondet_tol=0\.0"):
        gradcheck(lambda a: square(a, mode="nondet"), [x])
    # the same small run-to-run difference is accepted once nondet_tol allows it
    gradcheck(lambda a: square(a, mode="nondet"), [x], nondet_tol=1e-8)


def test_random_upstream_catches_permuted_gy(xp, rng):
    x = xp.asarray(rng.standard_normal((4, 3)))
    flip = FlipIdentity()
    # an all-ones upstream gradient cannot see the reversal: why the default is random
    gradcheck(flip, [x], grad_output=np.ones((4, 3)))
    with pytest.raises(GradcheckError, match="gradients differ"):
        gradcheck(FlipIdentity(), [x])


@pytest.mark.parametrize("fast", [False, True])
def test_reports_the_wrong_element(xp, rng, fast):
    x = xp.asarray(rng.standard_normal((3, 5)))
    fn = lambda a: square(a, mode="one_element", bad_index=(2, 1))  # noqa: E731
    with pytest.raises(GradcheckError) as info:
        gradcheck(fn, [x], fast=fast)
    msg = str(info.value)
    assert "worst element at index (2, 1)" in msg
    assert re.search(r"\(2, 1\)\s+\S+\s+\S+ <- worst", msg)
    assert "(2, 0)" in msg and "(2, 2)" in msg  # neighbours shown
    assert ("fast mode failed" in msg) == fast


def test_fast_mode_on_large_input_reports_directional_values(rng):
    x = rng.standard_normal((70, 70))  # 4900 elements: too many to rerun in full mode
    with pytest.raises(GradcheckError, match=r"fast mode: directional derivatives differ"):
        gradcheck(lambda a: square(a, mode="scale"), [x], fast=True)


def test_message_contents(rng):
    x = rng.standard_normal((2, 3))
    w = rng.standard_normal((4, 3))

    def bad_second_input(a, b):
        return F.linear(a, square(b, mode="scale"))

    with pytest.raises(GradcheckError) as info:
        gradcheck(bad_second_input, [x, w], eps=1e-6, atol=2e-5, rtol=3e-3, seed=7)
    msg = str(info.value)
    assert "bad_second_input" in msg and "Linear" in msg
    assert "input 1 (shape (4, 3))" in msg
    assert re.search(r"max abs error \d\.\d+e[-+]\d+, max rel error \d\.\d+e[-+]\d+", msg)
    assert "eps=1e-06 atol=2e-05 rtol=0.003 seed=7" in msg
    assert "numerical" in msg and "analytical" in msg
    assert len(msg.splitlines()) <= 10  # a few neighbours, never whole arrays


def test_whole_arrays_never_printed(rng):
    x = rng.standard_normal((40, 40))
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda a: square(a, mode="scale"), [x])
    assert len(str(info.value)) < 1000


def test_caller_arrays_unchanged(xp, rng):
    x32 = xp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    x64 = xp.asarray(rng.standard_normal((3, 4)))
    t = Tensor(xp.asarray(rng.standard_normal((3, 4))), requires_grad=True)
    before = [to_numpy(a).copy() for a in (x32, x64, t.data)]
    gradcheck(lambda a, b, c: a * b + c, [x32, x64, t], fast=False)
    gradcheck(lambda a, b, c: a * b + c, [x32, x64, t], fast=True)
    for a, ref in zip((x32, x64, t.data), before):
        np.testing.assert_array_equal(to_numpy(a), ref)
    assert x32.dtype == np.float32
    assert t.grad is None


def test_float32_input_is_checked_in_float64(rng):
    seen = []

    def record(a):
        seen.append(a.dtype)
        return F.tanh(a)

    gradcheck(record, [rng.standard_normal(3).astype(np.float32)])
    assert set(seen) == {np.dtype(np.float64)}


def test_integer_and_none_inputs_pass_through(rng):
    logits = rng.standard_normal((4, 3))
    labels = np.array([0, 2, 1, 2])
    gradcheck(lambda z, t, unused: F.cross_entropy(z, t), [logits, labels, None])


def test_check_mask_skips_an_input(rng):
    x = rng.standard_normal((3, 2))
    bad = lambda a, b: square(a, mode="scale") + b  # noqa: E731
    gradcheck(bad, [x, x], check=(False, True))
    with pytest.raises(GradcheckError, match="input 0"):
        gradcheck(bad, [x, x], check=(True, True))


def test_bad_arguments(rng):
    with pytest.raises(TypeError, match="no floating-point input"):
        gradcheck(lambda a: a, [np.arange(3)])
    with pytest.raises(ValueError, match=r"grad_output shape \(2,\) != output shape \(3,\)"):
        gradcheck(F.tanh, [rng.standard_normal(3)], grad_output=np.ones(2))
    with pytest.raises(TypeError, match="must return a Tensor"):
        gradcheck(lambda a: a.data, [rng.standard_normal(3)])
    with pytest.raises(TypeError, match=r"check\[0\] is set but input 0 is not floating"):
        gradcheck(lambda a, b: b, [np.arange(3), rng.standard_normal(3)], check=(True, True))


def test_output_must_stay_float64(rng):
    def downcast(a):
        return Tensor(a.data.astype(np.float32), requires_grad=True)

    with pytest.raises(GradcheckError, match="output dtype is float32"):
        gradcheck(downcast, [rng.standard_normal(3)])


def test_away_from_kinks(xp):
    x = xp.asarray(np.array([-2.0, -1e-9, 0.0, 1e-9, 0.5]))
    y = to_numpy(away_from_kinks(x, 0.1))
    np.testing.assert_allclose(y, [-2.1, -0.1 - 1e-9, 0.1, 0.1 + 1e-9, 0.6], **tol("fwd_f64"))
    assert np.all(np.abs(y) >= 0.1)
    assert isinstance(away_from_kinks(Tensor(x), 0.1), Tensor)


def test_distinct_breaks_ties_keeps_order(xp, rng):
    x = xp.asarray(np.array([[1.0, 1.0], [0.0, 1.0], [0.0, -3.0]], dtype=np.float32))
    y = to_numpy(distinct(x, gap=1e-2))
    assert y.dtype == np.float32 and y.shape == (3, 2)
    s = np.sort(y.ravel())
    assert np.all(np.diff(s) >= 1e-2 * (1 - 1e-6))
    # strict order of unequal inputs is kept
    flat = to_numpy(x).ravel()
    yf = y.ravel()
    for i in range(flat.size):
        for j in range(flat.size):
            if flat[i] < flat[j]:
                assert yf[i] < yf[j]


def test_max_pool_with_ties_needs_distinct(rng):
    x = np.ones((1, 1, 4, 4))  # every window is a four-way tie: not differentiable
    with pytest.raises(GradcheckError):
        gradcheck(lambda a: F.max_pool2d(a, 2), [x])
    gradcheck(lambda a: F.max_pool2d(a, 2), [distinct(x)])
