"""Per-op profiler: wall time of every Function's forward and backward, backend, output bytes.

Imports minires.tensor (observer hook), minires.backend and minires.ops (kernel backend names).
"""
import collections
import contextlib
import itertools
import json
import sys
import time
import types
import weakref

from minires import backend, ops
from minires.tensor import set_observer

Event = collections.namedtuple("Event", "name phase start_ns dur_ns backend bytes_out op_id")
Event.__doc__ = ("One Function call: name (class), phase ('forward' | 'backward'), start and "
                 "duration in ns (perf_counter_ns), backend, bytes of new output arrays, op_id "
                 "(pairs a forward with its backward).")


def _array_backend(f, array):
    """'numba-cpu' / 'numba-cuda' / 'reference' for kernel ops, else 'numpy' / 'cupy'."""
    if f.uses_kernels:
        return ops.kernel_backend(array)
    return "cupy" if backend.is_cupy_array(array) else "numpy"


def _root(a):
    while getattr(a, "base", None) is not None:
        a = a.base
    return a


def _new_bytes(out, sources):
    """Bytes of the arrays in `out` that own new memory: views of `sources` (Reshape's
    output, a gradient passed through unchanged) allocate nothing and count 0."""
    taken = {id(_root(a)) for a in sources}
    arrays = out if isinstance(out, tuple) else (out,)
    return sum(int(a.nbytes) for a in arrays
               if hasattr(a, "nbytes") and id(_root(a)) not in taken)


class Profiler:
    """Records an Event per Function forward and backward while active (see `profile()`).

    It is the tensor module's op observer: it wraps each call, times it (synchronising the
    GPU before and after, so queued work is charged to the right op) and keeps names and
    numbers only, never a Function or an array, so graphs are freed exactly as without it.
    Profilers nest: an inner one passes calls through to the outer one, and exiting restores
    the observer that was installed before.
    """

    def __init__(self, sync=True):
        self.sync = sync
        self.events = []
        self._previous = None
        self._ids = weakref.WeakKeyDictionary()  # Function -> op_id, without keeping it alive
        self._next_id = itertools.count()
        self._active = False

    # --- context manager ------------------------------------------------------------------
    def __enter__(self):
        if self._active:
            raise RuntimeError("profile: this profiler is already active")
        self._previous = set_observer(self)
        self._active = True
        return self

    def __exit__(self, *exc):
        self._active = False
        set_observer(self._previous)
        self._previous = None
        return False

    # --- observer interface (called by Function.__call__ and the backward engine) -----------
    def forward(self, f, arrays):
        device = backend.device_of(arrays[0]) if arrays else "cpu"
        start = self._now(device)
        prev = self._previous
        y = f.forward(*arrays) if prev is None else prev.forward(f, arrays)
        dur = self._now(device) - start
        op_id = self._ids.setdefault(f, next(self._next_id))
        kind = _array_backend(f, arrays[0]) if arrays else "numpy"
        self.events.append(Event(type(f).__name__, "forward", start, dur, kind,
                                 _new_bytes(y, arrays), op_id))
        return y

    def backward(self, f, gy):
        device = backend.device_of(gy)
        start = self._now(device)
        prev = self._previous
        gxs = f.backward(gy) if prev is None else prev.backward(f, gy)
        dur = self._now(device) - start
        op_id = self._ids.get(f, -1)  # -1: the forward ran before profiling started
        self.events.append(Event(type(f).__name__, "backward", start, dur,
                                 _array_backend(f, gy), _new_bytes(gxs, (gy,)), op_id))
        return gxs

    def _now(self, device):
        if self.sync and device == "cuda":
            backend.synchronize(device)
        return time.perf_counter_ns()

    # --- reports --------------------------------------------------------------------------
    def stats(self):
        """One dict per op name, sorted by total time (descending): op, calls (forward),
        backward_calls, forward_ms, backward_ms, total_ms, mean_ms (total per forward call),
        percent (of all ops' time), backend, mb_out (forward outputs, summed over calls)."""
        rows = {}
        for e in self.events:
            r = rows.setdefault(e.name, dict(op=e.name, calls=0, backward_calls=0,
                                             forward_ms=0.0, backward_ms=0.0, backends=set(),
                                             mb_out=0.0))
            ms = e.dur_ns / 1e6
            if e.phase == "forward":
                r["calls"] += 1
                r["forward_ms"] += ms
                r["mb_out"] += e.bytes_out / 2**20
            else:
                r["backward_calls"] += 1
                r["backward_ms"] += ms
            r["backends"].add(e.backend)
        total = sum(r["forward_ms"] + r["backward_ms"] for r in rows.values()) or 1.0
        for r in rows.values():
            r["total_ms"] = r["forward_ms"] + r["backward_ms"]
            r["mean_ms"] = r["total_ms"] / max(r["calls"], 1)
            r["percent"] = 100.0 * r["total_ms"] / total
            r["backend"] = "/".join(sorted(r.pop("backends")))
        return sorted(rows.values(), key=lambda r: (-r["total_ms"], r["op"]))

    def table(self):
        """The per-op summary as aligned text, slowest op first, with a total line."""
        head = ("op", "calls", "fwd ms", "bwd ms", "total ms", "mean ms", "%", "backend",
                "MB out")
        stats = self.stats()
        rows = [(r["op"], str(r["calls"]), f"{r['forward_ms']:.2f}", f"{r['backward_ms']:.2f}",
                 f"{r['total_ms']:.2f}", f"{r['mean_ms']:.3f}", f"{r['percent']:.1f}",
                 r["backend"], f"{r['mb_out']:.1f}") for r in stats]
        rows.append(("total", str(sum(r["calls"] for r in stats)),
                     f"{sum(r['forward_ms'] for r in stats):.2f}",
                     f"{sum(r['backward_ms'] for r in stats):.2f}",
                     f"{sum(r['total_ms'] for r in stats):.2f}", "", "100.0" if stats else "0.0",
                     "", f"{sum(r['mb_out'] for r in stats):.1f}"))
        widths = [max(len(r[c]) for r in rows + [head]) for c in range(len(head))]
        line = "  ".join("{:<%d}" % w if c in (0, 7) else "{:>%d}" % w
                         for c, w in enumerate(widths))
        return "\n".join(line.format(*r).rstrip() for r in [head] + rows)

    def to_chrome_trace(self, path):
        """Write the events as Chrome trace-event JSON (open in chrome://tracing or
        https://ui.perfetto.dev): forward ops on thread 1, backward ops on thread 2."""
        t0 = min((e.start_ns for e in self.events), default=0)
        trace = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid,
                  "args": {"name": phase}} for phase, tid in (("forward", 1), ("backward", 2))]
        for e in self.events:
            trace.append({"name": e.name, "cat": e.phase, "ph": "X", "pid": 1,
                          "tid": 1 if e.phase == "forward" else 2,
                          "ts": (e.start_ns - t0) / 1e3, "dur": e.dur_ns / 1e3,
                          "args": {"backend": e.backend, "bytes_out": e.bytes_out,
                                   "op_id": e.op_id}})
        with open(path, "w") as fh:
            json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, fh)
        return path


def profile(sync=True):
    """`with profile() as prof:` records every op run inside; then `print(prof.table())`,
    `prof.to_chrome_trace("trace.json")` or read `prof.events`. Outside the block the
    observer hook is back to what it was (None: no timing calls at all). `sync=False` skips
    the GPU synchronisation (times then show launch cost only)."""
    return Profiler(sync=sync)


def profile_steps(step_fn, n, warmup=1, trace=None, device="cpu", file=sys.stdout):
    """Run step_fn() `warmup` times unprofiled (JIT compilation, allocator warm-up), then n
    times under a profiler; print the per-op table and the mean step time to `file`, write a
    Chrome trace to `trace` if given, and return the Profiler.

    For `minires train --profile N`: step_fn runs one training step (forward, backward,
    optimizer update) on the next batch.
    """
    if n < 1:
        raise ValueError(f"profile_steps: n must be >= 1, got {n}")
    for _ in range(warmup):
        step_fn()
    with profile() as prof, _stopwatch(device) as clock:
        for _ in range(n):
            step_fn()
    op_ms = sum(r["total_ms"] for r in prof.stats())
    print(prof.table(), file=file)
    print(f"{n} steps: {clock.ms / n:.2f} ms per step, {op_ms / n:.2f} ms in ops "
          f"({100 * op_ms / max(clock.ms, 1e-9):.0f}%; the rest is Python, optimizer and "
          f"profiler overhead)", file=file)
    if trace is not None:
        prof.to_chrome_trace(trace)
        print(f"Chrome trace written to {trace} (open in https://ui.perfetto.dev)", file=file)
    return prof


@contextlib.contextmanager
def _stopwatch(device):
    """Elapsed wall time of the block in ms (.ms), GPU synchronised at both ends."""
    clock = types.SimpleNamespace(ms=0.0)
    backend.synchronize(device)
    start = time.perf_counter()
    try:
        yield clock
    finally:
        backend.synchronize(device)
        clock.ms = (time.perf_counter() - start) * 1e3
