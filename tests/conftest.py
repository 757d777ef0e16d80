"""Shared test fixtures: the tolerance table, the `xp` backend fixture, data and RNG helpers."""
import os
import pathlib

import numpy as np
import pytest

from minires import backend

# The one tolerance table (docs/design.md, conventions). Widen an entry only with a comment
# saying why.
TOL = {
    "grad_f64": dict(atol=1e-5, rtol=1e-3),   # gradcheck, eps 1e-6: PyTorch's defaults
    "fwd_f64": dict(atol=1e-12, rtol=1e-10),  # op vs reference, both float64
    "fwd_f32": dict(atol=1e-6, rtol=1e-5),    # elementwise float32 vs float64 reference
    "fwd_f32_reduce": dict(atol=1e-5, rtol=1e-4),  # conv/matmul/BN float32 vs reference
    "gpu_vs_cpu_f32": dict(atol=1e-5, rtol=1e-4),  # cuda kernel vs cpu kernel
}
TRAIN_SMOKE_ACCURACY = 0.95  # train_smoke: accuracy threshold after N seeded steps

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module under test: NumPy always, CuPy only where a GPU is usable."""
    if request.param == "cupy":
        if not backend.cupy_available():
            pytest.skip("no usable GPU/CuPy")
        import cupy
        return cupy
    return np


@pytest.fixture
def rng():
    """A seeded numpy Generator, fresh for every test."""
    return np.random.default_rng(0)


def tol(key):
    """Tolerance kwargs for np.testing.assert_allclose from the TOL table."""
    return TOL[key]


def fwd_tol(dtype, reduce=False):
    """Forward tolerance for a dtype: fwd_f64, or fwd_f32(_reduce)."""
    if np.dtype(dtype) == np.float64:
        return TOL["fwd_f64"]
    return TOL["fwd_f32_reduce" if reduce else "fwd_f32"]


def to_numpy(a):
    """Host copy of a NumPy/CuPy array or Tensor."""
    a = getattr(a, "data", a)
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST folder, $MINIRES_DATA; the test is skipped, saying why, without it."""
    if not os.environ.get("MINIRES_DATA"):
        pytest.skip("needs the real MNIST files: set MINIRES_DATA to the folder holding the "
                    "four .gz files")
    root = pathlib.Path(os.environ["MINIRES_DATA"])
    if not (root / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST files not found in MINIRES_DATA={root}")
    return root
