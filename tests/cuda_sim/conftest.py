"""Make the CUDA simulator's shared-array creation atomic (only under NUMBA_ENABLE_CUDASIM=1).

Cause (numba-cuda 0.30, numba/cuda/simulator/kernelapi.py, FakeCUDAShared.array): the simulator
runs each CUDA thread as a Python thread and keys a block's shared arrays by the calling source
line. It does "look the line up; if missing, np.empty(); store" with no lock, so when a thread
is switched out between the lookup and the store, a second thread of the same block also misses
and creates its own buffer. The two threads then write to different "shared" arrays and the
tree reduction (_block_sum, kernels/cuda) reads an uninitialised one: on a busy machine
conv2d_backward_weight returned -4.9e16 (issue 15). The kernels are not at fault (on a GPU a
shared array exists once per block), so the test run patches the simulator: the method below
does the same lookup/create/store under one threading.Lock.

If the simulator's internals no longer look as patched here, collecting tests/cuda_sim fails
with an error saying so (rather than skipping, or running unpatched): unpatched, the suite
would be flaky again without anyone noticing, and a skip would quietly drop the kernel tests
from every run. numba-cuda is pinned (<0.31), so this only happens on a deliberate upgrade:
then re-read FakeCUDAShared.array and update or drop this patch.

Test-only knobs (tests/test_kernels_cuda.py uses them to show the race and the fix):
  MINIRES_SIM_RACE_DELAY=<seconds>  sleep between the lookup and the store, to force the race
  MINIRES_SIM_SHARED_LOCK=0         same code without the lock: the race is back
"""
import contextlib
import importlib
import inspect
import os
import sys
import threading
import time

import numpy as np

RACE_DELAY = float(os.environ.get("MINIRES_SIM_RACE_DELAY") or 0)
LOCKED = os.environ.get("MINIRES_SIM_SHARED_LOCK", "1") != "0"
_PATCHED = "_minires_serialised"  # marks the replacement, so it is installed once
_race = {"delay": RACE_DELAY}  # seconds slept between lookup and store; 0 outside tests of it


class SimulatorChanged(RuntimeError):
    pass


def serialise_shared_arrays(kernelapi, locked=True):
    """Replace kernelapi.FakeCUDAShared.array by a copy whose lookup+create+store is atomic."""
    cls = getattr(kernelapi, "FakeCUDAShared", None)
    original = getattr(cls, "array", None)
    if original is None:
        raise SimulatorChanged("numba.cuda.simulator.kernelapi.FakeCUDAShared.array not found")
    if getattr(original, _PATCHED, False):
        return cls
    params = list(inspect.signature(original).parameters)
    if params != ["self", "shape", "dtype", "alignment"]:
        raise SimulatorChanged(f"FakeCUDAShared.array{tuple(params)}, expected "
                               "(self, shape, dtype, alignment)")
    types, as_dtype = kernelapi.types, kernelapi.numpy_support.as_dtype  # as the original
    lock = threading.Lock() if locked else contextlib.nullcontext()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:  # refused / dynamic shared memory: no race
            return original(self, shape, dtype, alignment)
        # Keyed like the original: (file, line) of the call to cuda.shared.array. Computed here,
        # as the original, called from this wrapper, would take this line for its caller.
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                if _race["delay"]:
                    time.sleep(_race["delay"])  # MINIRES_SIM_RACE_DELAY: force the race
                res = np.empty(shape, as_dtype(dtype) if isinstance(dtype, types.Type) else dtype)
                self._allocations[caller] = res
        return res

    setattr(array, _PATCHED, True)
    array.__doc__ = original.__doc__
    cls.array = array
    return cls


def _check(kernelapi, locked):
    """The installed replacement behaves like the original and, when locked, one line gives one
    array even when 8 threads race for it through a forced 2 ms window (about 3 ms)."""
    shared = kernelapi.FakeCUDAShared(16)
    again = [shared.array((3,), np.float32) for _ in range(2)]
    other = shared.array((2, 2), kernelapi.types.float64)
    assert again[0] is again[1] and again[0].shape == (3,), "one array per source line"
    assert other is not again[0] and other.dtype == np.float64, "another line, another array"
    assert len(shared.array(0, np.dtype(np.float32))) == 4, "dynamic shared memory"
    if not locked:
        return
    got, start = [], threading.Barrier(8)

    def thread():
        start.wait()
        got.append(shared.array((4,), np.float32))

    saved, _race["delay"] = _race["delay"], 0.002
    try:
        workers = [threading.Thread(target=thread) for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        _race["delay"] = saved
    assert len(got) == 8 and all(g is got[0] for g in got), "racing threads got different arrays"


def _install():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return  # the tests skip themselves: nothing to patch
    try:
        import numba.cuda  # noqa: F401  (the simulator, since NUMBA_ENABLE_CUDASIM=1)
    except ImportError:
        return  # no numba-cuda: the tests skip themselves (importorskip)
    try:
        kernelapi = importlib.import_module("numba.cuda.simulator.kernelapi")
        serialise_shared_arrays(kernelapi, LOCKED)
        _check(kernelapi, LOCKED)
    except (SimulatorChanged, ImportError, AttributeError, AssertionError, TypeError) as e:
        raise SimulatorChanged(
            f"tests/cuda_sim/conftest.py cannot make the CUDA simulator's shared arrays "
            f"race-free on this numba-cuda ({type(e).__name__}: {e}). Its internals changed: "
            "re-read FakeCUDAShared.array in numba/cuda/simulator/kernelapi.py and update or "
            "drop this patch (see this file's docstring).") from e


_install()
