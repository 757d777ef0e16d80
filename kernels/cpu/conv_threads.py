"""A team of Python threads that runs one @njit(nogil=True) function on every share of a
convolution's work: the calling thread runs share 0, sleeping worker threads the others.

Imports the standard library only. Why not a prange kernel: Numba compiles a parallel
function's parfor in 2-3 s per dtype even when its body is one call (a third of the conv
kernels' cold start); a nogil function called from several Python threads runs on several
cores just the same. The workers block on a condition variable between calls (no spinning:
they cost nothing while the other kernels' thread pool runs), and one lock serialises callers
from different Python threads (each call uses every thread anyway). A forked child starts a
fresh team.
"""
import os
import threading


class Team:
    """`run(fn, args, n)`: fn(*args, share, n) for share = 0..n-1 at once, share 0 on the
    calling thread; returns when all are done and re-raises the first exception."""

    def __init__(self):
        self._lock = threading.Lock()  # one call at a time
        self._cond = threading.Condition()
        self._workers = []  # worker k runs share k + 1
        self._job, self._round, self._pending, self._error = None, 0, 0, None

    def run(self, fn, args, n):
        if n <= 1:
            fn(*args, 0, 1)
            return
        with self._lock:
            while len(self._workers) < n - 1:
                k = len(self._workers)
                t = threading.Thread(target=self._work, args=(k + 1,), daemon=True,
                                     name=f"minires-conv-{k + 1}")
                self._workers.append(t)
                t.start()
            with self._cond:
                self._job, self._pending, self._error = (fn, args, n), n - 1, None
                self._round += 1
                self._cond.notify_all()
            try:
                fn(*args, 0, n)
            finally:
                with self._cond:
                    while self._pending:
                        self._cond.wait()
                    self._job, error = None, self._error
            if error is not None:
                raise error

    def _work(self, share):
        seen = 0
        while True:
            with self._cond:
                while self._round == seen:
                    self._cond.wait()
                seen = self._round
                job = self._job
            if job is None or share >= job[2]:  # this round needs fewer threads
                continue
            fn, args, n = job
            try:
                fn(*args, share, n)
            except BaseException as e:  # handed to the caller
                with self._cond:
                    self._error = self._error or e
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()


team = Team()


def _forget_workers():
    """In a forked child only the forking thread exists: start a fresh team (new workers are
    made on demand; the parent's locks may have been held at the fork)."""
    Team.__init__(team)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)
