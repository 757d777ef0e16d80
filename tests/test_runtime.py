"""minires.runtime: the OpenMP wait policy it prefers (and when it leaves it alone), thread
limits and their restoration, the vector ISA, BLAS; nothing changes at import."""
import os
import subprocess
import sys

import numba
import pytest

from conftest import REPO
from minires import runtime


@pytest.fixture
def fresh(monkeypatch):
    """A runtime that has not been asked yet, a pool not started, no policy variables."""
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(runtime._passive, "outcome", "never asked")
    monkeypatch.setattr(runtime._numba_parallel, "_is_initialized", False)
    return monkeypatch


def test_sets_passive_when_nobody_chose(fresh):
    assert "OpenMP default" in runtime.wait_policy()
    assert runtime.prefer_passive_openmp() == "minires set OMP_WAIT_POLICY=PASSIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert runtime.wait_policy() == "PASSIVE (set by minires)"
    runtime.prefer_passive_openmp()  # again (the CLI called twice in one process): still ours
    assert runtime.wait_policy() == "PASSIVE (set by minires)"


@pytest.mark.parametrize("var,value", [("OMP_WAIT_POLICY", "ACTIVE"),
                                       ("GOMP_SPINCOUNT", "10000")])
def test_leaves_the_users_choice_alone(fresh, var, value):
    fresh.setenv(var, value)
    assert runtime.prefer_passive_openmp() == f"left alone: the user chose {var}={value}"
    assert os.environ.get("OMP_WAIT_POLICY") == (value if var == "OMP_WAIT_POLICY" else None)
    assert runtime.wait_policy() == f"{var}={value} (from the environment)"


def test_leaves_a_started_pool_alone(fresh):
    fresh.setattr(runtime._numba_parallel, "_is_initialized", True)
    assert runtime.prefer_passive_openmp() == ("left alone: Numba's thread pool had already "
                                               "started")
    assert "OMP_WAIT_POLICY" not in os.environ
    assert runtime.wait_policy() == ("OpenMP default: spin, then sleep (Numba's pool started "
                                     "first)")


def test_an_unknown_numba_layout_counts_as_started(fresh):
    fresh.delattr(runtime._numba_parallel, "_is_initialized")
    assert runtime.pool_started()
    assert runtime.prefer_passive_openmp().startswith("left alone")


def test_importing_minires_changes_no_environment_variable():
    code = ("import os; before = dict(os.environ); import minires, minires.runtime, "
            "minires.cli; import numpy as np; minires.ops.relu(np.ones(4, np.float32)); "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",
                                                             "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_limit_threads_sets_and_restores():
    before = numba.get_num_threads()
    with runtime.limit_threads(1):
        assert numba.get_num_threads() == 1 == runtime.numba_threads()
        assert "1 threads" in runtime.blas()
    assert numba.get_num_threads() == before
    with runtime.limit_threads(None):
        assert numba.get_num_threads() == before


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_set_threads_refuses_nonsense(n):
    with pytest.raises(ValueError, match=rf"threads must be an integer >= 1, got {n!r}"):
        runtime.set_threads(n)


def test_set_threads_refuses_more_than_the_pool():
    with pytest.raises(ValueError, match="number of threads must be between 1 and"):
        runtime.set_threads(numba.config.NUMBA_NUM_THREADS + 1)


@pytest.mark.parametrize("flags,isa", [({"avx512f": True, "avx2": True}, "AVX-512"),
                                       ({"avx512f": False, "avx2": True}, "AVX2"),
                                       ({"avx": True, "sse4.2": True}, "AVX"),
                                       ({"neon": True}, "NEON"), ({}, "unknown")])
def test_vector_isa_names_the_widest_set(monkeypatch, flags, isa):
    from llvmlite import binding
    monkeypatch.setattr(binding, "get_host_cpu_features", lambda: flags)
    assert runtime.vector_isa() == isa


def test_facts_of_this_machine():
    assert runtime.vector_isa() in ("AVX-512", "AVX2", "AVX", "SSE4.2", "SVE", "NEON",
                                    "unknown")
    rows = dict(runtime.cpu_rows())
    assert rows["numba threading layer"] in ("omp", "tbb", "workqueue")
    assert rows["blas"] != "none found" and "threads" in rows["blas"]
    assert rows["vector isa"] == runtime.vector_isa()
    gpu = dict(runtime.gpu_rows())
    assert "gpu" in gpu and "cupy" in gpu


def test_notice_if_slow_speaks_only_for_a_slow_block():
    """A slow block (here: one that waits until the notice is out, so no timing is assumed)
    gets the message and its duration; a quick one nothing."""
    import io
    import threading

    class Watched(io.StringIO):
        printed = threading.Event()

        def write(self, s):
            self.printed.set()
            return super().write(s)

    slow = Watched()
    with runtime.notice_if_slow("compiling", after=0.0, file=slow):
        assert slow.printed.wait(timeout=60)
    assert slow.getvalue().startswith("compiling ... done in ")
    quick = io.StringIO()
    with runtime.notice_if_slow("compiling", after=3600, file=quick):
        pass
    assert quick.getvalue() == ""
