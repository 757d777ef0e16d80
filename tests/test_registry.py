"""kernels/registry.py, the one list of kernels: every entry is complete (CPU, CUDA and reference
functions, test cases at tiny and threaded sizes, a bench row), and every registered kernel
matches kernels/reference.py in float32 and float64 through the dispatch, leaving its inputs
unchanged. The bench rows run (without PyTorch too)."""
import ast
import contextlib
import importlib
import inspect

import numpy as np
import pytest

from conftest import REPO, fwd_tol
from minires import kernels
from minires.kernels import reference, registry

DTYPES = [np.float32, np.float64]
KERNEL_IDS = [k.name for k in registry.KERNELS]


def _cuda_functions(family):
    """Top-level functions of kernels/cuda/<family>.py, parsed: numba.cuda may be absent."""
    tree = ast.parse((REPO / "kernels" / "cuda" / f"{family}.py").read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("kernel", registry.KERNELS, ids=KERNEL_IDS)
def test_every_registered_kernel_is_complete(kernel):
    cpu = pytest.importorskip(f"minires.kernels.cpu.{kernel.family}")
    assert getattr(cpu, kernel.name).__module__ == cpu.__name__, "defined in its family module"
    assert kernel.name in _cuda_functions(kernel.family), \
        f"kernels/cuda/{kernel.family}.py defines no {kernel.name}"
    # the check returns the reference's positional arguments: same names, same order
    check = list(inspect.signature(kernel.check).parameters)
    assert check == list(inspect.signature(getattr(reference, kernel.name)).parameters)
    assert kernel.name in kernels.PUBLIC_KERNELS and callable(getattr(kernels, kernel.name))
    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        cases = kernel.cases(rng, dtype)
        assert any(c.threaded for c in cases) and any(not c.threaded for c in cases), \
            "test cases need a tiny size and a size that takes the threaded path"
        assert all(len(c.args) == len(check) for c in cases)
    assert any(kernel.name in row.kernels for row in registry.BENCH), "no bench row times it"
    assert set(kernel.compare) <= {"exact", "elementwise", "reduce"}


def test_registry_names_are_unique_and_exported_everywhere():
    assert len(set(registry.NAMES)) == len(registry.NAMES)
    assert kernels.PUBLIC_KERNELS == registry.NAMES
    cpu = pytest.importorskip("minires.kernels.cpu")
    assert cpu.__all__ == list(registry.NAMES)
    assert all(set(row.kernels) <= set(registry.NAMES) for row in registry.BENCH)


# --- every kernel against the reference --------------------------------------------------
class _CountingLock:
    """Stands in for kernels.cpu.memory's launch lock: counts parallel launches."""

    def __init__(self, lock):
        self.lock, self.entered = lock, 0

    def __enter__(self):
        self.entered += 1
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def _copy(a):
    return a.copy() if isinstance(a, np.ndarray) else a


def _wide(a):
    """float64 copy of a float array (the oracle's precision); others as they are."""
    return a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a


def _compare(got, want, mode, dtype, what):
    if want is None:
        assert got is None, what
        return
    assert got.shape == want.shape, what
    if mode == "exact":
        assert got.dtype == want.dtype, what
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        assert got.dtype == np.dtype(dtype) or got.dtype.kind != "f", what
        np.testing.assert_allclose(got, want, **fwd_tol(dtype, mode == "reduce"), err_msg=what)


@pytest.fixture
def launches(monkeypatch):
    """Counts multi-threaded CPU runs, by either mechanism kernels.cpu uses: a parallel @njit
    kernel under kernels.cpu.memory's launch lock, or a share of the work handed to the
    conv kernels' team of Python threads (kernels/cpu/conv_threads.py). Two threads when Numba
    has them, else None."""
    memory = pytest.importorskip("minires.kernels.cpu.memory")
    numba = pytest.importorskip("numba")
    counter = _CountingLock(memory._launch_lock)
    monkeypatch.setattr(memory, "_launch_lock", counter)
    with contextlib.suppress(ImportError):
        team = importlib.import_module("minires.kernels.cpu.conv_threads").team
        run = team.run

        def counting_run(fn, args, n):
            counter.entered += n > 1
            return run(fn, args, n)
        monkeypatch.setattr(team, "run", counting_run)
    before = numba.get_num_threads()
    if numba.config.NUMBA_NUM_THREADS < 2:
        yield None
        return
    numba.set_num_threads(2)
    yield counter
    numba.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", registry.KERNELS, ids=KERNEL_IDS)
def test_kernel_matches_reference(kernel, dtype, launches):
    assert kernels.backend_name(np.zeros(1, dtype)) == "numba-cpu"
    exact = set(kernel.compare) == {"exact"}
    for i, case in enumerate(kernel.cases(np.random.default_rng(1), dtype)):
        what = f"{kernel.name} case {i} ({'threaded' if case.threaded else 'tiny'}, {dtype})"
        args = [_copy(a) for a in case.args]
        oracle = [_copy(a) if exact else _wide(a) for a in case.args]
        entered = launches.entered if launches else 0
        got = getattr(kernels, kernel.name)(*args)
        if launches and case.threaded:
            assert launches.entered > entered, f"{what}: did not take the threaded path"
        want = getattr(reference, kernel.name)(*oracle)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        assert len(got) == len(want) == len(kernel.compare), what
        for k, (g, w, mode) in enumerate(zip(got, want, kernel.compare)):
            _compare(g, w, mode, dtype, f"{what}, output {k}")
        for k, (before, after) in enumerate(zip(case.args, args)):
            if k in kernel.mutates:  # updated in place, as the reference does
                _compare(after, oracle[k], "reduce", dtype, f"{what}, argument {k}")
            elif isinstance(before, np.ndarray):
                np.testing.assert_array_equal(after, before, err_msg=f"{what}: input {k} changed")


def test_checks_name_the_kernel():
    x = np.zeros((2, 3), np.float32)
    for kernel, args in [("relu_forward", (x.astype(np.int32),)),
                         ("relu_backward", (x, x.astype(np.float64))),
                         ("residual_add_forward", (x, x[:1])),
                         ("max_pool2d_forward", (x, (2, 2), (2, 2)))]:
        with pytest.raises((TypeError, ValueError), match=kernel):
            getattr(kernels, kernel)(*args)


# --- bench rows ----------------------------------------------------------------------------
@pytest.mark.parametrize("row", registry.BENCH, ids=[r.label for r in registry.BENCH])
def test_bench_row_runs(row):
    """Each row's minires side runs through the dispatch and the reference; with PyTorch
    installed its side runs too (batch 2)."""
    arrays = row.arrays(np.random.default_rng(0), 2)
    for k in (kernels, reference):
        for fn in row.ours(k, arrays):
            fn()
    with contextlib.suppress(ImportError):
        torch = importlib.import_module("torch")
        for fn in row.torch(torch, {name: torch.from_numpy(a) for name, a in arrays.items()}):
            fn()
