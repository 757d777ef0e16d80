"""Memory and threads for the CPU kernels: a scratch pool, a recycler for big output arrays,
the launch lock and the thread count every parallel kernel is given.

Imports numpy and numba. Page faults are expensive on small VMs (PERF.md): a freshly allocated
3 MB array costs ~800 minor faults (1-3 ms) on first touch, more than the kernel that fills it.
"""
import collections
import contextlib
import math
import sys
import threading

import numba
import numpy as np


class Scratch:
    """A bounded pool of zero-initialised scratch arrays keyed by (role, shape, dtype).

    `borrow` hands out an array no other call is using (so concurrent Python threads never
    share one); `give_back` returns it. Arrays stay zero wherever kernels never write
    (padding), which is why a key must fully determine the written region.
    """

    def __init__(self, max_keys=48):
        self._lock = threading.Lock()
        self._free = collections.OrderedDict()  # key -> list of idle arrays, LRU order
        self.max_keys = max_keys

    def borrow(self, key, shape, dtype):
        with self._lock:
            idle = self._free.get(key)
            if idle:
                self._free.move_to_end(key)
                return idle.pop()
        return np.zeros(shape, dtype=dtype)

    def give_back(self, key, array):
        with self._lock:
            idle = self._free.setdefault(key, [])
            self._free.move_to_end(key)
            if len(idle) < 4:
                idle.append(array)
            while len(self._free) > self.max_keys:
                self._free.popitem(last=False)

    def keys(self):
        return len(self._free)

    def clear(self):
        """Drop every idle buffer (frees the memory)."""
        with self._lock:
            self._free.clear()


class Recycler:
    """`empty(shape, dtype)` for kernel outputs: a new array, or one this recycler made
    earlier that nothing references any more.

    An output stays the caller's as long as anything holds it (the caller, the autograd
    graph, a view of it): an array is handed out again only when the recycler's own list
    holds the last reference, which CPython's reference count tells exactly. So callers see
    fresh, unaliased arrays, but a training loop reuses the same memory every step instead of
    faulting in new pages. Arrays under `min_bytes` come from np.empty (malloc reuses them
    cheaply); at most `max_bytes` are kept. `enabled = False` turns it off.
    """

    def __init__(self, min_bytes=1 << 18, max_bytes=1 << 30, per_key=16):
        self._lock = threading.Lock()
        self._kept = collections.OrderedDict()  # (shape, dtype) -> [arrays], LRU order
        self._bytes = 0
        self.min_bytes, self.max_bytes, self.per_key = min_bytes, max_bytes, per_key
        self.enabled = True
        # The count an array has when only the list and the loop below hold it, measured
        # with the same code rather than assumed (interpreters differ in temporary references).
        self._free_refs = self._first_free([np.empty(0)], probe=True)

    @staticmethod
    def _first_free(kept, probe=False, free_refs=0):
        """The first array in `kept` nothing else references (probe: its reference count)."""
        for a in kept:
            refs = sys.getrefcount(a)
            if probe:
                return refs
            if refs <= free_refs:
                return a
        return None

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize  # (np.prod costs microseconds here)
        if not self.enabled or nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        key = (tuple(shape), dtype.str)
        with self._lock:
            kept = self._kept.setdefault(key, [])
            self._kept.move_to_end(key)
            a = self._first_free(kept, free_refs=self._free_refs)
            if a is not None:
                return a
            a = np.empty(shape, dtype)
            if len(kept) < self.per_key:
                kept.append(a)
                self._bytes += nbytes
                self._evict()
            return a

    def _evict(self):
        """Forget the least recently used shapes until within max_bytes (their arrays stay
        valid for whoever holds them; they are just never handed out again)."""
        while self._bytes > self.max_bytes and len(self._kept) > 1:
            _, arrays = self._kept.popitem(last=False)
            self._bytes -= sum(a.nbytes for a in arrays)

    def kept_bytes(self):
        return self._bytes

    def clear(self):
        """Forget every kept array (memory is freed once callers drop theirs)."""
        with self._lock:
            self._kept.clear()
            self._bytes = 0


scratch = Scratch()  # padded copies, grids, transforms, per-thread partial sums
outputs = Recycler()  # big output arrays, reused once nobody references them
# Numba's workqueue threading layer aborts the process when two Python threads launch
# parallel kernels at once; one lock makes every layer safe (the cores are shared anyway).
_launch_lock = threading.Lock()


def flat(a):
    """a as a flat C-contiguous array (a view when it already is contiguous)."""
    return np.ascontiguousarray(a).reshape(-1)


def threads():
    """Numba's thread count, passed into every parallel kernel (calling
    numba.get_num_threads() inside a kernel would make it uncacheable)."""
    return numba.get_num_threads()


def launch(kernel, *args):
    """Run one parallel @njit kernel under the launch lock."""
    with _launch_lock:
        kernel(*args)


@contextlib.contextmanager
def borrowed(specs, dtype):
    """`with borrowed([(key, shape), ...], dtype) as arrays:` scratch arrays for one call,
    returned to the pool on exit (read results out of them inside the block)."""
    keys = [(key, np.dtype(dtype).str) for key, _ in specs]  # the dtype is part of the key
    arrays = [scratch.borrow(k, shape, dtype) for k, (_, shape) in zip(keys, specs)]
    try:
        yield arrays
    finally:
        for k, a in zip(keys, arrays):
            scratch.give_back(k, a)
