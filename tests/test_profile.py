"""minires.profile: per-op call counts, no graph references, nesting, Chrome trace, off state."""
import gc
import importlib
import inspect
import io
import json
import pkgutil
import weakref

import numpy as np
import pytest

import minires
import minires.ops as F
from minires import models, nn
from minires.profile import Profiler, profile, profile_steps
from minires.tensor import Function, Parameter

T = importlib.import_module("minires.tensor")  # the module (minires.tensor is the function)
SEED_OPS = {"Conv2d": 5, "ReLU": 5, "MaxPool2d": 2, "ResidualAdd": 1, "Reshape": 1,
            "Linear": 1, "CrossEntropy": 1}


@pytest.fixture(autouse=True)
def one_op_per_layer(monkeypatch):
    """The graphs here count one op per layer: nn.Sequential's conv + ReLU fusion is off
    (tests/test_conv_fusion.py covers the fused models)."""
    monkeypatch.setattr(nn.Sequential, "fuse", False)


def counts(prof, phase):
    out = {}
    for e in prof.events:
        if e.phase == phase:
            out[e.name] = out.get(e.name, 0) + 1
    return out


def small_graph(xp, rng):
    """loss = sum(relu(linear(x, w, b))) with w and b Parameters, on xp's device."""
    device = "cuda" if xp is not np else "cpu"
    x = minires.tensor(rng.standard_normal((2, 3)).astype(np.float32), device=device)
    w = Parameter(rng.standard_normal((4, 3)).astype(np.float32), device=device)
    b = Parameter(rng.standard_normal(4).astype(np.float32), device=device)
    return F.sum(F.relu(F.linear(x, w, b)))


def test_call_counts_backend_and_bytes(xp, rng):
    with profile() as prof:
        loss = small_graph(xp, rng)
        with minires.no_grad():
            F.exp(loss)  # forward only
        loss.backward()
    assert counts(prof, "forward") == {"Linear": 1, "ReLU": 1, "Sum": 1, "Exp": 1}
    assert counts(prof, "backward") == {"Linear": 1, "ReLU": 1, "Sum": 1}
    by_name = {(e.name, e.phase): e for e in prof.events}
    array_kind = "numpy" if xp is np else "cupy"
    assert by_name["Linear", "forward"].backend == array_kind
    assert by_name["ReLU", "forward"].backend == F.kernel_backend(loss.data)
    assert by_name["Linear", "forward"].bytes_out == 2 * 4 * 4  # (2, 4) float32
    assert by_name["Linear", "backward"].bytes_out == (4 * 3 + 4) * 4  # gw and gb; gx None
    assert by_name["Sum", "forward"].bytes_out == 4
    pairs = {(e.name, e.op_id) for e in prof.events if e.phase == "backward"}
    assert pairs == {(e.name, e.op_id) for e in prof.events
                     if e.phase == "forward" and e.name != "Exp"}
    assert all(e.dur_ns >= 0 for e in prof.events)


def test_kernel_ops_say_so_themselves():
    """The profiler names the kernel backend of exactly the ops whose Function class sets
    `uses_kernels`: those whose code calls minires.kernels (read from the source)."""
    flagged, calling = set(), set()
    for info in pkgutil.iter_modules(F.__path__):
        module = importlib.import_module(f"minires.ops.{info.name}")
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, Function) and cls.__module__ == \
                    module.__name__:
                flagged |= {cls.__name__} if cls.uses_kernels else set()
                calling |= {cls.__name__} if "kernels." in inspect.getsource(cls) else set()
    assert flagged == calling and {"Conv2d", "ReLU", "MaxPool2d", "ResidualAdd"} <= flagged


def test_view_outputs_allocate_nothing(rng):
    x = minires.tensor(rng.standard_normal((2, 6)), requires_grad=True)
    with profile() as prof:
        F.sum(F.reshape(x, (3, 4))).backward()
    by_name = {(e.name, e.phase): e.bytes_out for e in prof.events}
    assert by_name["Reshape", "forward"] == 0 and by_name["Reshape", "backward"] == 0
    assert by_name["Sum", "backward"] == 12 * 8  # a new (3, 4) float64 gradient


def test_seed_net_step_counts(rng):
    model = models.seed_net()
    x = minires.tensor(rng.standard_normal((2, 1, 28, 28)).astype(np.float32))
    with profile() as prof:
        F.cross_entropy(model(x), rng.integers(0, 10, 2)).backward()
    assert counts(prof, "forward") == SEED_OPS == counts(prof, "backward")
    rows = {r["op"]: r for r in prof.stats()}
    assert {op: (r["calls"], r["backward_calls"]) for op, r in rows.items()} == {
        op: (n, n) for op, n in SEED_OPS.items()}
    totals = [r["total_ms"] for r in prof.stats()]
    assert totals == sorted(totals, reverse=True)
    assert sum(r["percent"] for r in rows.values()) == pytest.approx(100.0)
    conv = rows["Conv2d"]
    ms = [e.dur_ns / 1e6 for e in prof.events if e.name == "Conv2d"]
    assert conv["total_ms"] == pytest.approx(sum(ms))
    assert conv["mean_ms"] == pytest.approx(sum(ms) / 5)
    assert conv["mb_out"] == pytest.approx(2 * 16 * (3 * 28 * 28 + 2 * 7 * 7) * 4 / 2**20)
    table = prof.table().splitlines()
    assert table[0].split() == ["op", "calls", "fwd", "ms", "bwd", "ms", "total", "ms", "mean",
                                "ms", "%", "backend", "MB", "out"]
    assert [line.split()[:2] for line in table[1:-1]] == [
        [r["op"], str(r["calls"])] for r in prof.stats()]
    assert table[-1].split()[:2] == ["total", "16"]


def test_profiler_holds_no_graph_references(rng):
    x = Parameter(rng.standard_normal((3, 4)))
    with profile() as prof:
        h = F.relu(x * 2.0)
        relu = weakref.ref(h.creator)
        loss = F.sum(h)
        del h
        loss.backward()  # frees the graph: nothing but the profiler could keep ReLU alive
        assert relu() is None
        out = weakref.ref(loss.creator)
        del loss
        assert out() is None
    assert len(prof.events) == 6
    gc.collect()


def test_nesting_restores_previous_observer(rng):
    x = minires.tensor(rng.standard_normal(3), requires_grad=True)
    assert T._observer is None
    with profile() as outer:
        F.exp(x)
        with profile() as inner:
            assert T._observer is inner
            F.log(F.exp(x))
        assert T._observer is outer
        F.neg(x)
    assert T._observer is None
    assert [e.name for e in inner.events] == ["Exp", "Log"]
    assert [e.name for e in outer.events] == ["Exp", "Exp", "Log", "Neg"]  # sees inner's ops


def test_observer_removed_after_error(rng):
    with pytest.raises(ValueError, match="conv2d"):
        with profile():
            F.conv2d(np.zeros((1, 2, 5, 5)), np.zeros((3, 1, 3, 3)))
    assert T._observer is None
    prof = Profiler()
    with prof:
        with pytest.raises(RuntimeError, match="already active"):
            prof.__enter__()


def test_chrome_trace_is_valid_json(tmp_path, rng):
    with profile() as prof:
        small_graph(np, rng).backward()
    path = prof.to_chrome_trace(tmp_path / "trace.json")
    trace = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    assert len(spans) == len(prof.events) == 6
    assert [(s["name"], s["cat"]) for s in spans] == [(e.name, e.phase) for e in prof.events]
    assert {s["tid"] for s in spans if s["cat"] == "forward"} == {1}
    assert {s["tid"] for s in spans if s["cat"] == "backward"} == {2}
    assert min(s["ts"] for s in spans) == 0
    assert [s["dur"] for s in spans] == [e.dur_ns / 1e3 for e in prof.events]
    assert [m["args"]["name"] for m in trace if m["ph"] == "M"] == ["forward", "backward"]


def test_profile_steps(rng):
    calls = []

    def step():
        calls.append(1)
        F.sum(F.relu(minires.tensor(rng.standard_normal(4), requires_grad=True))).backward()

    out = io.StringIO()
    prof = profile_steps(step, 2, warmup=1, file=out)
    assert len(calls) == 3 and counts(prof, "forward") == {"ReLU": 2, "Sum": 2}
    text = out.getvalue()
    assert text.startswith("op") and "2 steps:" in text and "ms per step" in text
    assert T._observer is None
    with pytest.raises(ValueError, match="profile_steps: n must be >= 1"):
        profile_steps(step, 0)


def test_off_state_is_free(rng):
    assert T._observer is None
    x = minires.tensor(rng.standard_normal(3), requires_grad=True)
    prof = profile()
    F.sum(x * x).backward()  # not entered: records nothing
    assert prof.events == [] and T._observer is None
