"""kernels.cuda under Numba's CUDA simulator: every kernel against kernels/reference.py.

Run in its own process: `NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cuda tests/cuda_sim`
(tests/test_kernels_cuda.py does this). The simulator runs one Python thread per CUDA thread,
so every shape here is tiny. Skips itself unless the simulator is switched on.
"""
import os
import sys

import numpy as np
import pytest

from conftest import fwd_tol
from minires.kernels import reference as ref

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (tests/test_kernels_cuda.py runs it that way)",
                allow_module_level=True)
pytestmark = pytest.mark.cuda

DTYPES = [np.float32, np.float64]
# (x shape, w shape, stride, padding): same/valid, strided, rectangular, 1x1, asymmetric
CONVS = [((2, 3, 6, 5), (4, 3, 3, 3), (1, 1), (1, 1)),
         ((2, 3, 6, 5), (4, 3, 3, 2), (2, 1), (1, 2)),
         ((2, 3, 6, 5), (2, 3, 1, 1), (2, 2), (0, 0)),
         ((1, 2, 7, 5), (3, 2, 2, 3), (3, 2), (0, 1))]
# (x shape, kernel, stride): non-overlapping, overlapping, floored, rectangular
POOLS = [((2, 3, 6, 5), (2, 2), (2, 2)), ((2, 3, 6, 5), (3, 2), (1, 2)),
         ((1, 2, 7, 5), (2, 3), (2, 1))]


@pytest.fixture(scope="module")
def kc():
    """kernels.cuda in simulator mode, with quicker thread switching for its many threads."""
    pytest.importorskip("numba.cuda", reason="numba.cuda (numba-cuda) not installed")
    from minires.kernels import cuda
    assert cuda.SIMULATOR, "NUMBA_ENABLE_CUDASIM=1 is set but numba.cuda is not simulating"
    # The simulator's block manager polls its threads; with the default 5 ms GIL switch
    # interval a block with syncthreads takes ~0.1 s. 0.1 ms makes the suite ~10x quicker.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield cuda
    sys.setswitchinterval(interval)


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def close(actual, desired, dtype, reduce=False):
    assert actual.dtype == desired.dtype and actual.shape == desired.shape
    np.testing.assert_allclose(actual, desired, **fwd_tol(dtype, reduce))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONVS)
def test_conv2d_forward(kc, rng, dtype, x_shape, w_shape, stride, padding):
    x, w, b = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype), randn(rng, w_shape[0], dtype)
    for bias in (b, None):
        close(kc.conv2d_forward(x, w, bias, stride, padding),
              ref.conv2d_forward(x, w, bias, stride, padding), dtype, reduce=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONVS)
def test_conv2d_backward(kc, rng, dtype, x_shape, w_shape, stride, padding):
    x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
    gy = randn(rng, ref.conv2d_forward(x, w, None, stride, padding).shape, dtype)
    close(kc.conv2d_backward_input(gy, w, x_shape, stride, padding),
          ref.conv2d_backward_input(gy, w, x_shape, stride, padding), dtype, reduce=True)
    gw, gb = kc.conv2d_backward_weight(gy, x, w_shape, stride, padding, True)
    gw_ref, gb_ref = ref.conv2d_backward_weight(gy, x, w_shape, stride, padding, True)
    close(gw, gw_ref, dtype, reduce=True)
    close(gb, gb_ref, dtype, reduce=True)


def test_conv2d_backward_weight_without_bias_is_deterministic(kc, rng):
    # Bitwise repeatable here too: the misses once blamed on syncthreads were the simulator's
    # racy shared-array creation, made atomic by conftest.py (issue 15).
    x, gy = randn(rng, (2, 3, 6, 5), np.float32), randn(rng, (2, 4, 3, 3), np.float32)
    first, gb = kc.conv2d_backward_weight(gy, x, (4, 3, 2, 3), (2, 1), (0, 0), False)
    assert gb is None
    again, _ = kc.conv2d_backward_weight(gy, x, (4, 3, 2, 3), (2, 1), (0, 0), False)
    np.testing.assert_array_equal(first, again)  # fixed reduction order: bitwise equal
    close(first, ref.conv2d_backward_weight(gy, x, (4, 3, 2, 3), (2, 1), (0, 0), False)[0],
          np.float32, reduce=True)


def test_conv2d_non_contiguous_inputs(kc, rng):
    x = randn(rng, (2, 3, 5, 6), np.float64).transpose(0, 1, 3, 2)  # (2, 3, 6, 5), strided
    w = randn(rng, (3, 3, 4, 2), np.float64)[:, :, ::2]  # (3, 3, 2, 2), strided
    close(kc.conv2d_forward(x, w, None, (1, 1), (1, 0)),
          ref.conv2d_forward(x, w, None, (1, 1), (1, 0)), np.float64, reduce=True)
    assert not x.flags.c_contiguous  # inputs were not modified or replaced


# inf * 0 -> NaN where masked, on both sides (np.errstate cannot reach the simulator's threads)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_exact_with_special_values(kc, rng, dtype):
    x = randn(rng, (2, 3, 4, 5), dtype)
    x.flat[:6] = [0.0, -0.0, np.nan, np.inf, -np.inf, -1.0]
    gy = randn(rng, x.shape, dtype)
    gy.flat[:9] = [1.0, 2.0, 3.0, 4.0, np.inf, np.nan, np.inf, np.nan, -np.inf]
    y = kc.relu_forward(x)
    np.testing.assert_array_equal(y, ref.relu_forward(x))
    assert y.dtype == dtype and np.signbit(y.flat[1])  # max(-0.0, 0) is -0.0, as NumPy
    np.testing.assert_array_equal(kc.relu_backward(gy, y), ref.relu_backward(gy, y))
    np.testing.assert_array_equal(kc.relu_backward(gy, x), ref.relu_backward(gy, x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("alpha_shape", [None, (), (1,), (1, 1, 1, 1)])
def test_residual_add(kc, rng, dtype, relu, alpha_shape):
    x, fx, gy = (randn(rng, (2, 3, 6, 5), dtype) for _ in range(3))
    alpha = None if alpha_shape is None else np.full(alpha_shape, 0.7, dtype=dtype)
    y = kc.residual_add_forward(x, fx, alpha, relu)
    close(y, ref.residual_add_forward(x, fx, alpha, relu), dtype)
    got = kc.residual_add_backward(gy, y, fx, alpha, relu)
    want = ref.residual_add_backward(gy, y, fx, alpha, relu)
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype)
    if alpha is None:
        assert got[2] is None
    else:
        close(got[2], want[2], dtype, reduce=True)  # galpha: a device reduction


def test_residual_add_backward_many_partials(kc, rng, monkeypatch):
    """Cap the first galpha stage at 3 blocks: its grid-stride loop then runs several times."""
    # the cap is read in the module that launches the kernel, wherever kernels/cuda puts it
    monkeypatch.setattr(sys.modules[kc.residual_add_backward.__module__], "MAX_PARTIALS", 3)
    gy, y, fx = (randn(rng, (3, 5, 4, 7), np.float64) for _ in range(3))
    alpha = np.array([-1.3])
    got = kc.residual_add_backward(gy, y, fx, alpha, True)
    want = ref.residual_add_backward(gy, y, fx, alpha, True)
    for a, b in zip(got, want):
        close(a, b, np.float64, reduce=True)


def test_residual_add_backward_optional_arrays(kc, rng):
    """y is only read when relu, fx only when alpha is given: None is fine otherwise."""
    gy = randn(rng, (2, 3, 4), np.float32)
    gx, gfx, galpha = kc.residual_add_backward(gy, None, None, None, False)
    np.testing.assert_array_equal(gx, gy)
    np.testing.assert_array_equal(gfx, gy)
    assert galpha is None and gx is not gy and gfx is not gy


def test_empty_arrays(kc):
    gy = np.zeros((0, 3, 4), np.float32)
    gx, gfx, galpha = kc.residual_add_backward(gy, gy, gy, np.ones(1, np.float32), True)
    assert gx.shape == gfx.shape == gy.shape and galpha.shape == (1,) and galpha[0] == 0
    assert kc.relu_forward(gy).shape == gy.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, kernel, stride", POOLS)
def test_max_pool2d(kc, rng, dtype, x_shape, kernel, stride):
    # small integers: many ties, so "first maximum" is really tested
    x = rng.integers(-2, 3, size=x_shape).astype(dtype)
    y, argmax = kc.max_pool2d_forward(x, kernel, stride)
    y_ref, argmax_ref = ref.max_pool2d_forward(x, kernel, stride)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    gy = randn(rng, y.shape, dtype)
    close(kc.max_pool2d_backward(gy, argmax, x_shape, kernel, stride),
          ref.max_pool2d_backward(gy, argmax_ref, x_shape, kernel, stride), dtype)


def test_device_arrays_refused_under_simulator(kc):
    class FakeDeviceArray:  # looks like a GPU array: the simulator cannot read it
        __cuda_array_interface__ = {}
        shape, dtype = (2,), np.dtype(np.float32)

    with pytest.raises(TypeError, match="kernels.cuda.relu_backward.*NumPy"):
        kc.relu_backward(np.zeros(2, np.float32), FakeDeviceArray())


# --- every registered kernel (kernels/registry.py), on its first tiny test cases ------------
def _registered():
    from minires.kernels import registry
    return registry.KERNELS


def _copy(a, same_dtype=True):
    """A copy of an array argument (float64 for the oracle unless same_dtype); others as is."""
    if not isinstance(a, np.ndarray):
        return a
    return a.copy() if same_dtype or a.dtype.kind != "f" else a.astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", _registered(), ids=lambda k: k.name)
def test_registered_kernel_matches_reference(kc, kernel, dtype):
    """A kernel added to the registry is tested here without a new test: kernels.cuda's
    function on the entry's first two tiny cases (the simulator is slow) against the
    reference, compared as tests/test_registry.py compares the CPU kernels."""
    exact = set(kernel.compare) == {"exact"}
    cases = [c for c in kernel.cases(np.random.default_rng(2), dtype) if not c.threaded][:2]
    for case in cases:
        args, oracle = [_copy(a) for a in case.args], [_copy(a, exact) for a in case.args]
        got, want = getattr(kc, kernel.name)(*args), getattr(ref, kernel.name)(*oracle)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        for g, w, mode in zip(got, want, kernel.compare):
            if w is None:
                assert g is None
            elif mode == "exact":
                np.testing.assert_array_equal(g, w)
            else:
                assert g.dtype == dtype and g.shape == w.shape
                np.testing.assert_allclose(g, w, **fwd_tol(dtype, mode == "reduce"))
        for k in kernel.mutates:
            np.testing.assert_allclose(args[k], oracle[k], **fwd_tol(dtype, True))
