"""The autograd contract (docs/design.md section 3): backward engine, graph lifetime, hooks and
grad mode, checked against closed forms (dtypes, devices and the Tensor surface:
tests/test_tensor_surface.py)."""
import asyncio
import gc
import threading
import weakref

import numpy as np
import pytest

import minires as mr
import minires.ops as F
from minires.autograd import graph_order
from minires.tensor import Function

from conftest import tol


def leaf(values, dtype=np.float64):
    return mr.tensor(np.asarray(values, dtype=dtype), requires_grad=True)


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, **tol("fwd_f64"))


# --- backward engine ---------------------------------------------------------------------------
def test_deep_chain_backprops_and_frees_without_recursion_error():
    x = y = leaf([0.5, -1.0])
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    expected = np.full(2, 1.0001 ** 10_000)
    close(x.grad, expected)
    close(y.data, x.data * expected)
    x = y = leaf([2.0])
    for _ in range(10_000):
        y = y + x  # x feeds every node: its gradient is 10,001
    y.backward(retain_graph=True)
    assert x.grad.tolist() == [10_001.0]
    probe = weakref.ref(y.creator)
    del y  # deallocating a 10,000-deep chain must not overflow the C stack
    assert probe() is None


def _graph(x):
    """A graph with a diamond, a reused intermediate and two leaves; hooks log the visit order."""
    log = []
    w = mr.tensor(np.array([0.3, -0.7, 1.1]), requires_grad=True)
    a = x * w
    b, c = a.exp(), a * 3.0
    d = b * c + b / (c * c + 1.0)
    out = (d * w).sum()
    for name, t in dict(a=a, b=b, c=c, d=d, out=out).items():
        t.register_hook(lambda g, name=name: log.append(name))
    return out, w, log


def test_backward_is_deterministic_order_and_values():
    runs = []
    for _ in range(2):
        x = leaf([0.2, -0.4, 0.9])
        out, w, log = _graph(x)
        out.backward()
        runs.append((log, x.grad, w.grad))
    assert runs[0][0] == runs[1][0]
    at = runs[0][0].index  # each consumer is finished before its producer (topological order)
    assert at("out") < at("d") < min(at("b"), at("c")) <= max(at("b"), at("c")) < at("a")
    np.testing.assert_array_equal(np.stack(runs[0][1:]), np.stack(runs[1][1:]))


def test_diamond_graph_accumulates_both_paths():
    x = leaf([0.5, -1.5, 2.0])
    ((x * 2.0) * (x * 3.0)).sum().backward()  # 6 x^2: two paths from x meet again
    close(x.grad, 12 * x.data)
    x = leaf([0.5, -1.5, 2.0])
    h = x.exp()
    (h * h + h).sum().backward()  # one intermediate used three times
    e = np.exp(x.data)
    close(x.grad, (2 * e + 1) * e)


def test_grad_accumulates_in_place_over_backward_calls():
    x = leaf([1.0, 2.0, 3.0])
    (x * x).sum().backward()
    first = x.grad
    assert isinstance(first, np.ndarray) and first.shape == x.shape and first.dtype == x.dtype
    (x * 5.0).sum().backward()
    assert x.grad is first  # += into the same array
    close(x.grad, 2 * x.data + 5)
    x, gy = leaf([1.0, 2.0]), np.array([3.0, 4.0])
    x.backward(gy)
    gy[:] = 0  # the leaf's first gradient is a copy, not an alias of the caller's array
    assert x.grad.tolist() == [3.0, 4.0]


# --- graph lifetime ----------------------------------------------------------------------------
def _chain():
    x = leaf([0.1, 0.2, 0.3])
    a = x * 2.0
    b, mul = a.exp(), a.creator  # probes: two Functions and the constant 2.0 saved by Mul
    return x, b.sum(), [weakref.ref(mul), weakref.ref(b.creator), weakref.ref(mul.saved[1])]


def test_graph_is_freed_after_backward():
    x, y, probes = _chain()
    assert all(p() is not None for p in probes)  # alive: y holds the whole chain
    y.backward()
    assert all(p() is None for p in probes)  # by refcounting alone (no cycles, no gc.collect)
    close(x.grad, 2 * np.exp(2 * x.data))


def test_backward_releases_every_array_an_op_saved():
    """Dropout's mask, CrossEntropy's labels, pool indices, ReLU's output: every array an op
    keeps for backward is in `saved`, so backward drops it even while a Function lives on (the
    loss keeps its creator). Leaves' data (conv's x and w) belong to the caller."""
    rng = np.random.default_rng(0)
    x, w = leaf(rng.standard_normal((2, 1, 4, 4))), leaf(rng.standard_normal((3, 1, 3, 3)))
    h = F.dropout(F.flatten(F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)), 0.5, rng=0)
    loss = F.cross_entropy(F.linear(h, leaf(rng.standard_normal((4, 12)))), [0, 3])
    del h
    functions = [t.creator for t in graph_order(loss) if t.creator is not None]
    kept = [a for f in functions for a in (*f.saved, *vars(f).values())
            if isinstance(a, np.ndarray) and a is not x.data and a is not w.data]
    keepers = {type(f).__name__ for f in functions if any(a is k for a in f.saved for k in kept)}
    assert keepers == {"ReLU", "MaxPool2d", "Dropout", "Linear", "CrossEntropy"}
    probes = [weakref.ref(a) for a in kept]
    del kept
    loss.backward()
    assert loss.creator is functions[-1] and all(f.saved == () for f in functions)
    assert [p for p in probes if p() is not None] == []


def test_second_backward_through_freed_graph_raises():
    x, y, _ = _chain()
    y.backward()
    with pytest.raises(RuntimeError, match=r"(?i)freed.*retain_graph"):
        y.backward()
    x = leaf([0.5, 1.0])
    a = x * 2.0
    b, c = a.exp().sum(), a.log().sum()
    b.backward()
    with pytest.raises(RuntimeError, match="Mul"):
        c.backward()  # c's own node is intact, but the Mul below it was freed


def test_retain_graph_keeps_the_graph_for_a_second_backward():
    x, y, probes = _chain()
    y.backward(retain_graph=True)
    gc.collect()
    assert all(p() is not None for p in probes)
    y.backward()
    close(x.grad, 4 * np.exp(2 * x.data))


# --- gradient checks inside the engine ---------------------------------------------------------
class BrokenDouble(Function):
    """Deliberately broken y = 2x: its gradient loses the last element, or comes twice."""

    def __init__(self, fault):
        self.fault = fault

    def forward(self, x):
        return x * 2

    def backward(self, gy):
        return gy[:-1] * 2 if self.fault == "shape" else (gy * 2, gy * 2)


def test_gradient_shape_and_count_are_checked_naming_the_op():
    y = BrokenDouble("shape")(leaf([1.0, 2.0, 3.0]))
    with pytest.raises(RuntimeError, match=r"BrokenDouble.*\(2,\).*\(3,\)"):
        y.sum().backward()
    y = BrokenDouble("count")(leaf([1.0]))
    with pytest.raises(RuntimeError, match="BrokenDouble.*2 gradients for 1 input"):
        y.backward()


def test_backward_argument_errors():
    y = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(RuntimeError, match=r"\(2,\)"):
        y.backward()  # a non-scalar needs gy
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        y.backward(np.ones(3))
    with pytest.raises(RuntimeError, match="require"):
        mr.tensor([1.0, 2.0]).sum().backward()


@pytest.mark.parametrize("wrap", [np.asarray, mr.tensor], ids=["array", "tensor"])
def test_backward_accepts_gy_as_array_or_tensor(wrap):
    x = leaf([1.0, 2.0, 3.0])
    (x * x).backward(wrap(np.array([1.0, 0.5, -1.0])))
    close(x.grad, [2.0, 2.0, -6.0])


# --- hooks -------------------------------------------------------------------------------------
def test_hook_sees_the_fully_accumulated_gradient_once():
    x = leaf([1.0, -2.0, 0.5])
    a = x * 3.0
    seen_a, seen_x = [], []
    a.register_hook(lambda g: seen_a.append(g.copy()))
    x.register_hook(lambda g: seen_x.append(g.copy()))
    ((a * a).sum() + a.sum() + (x * 4.0).sum()).backward()
    assert len(seen_a) == 1 and len(seen_x) == 1
    close(seen_a[0], 2 * a.data + 1)
    close(seen_x[0], 3 * (2 * a.data + 1) + 4)
    close(x.grad, seen_x[0])


def test_hook_returning_an_array_replaces_the_gradient():
    x = leaf([1.0, 2.0])
    a = x * 3.0
    a.register_hook(lambda g: np.ones_like(g))  # pretend dL/da = 1
    x.register_hook(lambda g: 2 * g)
    (a * a).sum().backward()
    close(x.grad, [6.0, 6.0])
    with pytest.raises(RuntimeError, match="register_hook"):
        mr.tensor([1.0]).register_hook(print)


# --- grad mode ---------------------------------------------------------------------------------
def test_no_grad_records_nothing():
    x = leaf([1.0, 2.0])
    with mr.no_grad():
        assert not mr.is_grad_enabled()
        y = x * 2.0 + 1.0
    assert mr.is_grad_enabled()
    assert y.creator is None and not y.requires_grad and y.is_leaf
    assert y.data.tolist() == [3.0, 5.0]
    with pytest.raises(ZeroDivisionError):
        with mr.no_grad():
            1 / 0
    assert mr.is_grad_enabled()


def test_no_grad_is_local_to_a_thread():
    entered, release, seen = threading.Event(), threading.Event(), {}

    def worker():
        with mr.no_grad():
            seen["worker"] = mr.is_grad_enabled()
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert entered.wait(10)
        # the worker is inside no_grad right now; this thread still records graphs
        y = leaf([1.0]) * 2.0
        assert mr.is_grad_enabled() and y.creator is not None
    finally:
        release.set()
        thread.join()
    assert seen["worker"] is False


def test_no_grad_is_local_to_an_asyncio_task():
    """A ContextVar, not a threading.local: tasks sharing one thread do not share grad mode."""
    async def inside():
        with mr.no_grad():
            await asyncio.sleep(0)  # `outside` runs now, while this task is in no_grad
            return mr.is_grad_enabled()

    async def outside():
        return mr.is_grad_enabled()

    async def main():
        return await asyncio.gather(inside(), outside())  # tasks start in this order

    assert asyncio.run(main()) == [False, True]
