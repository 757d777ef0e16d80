"""`python -m bench gpu-check`: the dry run end to end (every stage's plumbing, both summary
files), the stage runner (timeouts, failures), the parsers on GPU-shaped output, the budgets,
and every real (GPU) command reaching its GPU check (so none can die on a typo in its flags).

The dry run takes about 40-60 s on a quiet 2-core machine (one subprocess per stage: gradcheck
on the CPU, `train --limit 256`, the kernel table at batch 8, launches under the CUDA
simulator, `epoch --steps 2`).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from bench import gpu_check, launches
from conftest import REPO

STAGES = ["tests", "gradcheck", "train", "kernels", "launches", "epoch"]


def _env(**extra):
    env = dict(os.environ, **extra)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(exit code, summary.json, summary.md, output) of one dry run."""
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, "-m", "bench", "gpu-check", "--dry-run", "--out",
                           str(out)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    return proc.returncode, summary, (out / "summary.md").read_text(), proc.stdout + \
        proc.stderr, out


def test_dry_run_passes_every_stage_and_writes_both_files(dry_run):
    rc, summary, md, output, out = dry_run
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == STAGES, output[-3000:]
    have_data = all((os.path.exists(os.path.join(summary["data"], f))
                     for f in gpu_check.MNIST_FILES))
    for name, s in stages.items():
        want = ("pass",) if have_data or name not in ("train", "epoch") else ("skip",)
        assert s["status"] in want, f"{name}: {s}\n{output[-3000:]}"
        assert (out / s["log"]).exists() or s["status"] == "skip"
    assert rc == 0 and summary["dry_run"] and summary["result"] == "passed"
    f = {name: s["figures"] for name, s in stages.items()}
    assert f["tests"]["passed"] >= 2 and f["tests"]["failed"] == 0
    assert f["gradcheck"]["checks passed"] == f["gradcheck"]["checks"] > 100  # both orders
    assert f["gradcheck"]["checks"] == 2 * f["gradcheck"]["cases"]
    assert f["kernels"]["rows"] >= 10 and f["kernels"]["table"][0]["kernel"]
    assert f["launches"]["mode"] == "simulator"
    multi = f["launches"]["launches/step (multi-tensor SGD)"]
    per_tensor = f["launches"]["launches/step (per-tensor SGD)"]
    assert 0 < multi < per_tensor  # the multi-tensor optimizer saves launches
    assert f["launches"]["minires kernels"]["sgd_kernel"] == 1
    if have_data:
        assert 0 <= f["train"]["test accuracy %"] <= 100 and f["train"]["steps"] == 4
        assert f["epoch"]["steps"] == 2 and f["epoch"]["minires training s"] > 0
    env = summary["environment"]
    for key in ("python", "numpy", "numba", "numba-cuda", "cupy", "torch", "gpu"):
        assert key in env
    assert env["gpu"] is None  # no GPU here
    for name in STAGES:
        assert f"| {name} | " in md
    assert "# minires GPU check (dry run" in md and "| kernel | shape |" in md


def test_budgets_fit_in_eight_minutes(tmp_path):
    budgets = [s.budget for s in gpu_check.stages(tmp_path)]
    assert sum(budgets) == gpu_check.STAGE_BUDGET_S < gpu_check.TOTAL_S < 8 * 60
    assert [s.name for s in gpu_check.stages(tmp_path)] == STAGES


def test_mnist_names_match_minires_data():
    from minires import data
    assert sorted(gpu_check.MNIST_FILES) == sorted(f for pair in data.FILES.values()
                                                   for f in pair)


def _stage(name, code, needs_data=False, parse=gpu_check.parse_gradcheck):
    cmd = [sys.executable, "-c", code]
    return gpu_check.Stage(name, name, 1, cmd, cmd, parse, needs_data)


def test_a_hanging_stage_times_out_and_the_next_one_runs(tmp_path):
    env = _env(MINIRES_DATA=str(tmp_path))
    hang = gpu_check.run_stage(_stage("hang", "import time; print('started', flush=True); "
                                      "time.sleep(60)"), False, 1.5, env, tmp_path)
    assert hang["status"] == "timeout" and hang["seconds"] < 20
    assert hang["tail"] == ["started"] and "killed after 2 s" in hang["note"]
    bad = gpu_check.run_stage(_stage("bad", "import sys; print('boom'); sys.exit(3)"), False,
                              30, env, tmp_path)
    assert bad["status"] == "fail" and bad["returncode"] == 3 and bad["tail"] == ["boom"]
    assert "exit code 3" in bad["note"] and (tmp_path / "bad.log").read_text().count("boom")
    nodata = gpu_check.run_stage(_stage("nodata", "pass", needs_data=True), False, 30, env,
                                 tmp_path)
    assert nodata["status"] == "fail" and "MNIST files not found" in nodata["note"]
    report = {"command": "x", "dry_run": False, "started": "now", "seconds": 1.0,
              "result": "FAILED", "environment": {}, "stages": [hang, bad, nodata]}
    gpu_check.write_summary(tmp_path, report)
    md = (tmp_path / "summary.md").read_text()
    assert "| hang | timeout |" in md and "```\nboom\n```" in md


def test_parsers_on_gpu_shaped_output():
    ok = ("test accuracy 98.57% (loss 0.0461) after 938 steps | training 12.3 s (4878 img/s), "
          "evaluation 0.5 s, wall time 20.1 s | runs/x")
    status, figures, note = gpu_check.parse_train(ok, 0, False)
    assert status is None and figures["test accuracy %"] == 98.57 and figures["wall s"] == 20.1
    status, _, note = gpu_check.parse_train(ok.replace("98.57", "97.10"), 0, False)
    assert status == "fail" and "97.10% < 98%" in note
    assert gpu_check.parse_train("Traceback ...", 1, False)[0] is None  # exit code decides
    assert gpu_check.parse_pytest("3 failed, 40 passed, 2 skipped in 9.1s", 1, False)[1] == {
        "passed": 40, "failed": 3, "skipped": 2, "error": 0}
    assert gpu_check.parse_pytest("55 skipped in 2.0s", 0, False)[0] == "skip"
    rows = [{"table": "kernels", "batch": 64, "kernel": k, "shape": "64x16x28x28", "f+b": 1.0,
             "f+b torch": t, "f+b/torch x": 1.0 / t} for k, t in (("conv", 0.5), ("relu", 2))]
    text = "\n".join(json.dumps(r) for r in [{"header": {"kernels": "numba-cuda"}}] + rows)
    _, figures, _ = gpu_check.parse_kernels(text, 0, False)
    assert figures["f+b/torch x, worst"].startswith("2.00 (conv") and figures["rows"] == 2
    epoch = {"command": "epoch", "steps": 938, "batch": 64, "ratio": 0.8, "ratio_note": None,
             "best": {"minires": {"train_s": 8.0, "ms_per_step": 8.5, "test_accuracy": 0.985},
                      "torch": {"train_s": 10.0, "ms_per_step": 10.6, "test_accuracy": 0.986}}}
    _, figures, _ = gpu_check.parse_epoch("noise\n" + json.dumps(epoch), 0, False)
    assert figures["minires/torch x"] == 0.8 and figures["torch test accuracy %"] == 98.6


def test_launches_report_with_cupti_counts(capsys):
    cupti = {"kernels": 70.0, "memcpy": 3.0, "memset": 1.0,
             "by_source": {"cublas": 3.0, "cupy": 47.0, "minires": 20.0}}
    rows = [{"optimizer": o, "minires_launches": 20, "minires_kernels": {"sgd_kernel": 1},
             "cupti": cupti, "launches_per_step": 70.0, "how": "CUPTI"} for o in ("a", "b")]
    launches.print_report({"model": "seed", "mode": "gpu", "gpu": "H100", "batch": 64,
                           "channels": 16, "rows": rows})
    out = capsys.readouterr().out
    assert "all kernels (CUPTI)" in out and "  cupy" in out and "3 / 1" in out
    text = json.dumps({"command": "launches", "mode": "gpu", "rows": rows})
    figures = gpu_check.parse_launches(text, 0, False)[1]
    assert figures["launches/step (a SGD)"] == 70.0


def test_cupti_trace_summary():
    events = [{"cat": "kernel", "name": "_ZN6cudapy5bench21conv2d_forward_kernelE..."},
              {"cat": "kernel", "name": "cupy_multiply__float32_float32"},
              {"cat": "kernel", "name": "sm90_xmma_gemm_f32f32_tf32f32"},
              {"cat": "kernel", "name": "cupy_sum"}, {"cat": "gpu_memcpy", "name": "Memcpy"},
              {"cat": "gpu_memset"}, {"cat": "cpu_op", "name": "aten::mm"}]
    got = launches.summarize_trace(events, 2)
    assert got == {"kernels": 2.0, "memcpy": 0.5, "memset": 0.5,
                   "by_source": {"cublas": 0.5, "cupy": 1.0, "minires": 0.5}}


def test_every_real_command_gets_as_far_as_asking_for_the_gpu(tmp_path):
    """Without a GPU each real stage command stops with its own no-GPU message (exit 2), not
    an argparse error: its flags are all valid. (The tests stage is plain pytest.)"""
    from minires import backend
    if backend.cupy_available():
        pytest.skip("a GPU is here: the real commands would run")
    procs = {}
    for stage in gpu_check.stages(tmp_path)[1:]:
        procs[stage.name] = subprocess.Popen(stage.real, cwd=REPO, env=_env(), text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"{name}: {out[-1000:]}{err[-2000:]}"
        assert "usage:" not in err and re.search(r"GPU|cuda", err), f"{name}: {err[-2000:]}"
