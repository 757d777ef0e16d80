"""kernels.cuda batch norm under Numba's CUDA simulator, against kernels/reference.py.

Run in its own process: `NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cuda tests/cuda_sim`
(tests/test_kernels_cuda.py does this). Tiny shapes: the simulator runs one Python thread per
CUDA thread. Skips itself unless the simulator is switched on.
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
# (N, C) input; one block per channel; 144 elements per channel: two blocks (partials) each
SHAPES = [(5, 2), (2, 3, 3, 4), (4, 3, 6, 6)]


@pytest.fixture(scope="module")
def kc():
    """kernels.cuda in simulator mode, with quicker thread switching for its many threads."""
    pytest.importorskip("numba.cuda", reason="numba.cuda (numba-cuda) not installed")
    from minires.kernels import cuda
    assert cuda.SIMULATOR, "NUMBA_ENABLE_CUDASIM=1 is set but numba.cuda is not simulating"
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # see test_sim_kernels.py: ~10x quicker block scheduling
    yield cuda
    sys.setswitchinterval(interval)


def arrays(rng, shape, dtype):
    """x, gamma, beta, running_mean, running_var of dtype."""
    c = shape[1]
    host = [2 * rng.standard_normal(shape) + 1, rng.standard_normal(c), rng.standard_normal(c),
            0.3 * rng.standard_normal(c), rng.random(c) + 0.5]
    return [a.astype(dtype) for a in host]


def close(actual, desired, dtype):
    assert actual.dtype == dtype and actual.shape == desired.shape
    np.testing.assert_allclose(actual, desired, **fwd_tol(dtype, reduce=True))


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm(kc, rng, shape, dtype, training, relu):
    x, gamma, beta, rm, rv = args = arrays(rng, shape, dtype)
    oracle = [a.astype(np.float64) for a in args]  # running buffers updated by the reference
    y, mean, inv_std = kc.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.2, 1e-3, relu)
    want = ref.batch_norm_forward(*oracle, training, 0.2, 1e-3, relu)
    for a, b in zip((y, mean, inv_std, rm, rv), (*want, oracle[3], oracle[4])):
        close(a, b, dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    got = kc.batch_norm_backward(gy, x, gamma, beta, mean, inv_std, training, relu)
    # relu: backward's mask, recomputed from x, must be exactly forward's y > 0
    g = gy.astype(np.float64) * (y > 0) if relu else gy.astype(np.float64)
    want = ref.batch_norm_backward(g, *(a.astype(np.float64) for a in (x, gamma, beta, mean,
                                                                       inv_std)), training, False)
    for a, b in zip(got, want):
        close(a, b, dtype)


def test_batch_norm_without_running_buffers_and_float64_buffers(kc, rng):
    """None buffers are skipped; float64 buffers of float32 data are updated in place."""
    x, gamma, beta, _, _ = arrays(rng, (2, 3, 4, 4), np.float32)
    y, mean, inv_std = kc.batch_norm_forward(x, gamma, beta, None, None, True, 0.1, 1e-5, False)
    close(y, ref.batch_norm_forward(x.astype(np.float64), gamma, beta, None, None, True, 0.1,
                                    1e-5, False)[0], np.float32)
    rm, rv = np.zeros(3), np.ones(3)
    kc.batch_norm_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5, False)
    want_rm, want_rv = np.zeros(3), np.ones(3)
    ref.update_running(want_rm, want_rv, x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)), 32, 0.1)
    assert rm.dtype == np.float64
    close(rm.astype(np.float32), want_rm, np.float32)
    close(rv.astype(np.float32), want_rv, np.float32)
