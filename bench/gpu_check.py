"""`python -m bench gpu-check --out DIR [--dry-run]`: the whole GPU check of minires in one
command, for a GPU machine lent for a few minutes (no network, nothing installed from the
checkout: run it from a plain copy with PYTHONPATH=.).

Stages, in order, each in its own subprocess with its own time limit (a hang costs that stage
only), printed as they run (every line prefixed with the stage's name) and logged to
DIR/<stage>.log:

  tests      python -m pytest -m gpu tests/            the gpu-marked tests
  gradcheck  python -m minires gradcheck --device cuda every op and layer, float64 on the GPU
  train      python -m minires train --device cuda     one epoch; test accuracy must be >= 98%
  kernels    python -m bench --device cuda             kernel table against PyTorch, same GPU
  launches   python -m bench launches --device cuda    kernel launches per training step
  epoch      python -m bench epoch --device cuda       one epoch beside PyTorch eager

DIR/summary.json and DIR/summary.md (rewritten after every stage, so a killed run still leaves
them): per stage status (pass / fail / skip / timeout), seconds, key figures, the last output
lines on failure; the GPU's name and the versions of python, numpy, numba, numba-cuda, cupy and
torch. DIR/train holds the training run. The budgets sum to STAGE_BUDGET_S (< 8 minutes);
no stage runs past --total seconds. Exit code 0 when no stage failed or timed out.

--dry-run runs the same plumbing without a GPU: each stage runs its CPU or simulator
counterpart on tiny inputs (gpu tests skip themselves; two CUDA-simulator tests; gradcheck on
the CPU; `train --limit 256`; the kernel table at batch 8, one rep; launches under the CUDA
simulator; `epoch --steps 2 --no-torch`) and the same two files are written.

Imports only the standard library (the stages import minires, cupy, torch, in children).
"""
import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time

from bench.gpu_check_parse import (json_lines, parse_epoch, parse_gradcheck, parse_kernels,
                                   parse_launches, parse_pytest, parse_train)

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # minires.data.FILES
TAIL_LINES = 40  # output lines kept in the summary of a failed stage
ECHO_CHARS = 240  # longer lines (JSON) are cut on the console; the log keeps them whole

Stage = collections.namedtuple("Stage", "name title budget real dry parse needs_data")


def _py(*args):
    return [sys.executable, *args]


# (name, title, budget s, real command, dry-run command, parser, needs MNIST). Budgets: H100,
# numba-cuda compiling every kernel on first use (Numba's cache serves the later stages).
# They sum to STAGE_BUDGET_S.
def stages(out):
    train_out = str(out / "train")
    return [
        Stage("tests", "gpu-marked tests", 120,
              _py("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"),
              _py("-m", "pytest", "-q", "-m", "gpu or cuda", "-p", "no:cacheprovider",
                  "-k", "launch_counter or mixed_fresh or cuda_multi_tensor",
                  "tests/test_optim.py", "tests/cuda_sim/test_sim_launches.py"),
              parse_pytest, False),
        Stage("gradcheck", "minires gradcheck --device cuda", 50,
              _py("-m", "minires", "gradcheck", "--device", "cuda"),
              _py("-m", "minires", "gradcheck", "--device", "cpu"),
              parse_gradcheck, False),
        Stage("train", "one epoch of minires train --device cuda", 80,
              _py("-m", "minires", "train", "--device", "cuda", "--epochs", "1",
                  "--out", train_out),
              _py("-m", "minires", "train", "--device", "cpu", "--limit", "256",
                  "--out", train_out),
              parse_train, True),
        Stage("kernels", "kernel table against PyTorch (python -m bench --device cuda)", 50,
              _py("-m", "bench", "--device", "cuda", "--json"),
              _py("-m", "bench", "--batch", "8", "--reps", "1", "--rounds", "1", "--json"),
              parse_kernels, False),
        Stage("launches", "kernel launches per training step (python -m bench launches)", 30,
              _py("-m", "bench", "launches", "--device", "cuda", "--json"),
              _py("-m", "bench", "launches", "--simulate", "--json"),
              parse_launches, False),
        Stage("epoch", "one epoch beside PyTorch eager (python -m bench epoch)", 110,
              _py("-m", "bench", "epoch", "--device", "cuda", "--rounds", "1", "--json"),
              _py("-m", "bench", "epoch", "--steps", "2", "--no-torch", "--rounds", "1",
                  "--test-limit", "500", "--json"),
              parse_epoch, True),
    ]


STAGE_BUDGET_S = 440  # sum of the budgets above (checked by a test): < 8 minutes
TOTAL_S = 470  # no stage starts, or runs, past this many seconds from the start
DRY_SLACK = 2  # --dry-run: limits x2 (a busy CPU-only machine; the budgets are for a GPU)


# --- running a stage ------------------------------------------------------------------------
def _echo(name, line):
    line = line.rstrip("\n")
    if len(line) > ECHO_CHARS:
        line = line[:ECHO_CHARS] + f" ... ({len(line)} chars, whole in {name}.log)"
    print(f"[{name}] {line}", flush=True)


def run_command(name, cmd, limit, env, log_path):
    """Run cmd (cwd: the checkout) for at most `limit` s, echoing and logging its output;
    (return code or None on timeout, seconds, full output)."""
    t0 = time.perf_counter()
    lines = []
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    start_new_session=True)
        except OSError as err:
            log.write(f"could not start: {err}\n")
            return -1, time.perf_counter() - t0, f"could not start: {err}"

        def pump():
            for line in proc.stdout:
                lines.append(line)
                log.write(line)
                log.flush()
                _echo(name, line)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            rc = None
            _kill(proc)
        reader.join(timeout=10)
        seconds = time.perf_counter() - t0
        log.write(f"\n[exit {'timeout' if rc is None else rc} after {seconds:.1f} s]\n")
    return rc, seconds, "".join(lines)


def _kill(proc):
    """End the stage's process group (the stage and any child it started), SIGTERM first."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage, dry, limit, env, out):
    """One stage: its record for the summary."""
    cmd = stage.dry if dry else stage.real
    record = {"name": stage.name, "title": stage.title, "command": shlex.join(
        [("python" if c == sys.executable else c) for c in cmd]), "budget_s": stage.budget,
        "limit_s": round(limit), "log": f"{stage.name}.log"}
    data = env.get("MINIRES_DATA", "")
    if stage.needs_data and not all((pathlib.Path(data) / f).exists() for f in MNIST_FILES):
        status = "skip" if dry else "fail"
        record.update(status=status, seconds=0.0, figures={}, note=(
            f"MNIST files not found in {data or '(MINIRES_DATA unset)'}: copy the four .gz "
            f"files to data/mnist/ in the checkout or pass --data DIR"))
        print(f"[{stage.name}] {status}: {record['note']}", flush=True)
        return record
    if limit < 1:
        record.update(status="skip", seconds=0.0, figures={},
                      note="not started: the run's total time limit was reached")
        print(f"[{stage.name}] skip: {record['note']}", flush=True)
        return record
    print(f"\n== {stage.name}: {stage.title} (limit {limit:.0f} s)\n$ {record['command']}",
          flush=True)
    env = dict(env, **(stage_env(stage.name, dry)))
    rc, seconds, text = run_command(stage.name, cmd, limit, env, out / record["log"])
    try:
        status, figures, note = stage.parse(text, rc if rc is not None else -9, dry)
    except Exception as err:  # a parser bug must not end the check: report it
        status, figures, note = None, {}, f"could not read the output ({type(err).__name__}: " \
                                          f"{err})"
    if rc is None:
        status = "timeout"
        note = f"killed after {limit:.0f} s" + (f"; {note}" if note else "")
    elif status is None:
        status = "pass" if rc == 0 else "fail"
        if rc != 0:
            note = f"exit code {rc}" + (f"; {note}" if note else "")
    record.update(status=status, seconds=round(seconds, 1), returncode=rc, figures=figures,
                  note=note)
    if status in ("fail", "timeout"):
        record["tail"] = [line.rstrip("\n") for line in text.splitlines()[-TAIL_LINES:]]
    print(f"== {stage.name}: {status.upper()} in {seconds:.1f} s"
          + (f" ({note})" if note else ""), flush=True)
    return record


def stage_env(name, dry):
    """Extra environment of a stage: the dry-run tests stage runs the CUDA simulator."""
    return {"NUMBA_ENABLE_CUDASIM": "1"} if dry and name == "tests" else {}


# --- environment facts ----------------------------------------------------------------------
PROBE = r"""
import json, platform, importlib.metadata as md
def v(*names):
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            pass
    return None
facts = {"python": platform.python_version(), "numpy": v("numpy"), "numba": v("numba"),
         "numba-cuda": v("numba-cuda"),
         "cupy": v("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"), "torch": v("torch")}
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    p = cupy.cuda.runtime.getDeviceProperties(0)
    name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
    facts.update(gpu=name, gpu_count=n, compute_capability=f"{p['major']}.{p['minor']}",
                 gpu_memory_gib=round(p["totalGlobalMem"] / 2**30, 1),
                 cuda_driver=cupy.cuda.runtime.driverGetVersion(),
                 cuda_runtime=cupy.cuda.runtime.runtimeGetVersion())
except Exception as e:
    facts["gpu"] = None
    facts["gpu_error"] = f"{type(e).__name__}: {e}"[:300]
try:
    import torch
    facts["torch_cuda"] = torch.version.cuda if torch.cuda.is_available() else None
except Exception as e:
    facts["torch_cuda"] = None
print(json.dumps(facts))
"""


def environment(env):
    """Versions and the GPU, probed in a child process (never raises, at most 60 s)."""
    facts = {"python": platform.python_version(), "machine": platform.machine(),
             "cpus": os.cpu_count(), "host": platform.node()}
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        found = json_lines(proc.stdout)
        if found:
            facts.update(found[-1])
        else:
            facts["probe_error"] = (proc.stderr or proc.stdout)[-300:]
    except (OSError, subprocess.TimeoutExpired) as err:
        facts["probe_error"] = f"{type(err).__name__}: {err}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            facts["nvidia-smi"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return facts


# --- the summary ----------------------------------------------------------------------------
def write_summary(out, report):
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(markdown(report))


def _cell(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, (dict, list)):
        return "(see below)"
    return "-" if v is None else str(v)


def markdown(report):
    env = report["environment"]
    dry = " (dry run: no GPU, CPU/simulator counterparts)" if report["dry_run"] else ""
    lines = [f"# minires GPU check{dry}", "",
             f"- started {report['started']}, {report['seconds']:.0f} s in all (stage budgets "
             f"sum to {STAGE_BUDGET_S} s), result: **{report['result']}**",
             f"- GPU: {env.get('gpu') or 'none'}"
             + (f" (compute capability {env['compute_capability']}, "
                f"{env.get('gpu_memory_gib')} GiB; CUDA driver {env.get('cuda_driver')}, "
                f"runtime {env.get('cuda_runtime')})" if env.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {env.get(k) or '-'}" for k in
                                        ("python", "numpy", "numba", "numba-cuda", "cupy",
                                         "torch")) + (f" (CUDA {env['torch_cuda']})"
                                                      if env.get("torch_cuda") else ""),
             f"- command: `{report['command']}`", "",
             "| stage | status | seconds | limit | key figures |", "|---|---|---:|---:|---|"]
    for s in report["stages"]:
        figs = "; ".join(f"{k}: {_cell(v)}" for k, v in s.get("figures", {}).items()
                         if not isinstance(v, (dict, list)))
        note = f" ({s['note']})" if s.get("note") else ""
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.1f} | "
                     f"{s.get('limit_s', '-')} | {figs}{note} |".replace("\n", " "))
    for s in report["stages"]:
        table = s.get("figures", {}).get("table")
        if table:
            cols = list(table[0])
            lines += ["", f"## {s['name']}: {s['title']}", "",
                      "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in table]
        kernels = s.get("figures", {}).get("minires kernels")
        if kernels:
            lines += ["", f"## {s['name']}: minires kernels per step", "",
                      ", ".join(f"{k} {v}" for k, v in kernels.items())]
        if s.get("tail"):
            lines += ["", f"## {s['name']}: {s['status']}, last output lines "
                      f"(whole log: {s['log']})", "", "```", *s["tail"], "```"]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench gpu-check", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--out", required=True, help="folder for summary.md, summary.json, one log "
                   "per stage and the training run")
    p.add_argument("--dry-run", action="store_true", help="no GPU: run every stage's CPU or "
                   "simulator counterpart on tiny inputs")
    p.add_argument("--data", help="folder with the four MNIST .gz files (default "
                   "$MINIRES_DATA, else data/mnist in the checkout)")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.add_argument("--total", type=float, default=TOTAL_S, help=f"seconds after which no "
                   f"stage runs on (default {TOTAL_S})")
    return p.parse_args(argv)


def child_env(args, out):
    """The stages' environment: the checkout on PYTHONPATH and MINIRES_DATA. Numba's and
    CuPy's kernel caches stay where they are (by default __pycache__ beside the kernels in the
    checkout and ~/.cupy): the stages share them, so each kernel compiles once."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    data = args.data or env.get("MINIRES_DATA") or str(REPO / "data" / "mnist")
    env["MINIRES_DATA"] = str(pathlib.Path(data).resolve())
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the real target (the dry-run tests stage sets it)
    return env


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(args, out)
    todo = stages(out)
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in todo})
        if unknown:
            print(f"python -m bench gpu-check: error: unknown stage(s) {unknown}; stages: "
                  f"{[s.name for s in todo]}", file=sys.stderr)
            return 2
        todo = [s for s in todo if s.name in args.only]
    report = {"command": "python -m bench gpu-check " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)), "dry_run": args.dry_run,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seconds": 0.0, "result": "running", "data": env["MINIRES_DATA"], "stages": []}
    print(f"gpu-check{' --dry-run' if args.dry_run else ''}: {len(todo)} stage(s), writing "
          f"{out}", flush=True)
    report["environment"] = environment(env)
    e = report["environment"]
    print(f"GPU: {e.get('gpu') or 'none'}; " + ", ".join(
        f"{k} {e.get(k) or '-'}" for k in ("python", "numpy", "numba", "numba-cuda", "cupy",
                                           "torch")), flush=True)
    write_summary(out, report)
    slack = DRY_SLACK if args.dry_run else 1
    for stage in todo:
        left = args.total * slack - (time.perf_counter() - t0)
        report["stages"].append(run_stage(stage, args.dry_run, min(stage.budget * slack, left),
                                          env, out))
        report["seconds"] = round(time.perf_counter() - t0, 1)
        write_summary(out, report)
    bad = [s["name"] for s in report["stages"] if s["status"] in ("fail", "timeout")]
    report["result"] = f"FAILED: {', '.join(bad)}" if bad else "passed"
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_summary(out, report)
    print(f"\ngpu-check: {report['result']} in {report['seconds']:.0f} s; "
          f"{out / 'summary.md'}", flush=True)
    for s in report["stages"]:
        print(f"  {s['name']:<10} {s['status']:<8} {s.get('seconds', 0):>6.1f} s  "
              f"{s.get('note', '')}", flush=True)
    return 1 if bad else 0
