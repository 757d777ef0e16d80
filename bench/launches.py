"""`python -m bench launches`: GPU kernel launches per training step of the seed net, the step
`minires train` runs (minires.train.train_step: the batch's host-to-device copy, forward,
cross-entropy, backward, the one-copy step summary, SGD with Nesterov momentum, the one-cycle
schedule), by kind. The count does not depend on the batch size or the channel count: grids
grow with them, launches do not.

Two ways to count:
- `--device cuda` (a GPU): minires's numba.cuda launches from kernels.cuda's counter (exact);
  every kernel the process ran (minires's, CuPy's, cuBLAS's) and every memcpy/memset from CUPTI
  through torch.profiler, when this PyTorch has CUDA (exact); without it CuPy's kernels are
  not counted (said so).
- `--simulate` (no GPU needed; re-runs itself with NUMBA_ENABLE_CUDASIM=1): the same `--device
  cuda` code path of minires, its kernels under Numba's CUDA simulator (counted as on a GPU),
  CuPy replaced by bench._simcupy, which counts the operations CuPy would launch as kernels (an
  estimate, see there). Batch 2 and 2 channels, to keep the simulator quick.

Both optimizer paths are counted: the multi-tensor SGD update (minires's default on the GPU)
and the per-tensor update (kernels.sgd_update switched off: the count before issue 17).

Imports numpy, minires, bench.common (bench._simcupy with --simulate; torch when present).
"""
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

SIM_BATCH, SIM_CHANNELS = 1, 1
CUPTI_STEPS = 3  # steps profiled on a GPU (the count is their mean)


def _step_fn(device, channels, batch):
    """One closure running `minires train`'s training step on a fixed random batch, which is
    copied to the device every step as the DataLoader does."""
    from minires import backend, cli, models, train
    rng = np.random.default_rng(0)
    model = models.seed_net(channels, rng=0, track_grad_norms=True).to(device)
    cfg = dict(cli.DEFAULTS, lr=cli.DEFAULT_LR["sgd"])
    opt = cli.make_optimizer(cfg, model.parameters())
    sched = cli.make_schedule(cfg, opt, 1000)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch)

    def step():
        train.train_step(model, backend.to_device(x, device), backend.to_device(y, device),
                         opt, sched)
    return step


@contextlib.contextmanager
def _per_tensor_optimizer(enabled):
    """Inside: kernels.sgd_update declines, so optim.SGD updates tensor by tensor."""
    from minires import kernels
    if not enabled:
        yield
        return
    saved = kernels.sgd_update
    kernels.sgd_update = lambda *args, **kwargs: False
    try:
        yield
    finally:
        kernels.sgd_update = saved


def _source(name):
    """minires / cupy / cublas / other, from a CUDA kernel's (mangled) name."""
    from minires.kernels import cuda
    ours = {cuda._device.kernel_name(k) for k in cuda.KERNELS}
    if any(k in name for k in ours):
        return "minires"
    if name.startswith("cupy_") or "cupy" in name:
        return "cupy"
    low = name.lower()
    if any(k in low for k in ("gemm", "cublas", "cutlass", "xmma", "splitk", "gemv")):
        return "cublas"
    return "other"


def _cupti(step, torch, sync):
    """{'kernels', 'memcpy', 'memset', 'by_source'} per step from a torch.profiler (CUPTI) trace
    of CUPTI_STEPS steps; None when this torch cannot profile CUDA."""
    if torch is None or not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile
    with tempfile.TemporaryDirectory(prefix="bench-launches-") as d:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(CUPTI_STEPS):
                step()
            sync()
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    return summarize_trace(events, CUPTI_STEPS)


def summarize_trace(events, steps):
    """Per-step counts of a Chrome trace's GPU events (torch.profiler's CUPTI categories
    'kernel', 'gpu_memcpy', 'gpu_memset'), kernels by source."""
    cats = collections.Counter(e.get("cat") for e in events)
    kernels = [e.get("name", "") for e in events if e.get("cat") == "kernel"]
    by = collections.Counter(_source(n) for n in kernels)
    return {"kernels": len(kernels) / steps,
            "memcpy": cats.get("gpu_memcpy", 0) / steps,
            "memset": cats.get("gpu_memset", 0) / steps,
            "by_source": {k: v / steps for k, v in sorted(by.items())}}


def count(device, channels, batch, per_tensor, torch=None, sync=None, simulated=False):
    """Launches of one steady-state training step (the second one: the first compiles and
    makes the momentum buffers): a dict for the report."""
    from minires.kernels import cuda
    sync = sync or (lambda: None)
    sim = None
    if simulated:
        from bench import _simcupy as sim
    with _per_tensor_optimizer(per_tensor):
        step = _step_fn(device, channels, batch)
        step()  # the first step compiles and makes the momentum buffers
        sync()
        cuda.reset_launch_counts()
        if sim is not None:
            sim.clear()
        step()
        sync()
        ours = cuda.launch_counts()
        cupy = dict(sim.COUNTS) if sim is not None else None
        detail = dict(sorted(sim.DETAIL.items())) if sim is not None else None
        cupti = None if simulated else _cupti(step, torch, sync)
    result = {"optimizer": "per-tensor" if per_tensor else "multi-tensor",
              "minires_launches": sum(ours.values()), "minires_kernels": dict(sorted(
                  ours.items()))}
    if cupy is not None:
        copies = {k: cupy.pop(k) for k in ("h2d", "d2h") if k in cupy}
        result.update(cupy_estimated=sum(cupy.values()), cupy_by_kind=dict(sorted(
            cupy.items())), transfers=copies, cupy_by_operation=detail)
        result["launches_per_step"] = result["minires_launches"] + result["cupy_estimated"]
        result["how"] = "minires counted, CuPy estimated (bench/_simcupy.py)"
    elif cupti is not None and cupti["kernels"] >= result["minires_launches"] > 0:
        result.update(cupti=cupti, launches_per_step=cupti["kernels"],
                      how="CUPTI (torch.profiler): every kernel of the step")
    else:
        result.update(cupti=cupti, launches_per_step=None,
                      how="minires counted; CuPy's kernels not counted (no CUDA PyTorch/CUPTI)"
                      if cupti is None else "CUPTI saw fewer kernels than minires launched: "
                      "trace incomplete, not used")
    return result


def measure(device="cuda", torch=None, sync=None, simulated=False):
    """Both optimizer paths; the report dict."""
    channels, batch = (SIM_CHANNELS, SIM_BATCH) if simulated else (16, 64)
    from minires import backend
    rows = [count(device, channels, batch, per_tensor, torch, sync, simulated)
            for per_tensor in (False, True)]
    return {"command": "launches", "mode": "simulator" if simulated else "gpu",
            "gpu": None if simulated else backend.gpu_name(), "batch": batch,
            "channels": channels, "model": "seed net, as `minires train` (SGD Nesterov, "
            "one-cycle)", "rows": rows}


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.1f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def print_report(report):
    rows = report["rows"]
    print(f"kernel launches per training step: {report['model']}; {report['mode']}"
          f"{' (' + report['gpu'] + ')' if report['gpu'] else ''}, batch {report['batch']}, "
          f"{report['channels']} channels (the count does not depend on either)")
    lines = [("optimizer update", [r["optimizer"] for r in rows]),
             ("minires numba.cuda launches", [r["minires_launches"] for r in rows])]
    if "cupy_estimated" in rows[0]:
        kinds = sorted({k for r in rows for k in r["cupy_by_kind"]})
        lines.append(("CuPy launches (estimated)", [r["cupy_estimated"] for r in rows]))
        lines += [(f"  {k}", [r["cupy_by_kind"].get(k, 0) for r in rows]) for k in kinds]
        lines.append(("host<->device copies", [sum(r["transfers"].values()) for r in rows]))
    elif rows[0].get("cupti"):
        srcs = sorted({k for r in rows for k in r["cupti"]["by_source"]})
        lines.append(("all kernels (CUPTI)", [r["cupti"]["kernels"] for r in rows]))
        lines += [(f"  {k}", [r["cupti"]["by_source"].get(k, 0) for r in rows]) for k in srcs]
        lines.append(("memcpy / memset", [f"{_fmt(r['cupti']['memcpy'])} / "
                                          f"{_fmt(r['cupti']['memset'])}" for r in rows]))
    lines.append(("launches per step", [r["launches_per_step"] for r in rows]))
    width = max(len(k) for k, _ in lines)
    for k, values in lines:
        print(f"{k:<{width}}  " + "  ".join(f"{_fmt(v):>14}" for v in values))
    print(f"counted: {rows[0]['how']}")
    for r in rows[:1]:
        print("minires kernels: " + ", ".join(f"{k} {v}" for k, v in
                                              r["minires_kernels"].items()))


def run(args, xp, torch, tdev, sync):
    """`python -m bench launches --device cuda` on a GPU."""
    _print(measure("cuda", torch, sync or (lambda: None)), args.json)
    return 0


def _print(report, as_json):
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report)


def run_simulated(args):
    """`python -m bench launches --simulate`: in this process when NUMBA_ENABLE_CUDASIM=1 is
    set, else in a child process with it set."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        argv = ["launches", "--simulate"] + (["--json"] if args.json else [])
        return subprocess.call([sys.executable, "-m", "bench", *argv], env=env)
    from minires.kernels import cuda
    if not cuda.SIMULATOR:
        print("python -m bench launches: error: NUMBA_ENABLE_CUDASIM=1 is set but numba.cuda "
              "is not simulating", file=sys.stderr)
        return 2
    interval = sys.getswitchinterval()
    # The simulator's block manager polls its threads: a 0.1 ms switch interval instead of
    # 5 ms makes it several times quicker (as tests/cuda_sim does).
    sys.setswitchinterval(1e-4)
    try:
        with simulated_device(cuda):
            report = measure("cuda", simulated=True)
    finally:
        sys.setswitchinterval(interval)
    _print(report, args.json)
    return 0


@contextlib.contextmanager
def simulated_device(cuda):
    """Inside: bench._simcupy stands in for CuPy (minires sees a GPU), and minires.kernels
    dispatches the stand-in's arrays (NumPy arrays underneath) to kernels.cuda under the
    simulator, through its table of loaded backends (kernels._loaded: the stand-in's arrays
    are host arrays to it)."""
    from bench import _simcupy
    from minires import kernels
    saved = dict(kernels._loaded)
    kernels._loaded["cpu"] = (_SimKernels(cuda), "numba-cuda (simulator)")
    try:
        with _simcupy.fake_cupy():
            yield
    finally:
        kernels._loaded.clear()
        kernels._loaded.update(saved)


class _SimKernels:
    """kernels.cuda's functions for bench._simcupy arrays: plain NumPy arrays in (the
    simulator's kind), simulated device arrays out."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        from bench import _simcupy
        fn = getattr(self.module, name)

        def call(*args, **kwargs):
            return _simcupy.wrap(fn(*_simcupy._plain(args), **_simcupy._plain(kwargs)))
        return call
