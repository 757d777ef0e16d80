"""kernels.cpu (Numba) against kernels.reference, through the ops with gradcheck, and the
dispatch fallback to reference when kernels.cpu cannot be imported."""
import importlib
import threading
import warnings

import numpy as np
import pytest

from minires import kernels
from conftest import fwd_tol, tol
from minires.kernels import reference as ref

cpu = pytest.importorskip("minires.kernels.cpu", reason="Numba CPU kernels unavailable")
numba = pytest.importorskip("numba")

DTYPES = [np.float32, np.float64]
# x shape, w shape, stride, padding: odd shapes that hit every layout path (phases for
# strides, cropping when padding > K - 1, rectangular kernels and images, 1x1, N=1, C=1).
CONV_CASES = [
    ((2, 3, 7, 9), (4, 3, 3, 5), (1, 1), (0, 2)),
    ((2, 3, 7, 9), (5, 3, 3, 3), (2, 2), (1, 1)),
    ((1, 1, 5, 6), (3, 1, 1, 1), (1, 1), (0, 0)),
    ((3, 2, 9, 7), (3, 2, 3, 3), (2, 1), (1, 2)),
    ((2, 4, 6, 6), (4, 4, 1, 1), (2, 2), (1, 1)),
    ((1, 2, 6, 5), (2, 2, 5, 4), (3, 2), (2, 0)),
    ((2, 16, 12, 12), (16, 16, 3, 3), (1, 1), (1, 1)),
    ((1, 1, 7, 9), (1, 1, 3, 5), (1, 1), (1, 2)),
    ((1, 8, 6, 5), (3, 8, 3, 3), (1, 1), (2, 1)),
    ((2, 3, 5, 6), (4, 3, 1, 1), (1, 1), (1, 1)),  # padding wider than the kernel
    ((1, 2, 4, 5), (3, 2, 3, 2), (1, 1), (3, 2)),
]


def _data(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _check(actual, expected, dtype, reduce=True):
    assert actual.dtype == np.dtype(dtype)
    np.testing.assert_allclose(actual, expected, **fwd_tol(dtype, reduce))


def _wide(*arrays):
    """float64 copies: the oracle runs in float64 so float32 results meet fwd_f32_reduce."""
    return [None if a is None else np.asarray(a, np.float64) for a in arrays]


@pytest.fixture
def threads():
    """Set Numba's thread count for one test, restoring it afterwards."""
    before = numba.get_num_threads()
    yield numba.set_num_threads
    numba.set_num_threads(before)


def test_exports_exactly_the_public_kernels():
    assert sorted(cpu.__all__) == sorted(kernels.PUBLIC_KERNELS)
    assert all(callable(getattr(cpu, name)) for name in kernels.PUBLIC_KERNELS)


def test_dispatch_uses_numba_for_numpy_arrays():
    assert kernels.backend_name(np.zeros(1, np.float32)) == "numba-cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONV_CASES)
def test_conv2d_matches_reference(rng, dtype, x_shape, w_shape, stride, padding):
    x, w, b = _data(rng, x_shape, dtype), _data(rng, w_shape, dtype), _data(rng, w_shape[0],
                                                                              dtype)
    y = cpu.conv2d_forward(x, w, b, stride, padding)
    _check(y, ref.conv2d_forward(*_wide(x, w, b), stride, padding), dtype)
    gy = _data(rng, y.shape, dtype)
    gx = cpu.conv2d_backward_input(gy, w, x.shape, stride, padding)
    _check(gx, ref.conv2d_backward_input(*_wide(gy, w), x.shape, stride, padding), dtype)
    gw, gb = cpu.conv2d_backward_weight(gy, x, w.shape, stride, padding, True)
    gw_ref, gb_ref = ref.conv2d_backward_weight(*_wide(gy, x), w.shape, stride, padding, True)
    _check(gw, gw_ref, dtype)
    _check(gb, gb_ref, dtype)
    assert cpu.conv2d_backward_weight(gy, x, w.shape, stride, padding, False)[1] is None


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("x_shape, w_shape", [((70, 2, 5, 5), (3, 2, 1, 1)),
                                              ((1, 3, 8, 8), (5, 3, 3, 3)),
                                              ((9, 4, 6, 7), (7, 4, 3, 3))])
def test_conv2d_work_split(rng, threads, nthreads, x_shape, w_shape):
    """Image blocks of unequal size (the last one smaller), output-channel chunks for N=1
    and odd channel counts, on one and two threads."""
    threads(min(nthreads, numba.config.NUMBA_NUM_THREADS))
    pad = (w_shape[2] // 2, w_shape[3] // 2)
    x, w = _data(rng, x_shape, np.float64), _data(rng, w_shape, np.float64)
    y = cpu.conv2d_forward(x, w, None, (1, 1), pad)
    _check(y, ref.conv2d_forward(x, w, None, (1, 1), pad), np.float64)
    gy = _data(rng, y.shape, np.float64)
    gw, gb = cpu.conv2d_backward_weight(gy, x, w.shape, (1, 1), pad, True)
    gw_ref, gb_ref = ref.conv2d_backward_weight(gy, x, w.shape, (1, 1), pad, True)
    _check(gw, gw_ref, np.float64)
    _check(gb, gb_ref, np.float64)
    _check(cpu.conv2d_backward_input(gy, w, x.shape, (1, 1), pad),
           ref.conv2d_backward_input(gy, w, x.shape, (1, 1), pad), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_are_read_and_left_unchanged(rng, dtype):
    base = _data(rng, (3, 4, 11, 16), dtype)
    x = base[:, 1:, ::2, 1::2]  # (3, 3, 6, 8), strided in every axis
    w = np.asfortranarray(_data(rng, (5, 3, 3, 3), dtype))
    gy = _data(rng, (3, 5, 8, 6), dtype).transpose(0, 1, 3, 2)  # (3, 5, 6, 8)
    before = [a.copy() for a in (x, w, gy)]
    _check(cpu.conv2d_forward(x, w, None, (1, 1), (1, 1)),
           ref.conv2d_forward(*_wide(x, w), None, (1, 1), (1, 1)), dtype)
    _check(cpu.conv2d_backward_input(gy, w, x.shape, (1, 1), (1, 1)),
           ref.conv2d_backward_input(*_wide(gy, w), x.shape, (1, 1), (1, 1)), dtype)
    gw, _ = cpu.conv2d_backward_weight(gy, x, w.shape, (1, 1), (1, 1), True)
    _check(gw, ref.conv2d_backward_weight(*_wide(gy, x), w.shape, (1, 1), (1, 1), True)[0],
           dtype)
    y = _data(rng, (3, 5, 8, 12), dtype)[:, :, :6, ::-2]  # (3, 5, 6, 6), reversed columns
    np.testing.assert_array_equal(cpu.relu_forward(y), ref.relu_forward(y))
    np.testing.assert_array_equal(cpu.relu_backward(gy[..., :6], y),
                                  ref.relu_backward(gy[..., :6], y))
    _check(cpu.residual_add_forward(y, gy[..., :6], None, True),
           ref.residual_add_forward(y, gy[..., :6], None, True), dtype, reduce=False)
    y, am = cpu.max_pool2d_forward(x, (2, 3), (2, 2))
    y_ref, am_ref = ref.max_pool2d_forward(x, (2, 3), (2, 2))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(am, am_ref)
    g = _data(rng, y.shape[:2] + y.shape[:1:-1], dtype).swapaxes(2, 3)  # y's shape, strided
    _check(cpu.max_pool2d_backward(g, am, x.shape, (2, 3), (2, 2)),
           ref.max_pool2d_backward(*_wide(g), am, x.shape, (2, 3), (2, 2)), dtype, reduce=False)
    for a, b in zip((x, w, gy), before):
        np.testing.assert_array_equal(a, b)


def test_outputs_are_fresh_arrays(rng):
    """Results never alias each other or scratch: a later call leaves earlier results intact."""
    x1, x2 = _data(rng, (2, 3, 8, 8), np.float32), _data(rng, (2, 3, 8, 8), np.float32)
    w = _data(rng, (4, 3, 3, 3), np.float32)
    y1 = cpu.conv2d_forward(x1, w, None, (1, 1), (1, 1))
    kept = y1.copy()
    y2 = cpu.conv2d_forward(x2, w, None, (1, 1), (1, 1))
    assert not np.shares_memory(y1, y2)
    np.testing.assert_array_equal(y1, kept)
    gw1, gb1 = cpu.conv2d_backward_weight(y1, x1, w.shape, (1, 1), (1, 1), True)
    gw2, gb2 = cpu.conv2d_backward_weight(y2, x2, w.shape, (1, 1), (1, 1), True)
    assert not np.shares_memory(gw1, gw2) and not np.shares_memory(gb1, gb2)
    gx, gfx, _ = cpu.residual_add_backward(y1, None, None, None, False)
    assert not np.shares_memory(gx, y1) and not np.shares_memory(gx, gfx)


def test_concurrent_calls_from_python_threads(rng):
    xs = [_data(rng, (4, 3, 9, 9), np.float64) for _ in range(4)]
    w = _data(rng, (6, 3, 3, 3), np.float64)
    results = [None] * len(xs)

    def work(i):
        for _ in range(3):
            results[i] = cpu.conv2d_forward(xs[i], w, None, (1, 1), (1, 1))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for x, y in zip(xs, results):
        _check(y, ref.conv2d_forward(x, w, None, (1, 1), (1, 1)), np.float64)


@pytest.fixture(params=[False, True], ids=["one-thread", "split"])
def split(request, monkeypatch):
    """Elementwise and pooling kernels on the calling thread, or (thresholds lowered) split
    over threads."""
    if request.param:
        monkeypatch.setattr(cpu.elementwise, "_SPLIT_MIN", 64)
        monkeypatch.setattr(cpu.pooling, "_POOL_PARALLEL_MIN", 64)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 16, 28, 28)])
def test_relu(rng, dtype, shape, split):
    x, gy = _data(rng, shape, dtype), _data(rng, shape, dtype)
    x.flat[:4] = [0.0, -0.0, np.inf, -np.inf]
    y = cpu.relu_forward(x)
    np.testing.assert_array_equal(y, ref.relu_forward(x))
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(cpu.relu_backward(gy, y), ref.relu_backward(gy, y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [None, 0.375, 1.0])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (8, 16, 28, 28)])
def test_residual_add(rng, dtype, alpha, relu, shape, split):
    x, fx, gy = (_data(rng, shape, dtype) for _ in range(3))
    a = None if alpha is None else np.array([alpha], dtype)
    y = cpu.residual_add_forward(x, fx, a, relu)
    _check(y, ref.residual_add_forward(*_wide(x, fx, a), relu), dtype, reduce=False)
    got = cpu.residual_add_backward(gy, y, fx, a, relu)
    want = ref.residual_add_backward(gy, y, fx, a, relu)
    _check(got[0], want[0], dtype, reduce=False)
    _check(got[1], want[1], dtype, reduce=False)
    if alpha is None:
        assert got[2] is None
    else:  # galpha sums over every element: the reduction tolerance, against float64
        galpha = ref.residual_add_backward(*_wide(gy, y, fx, a), relu)[2]
        assert got[2].shape == a.shape
        _check(got[2], galpha, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride", [
    ((2, 3, 9, 9), (3, 3), (2, 2)),   # overlapping windows
    ((1, 2, 7, 8), (3, 2), (2, 1)),   # rectangular, overlapping along both axes
    ((4, 16, 28, 28), (4, 4), (4, 4)),  # the seed net's pools
    ((4, 16, 7, 7), (2, 2), (2, 2)),   # floor: the last row and column are dropped
    ((1, 1, 5, 5), (5, 5), (1, 1)),   # one window covering the whole image
])
def test_max_pool2d(rng, dtype, shape, kernel, stride, split):
    x = rng.integers(-3, 4, shape).astype(dtype)  # many ties: the first maximum must win
    y, am = cpu.max_pool2d_forward(x, kernel, stride)
    y_ref, am_ref = ref.max_pool2d_forward(x, kernel, stride)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(am, am_ref)
    assert am.dtype == np.int32
    gy = _data(rng, y.shape, dtype)
    _check(cpu.max_pool2d_backward(gy, am, x.shape, kernel, stride),
           ref.max_pool2d_backward(*_wide(gy), am, x.shape, kernel, stride), dtype,
           reduce=False)


def test_unknown_elementwise_operation_is_refused_before_any_launch(monkeypatch):
    """The parallel driver picks its loop by code and has no else branch: an unknown code must
    raise, never run another loop or nothing (a wrong dispatch must fail loudly)."""
    ew = cpu.elementwise
    launched = []
    monkeypatch.setattr(ew, "launch", lambda *args: launched.append(args))
    x = np.ones(8, np.float32)
    unknown = max(ew.OPERATIONS) + 1
    with pytest.raises(ValueError, match="unknown operation"):
        ew._split(unknown, (x, x.copy()), 2, np.float32(1))
    assert not launched
    ew._split(ew.RELU_FORWARD, (x, x.copy()), 2, np.float32(1))  # a known one launches
    assert len(launched) == 1


def test_max_pool2d_backward_refuses_an_argmax_outside_the_window(rng, split):
    x = _data(rng, (2, 3, 6, 6), np.float32)
    _, am = cpu.max_pool2d_forward(x, (2, 2), (2, 2))
    gy = _data(rng, am.shape, np.float32)
    for bad in (4, -1):
        wrong = am.copy()
        wrong[1, 2, 0, 1] = bad
        with pytest.raises(ValueError, match="argmax"):
            cpu.max_pool2d_backward(gy, wrong, x.shape, (2, 2), (2, 2))


def test_scratch_pool_is_bounded(rng):
    w = _data(rng, (2, 1, 3, 3), np.float32)
    for size in range(5, 5 + 2 * cpu.scratch.max_keys):
        cpu.conv2d_forward(_data(rng, (1, 1, size, 5), np.float32), w, None, (1, 1), (1, 1))
    assert cpu.scratch.keys() <= cpu.scratch.max_keys


def test_recycled_outputs_are_never_handed_out_while_referenced(rng):
    """Big outputs come back only after every reference (including views) is gone."""
    x = _data(rng, (4, 16, 32, 32), np.float32)  # 256 KiB: recycled size
    assert x.nbytes >= cpu.outputs.min_bytes
    held = [cpu.relu_forward(x) for _ in range(3)]
    view = cpu.relu_forward(-x)[1:]  # only a view survives: its base must stay untouched
    new = cpu.relu_forward(x * 2)
    assert not any(np.shares_memory(new, a) for a in held + [view])
    np.testing.assert_array_equal(view, ref.relu_forward(-x)[1:])
    for i in range(len(held)):
        np.testing.assert_array_equal(held[i], ref.relu_forward(x))
    base = held.pop()
    addr = base.__array_interface__["data"][0]
    del base
    again = cpu.relu_forward(x * 3)  # the released array is reused, with the new result
    assert again.__array_interface__["data"][0] == addr
    np.testing.assert_array_equal(again, ref.relu_forward(x * 3))


# --- through the ops: the Numba path passes gradcheck (float64) ----------------------------
def _gradcheck():
    return pytest.importorskip("minires.gradcheck")


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, (0, 1))])
def test_conv2d_op_gradcheck(rng, stride, padding):
    gc = _gradcheck()
    import minires.ops as F
    x, w, b = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((4, 3, 3, 2)), \
        rng.standard_normal(4)
    gc.gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding), [x, w, b],
                 **tol("grad_f64"))


@pytest.mark.parametrize("alpha, relu", [(None, False), (None, True), (0.5, True)])
def test_residual_relu_pool_ops_gradcheck(rng, alpha, relu):
    gc = _gradcheck()
    import minires.ops as F
    x = gc.away_from_kinks(rng.standard_normal((2, 3, 5, 4)))
    fx = gc.away_from_kinks(rng.standard_normal((2, 3, 5, 4)))
    inputs = [x, fx] + ([] if alpha is None else [np.array(alpha)])
    if relu:  # keep x + alpha fx away from 0 as well
        a = 1.0 if alpha is None else alpha
        fx = np.where(np.abs(x + a * fx) < 1e-2, fx + 0.1, fx)
        inputs[1] = fx
    gc.gradcheck(lambda *t: F.residual_add(*t[:2], alpha=t[2] if len(t) > 2 else None,
                                           relu=relu), inputs, **tol("grad_f64"))
    gc.gradcheck(F.relu, [x], **tol("grad_f64"))
    gc.gradcheck(lambda t: F.max_pool2d(t, 2, 1), [gc.distinct(x)], **tol("grad_f64"))


@pytest.mark.parametrize("relu", [False, True])
def test_residual_add_shares_one_gradient_array_safely(rng, relu):
    """Without alpha, ResidualAdd hands ONE array to both inputs (gy itself, or gy masked by
    the ReLU). Backward must never write into such an array: leaves get copies, pending
    gradients are summed into new arrays. A second backward accumulates into each .grad
    separately, and x reaching the add twice (through a ReLU too) still gets the sum."""
    import minires as mr
    import minires.ops as F
    x = mr.tensor(rng.standard_normal((2, 3, 4, 4)), requires_grad=True)
    fx = mr.tensor(rng.standard_normal((2, 3, 4, 4)), requires_grad=True)
    gy = rng.standard_normal((2, 3, 4, 4))
    kept = gy.copy()
    y = F.residual_add(x, fx, relu=relu)
    mask = (y.numpy() > 0) if relu else np.ones(gy.shape, bool)
    y.backward(gy, retain_graph=True)
    np.testing.assert_array_equal(gy, kept)  # the caller's array is untouched
    assert not np.shares_memory(x.grad, fx.grad) and not np.shares_memory(x.grad, gy)
    np.testing.assert_array_equal(x.grad, gy * mask)
    y.backward(gy)  # accumulates with += into each leaf's own array
    np.testing.assert_array_equal(x.grad, 2 * gy * mask)
    np.testing.assert_array_equal(fx.grad, 2 * gy * mask)
    h = mr.tensor(rng.standard_normal((2, 3, 4, 4)), requires_grad=True)
    z = F.residual_add(h, F.relu(h), relu=relu)  # h gets the shared array twice over
    z.backward(gy)
    g = gy * ((z.numpy() > 0) if relu else 1)
    np.testing.assert_allclose(h.grad, g + g * (h.numpy() > 0))
    np.testing.assert_array_equal(gy, kept)


# --- the fallback when kernels.cpu cannot be imported -------------------------------------
def test_fallback_to_reference_warns_once(monkeypatch, rng):
    real_import = importlib.import_module

    def no_cpu(name, *args):
        if name == "minires.kernels.cpu":
            raise ImportError("simulated: no Numba")
        return real_import(name, *args)

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels.importlib, "import_module", no_cpu)
    x = _data(rng, (2, 3, 4, 4), np.float32)
    with pytest.warns(RuntimeWarning, match="reference"):
        y = kernels.relu_forward(x)
    np.testing.assert_array_equal(y, ref.relu_forward(x))
    assert kernels.backend_name(x) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        w = _data(rng, (2, 3, 3, 3), np.float32)
        np.testing.assert_allclose(kernels.conv2d_forward(x, w, None, (1, 1), (1, 1)),
                                   ref.conv2d_forward(x, w, None, (1, 1), (1, 1)))
