"""The `minires` command line, called in process through cli.main(argv) (its exit code)."""
import csv
import errno
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import REPO
from helpers import fail_on
from minires import backend, checkpoint, checks, cli, data, runtime
from minires.tensor import Function


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    rows = {line[:22].strip(): line[23:].strip() for line in out.splitlines()}  # "key  value"
    assert rows["minires"] == "0.1.0" and rows["numpy"] == np.__version__
    assert rows["kernels (cpu)"] in ("numba-cpu", "reference")
    assert "gpu" in rows and "cupy" in rows
    if rows["kernels (cpu)"] == "numba-cpu":
        assert rows["numba threading layer"] in ("omp", "tbb", "workqueue")
    assert rows["vector isa"] in ("AVX-512", "AVX2", "AVX", "SSE4.2", "SVE", "NEON", "unknown")
    assert rows["openmp wait policy"] == runtime.wait_policy()  # in-process: see below
    assert "threads)" in rows["blas"] and "install" not in rows["blas"]


@pytest.mark.parametrize("env,policy", [({}, "PASSIVE (set by minires)"),
                                        ({"OMP_WAIT_POLICY": "ACTIVE"},
                                         "OMP_WAIT_POLICY=ACTIVE (from the environment)")])
def test_info_shows_the_wait_policy_and_who_chose_it(env, policy):
    """A fresh process: minires sets the passive policy unless the user chose one."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",
                                                              "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-m", "minires", "info"], capture_output=True,
                         text=True, env=dict(base, PYTHONPATH=str(REPO), **env), timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"openmp wait policy     {policy}\n" in out.stdout


def test_gradcheck_every_case_passes(capsys):
    assert cli.main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    names = [name for name, _, _ in checks.cases()]
    assert len(names) > 45 and "conv2d" in names and "nn.BasicBlock" in names
    for name in names:  # both orders: gradcheck and gradgradcheck
        for order in (1, 2):
            assert any(line.startswith(f"{name} ") and f" {order} PASS " in line
                       for line in out.splitlines()), (name, order)
    n = 2 * len(names)
    assert f"{n} of {n} checks passed ({len(names)} cases, 2 orders each)" in out


class _WrongSquare(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return x * x

    def backward(self, gy):
        x, = self.saved
        return gy * x  # should be 2 * gy * x


def test_gradcheck_failure_exits_nonzero(monkeypatch, capsys):
    x = np.random.default_rng(0).standard_normal((2, 3))
    monkeypatch.setattr(checks, "cases", lambda seed=0: [
        ("wrong square", lambda t: _WrongSquare()(t), [x]), ("right", lambda t: t * t, [x])])
    assert cli.main(["gradcheck"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert any(line.startswith("wrong square ") and " 1 FAIL " in line for line in lines)
    assert any(line.startswith("right ") and " 1 PASS " in line for line in lines)
    assert any(line.startswith("right ") and " 2 PASS " in line for line in lines)
    # _WrongSquare has no backward_graph: its second-order row fails and says why
    assert any(line.startswith("wrong square ") and " 2 FAIL " in line for line in lines)
    assert "2 of 4 checks passed (2 cases, 2 orders each)" in captured.out
    assert "numerical and analytical gradients differ" in captured.err
    assert "wrong square (order 2): _WrongSquare does not support create_graph=True" in \
        captured.err


@pytest.mark.skipif(backend.cupy_available(), reason="a GPU is present")
@pytest.mark.parametrize("command", ["train", "gradcheck"])
def test_cuda_without_gpu_is_one_clear_error(command, capsys):
    assert cli.main([command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"minires {command}: error: device 'cuda' requested but no usable GPU")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_small_run_and_resume_checks(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--limit", "256", "--data", str(mnist_dir), "--out", str(out),
            "--checkpoint-every", "3"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "model seed (10,890 parameters)" in captured.out
    assert "test accuracy" in captured.out and "after 4 steps" in captured.out
    rows = _rows(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["x_in"]) > 0 and float(r["x_res"]) > 0 for r in rows)
    state = checkpoint.load(out / "checkpoint.npz")
    assert state["step"] == 4 and state["hparams"]["model"] == "seed"
    assert state["hparams"]["lr"] == cli.DEFAULT_LR[cli.DEFAULTS["optimizer"]]
    ckpt = str(out / "checkpoint.npz")
    assert cli.main(["train", "--resume", ckpt, "--model", "rezero"]) == 2
    err = capsys.readouterr().err
    assert "--model rezero differs from the checkpoint's model='seed'" in err
    assert cli.main(["train", "--resume", str(tmp_path / "nope.npz")]) == 2
    assert "nope.npz" in capsys.readouterr().err


def test_train_nan_exits_nonzero(mnist_dir, tmp_path, capsys):
    argv = ["train", "--limit", "256", "--data", str(mnist_dir), "--out", str(tmp_path),
            "--optimizer", "sgd", "--lr", "1e4", "--schedule", "none", "--checkpoint-every",
            "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "(step 2)" in err
    assert checkpoint.load(tmp_path / "checkpoint.npz")["step"] == 2


def test_train_without_data_exits_nonzero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "MIRRORS", ["http://127.0.0.1:9/"])
    assert cli.main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--data" in err and "MINIRES_DATA" in err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--model", "vgg"])
    assert info.value.code == 2
    assert cli.main(["train", "--epochs", "0", "--limit", "10"]) == 2
    assert "must be positive" in capsys.readouterr().err


BAD_FLAGS = {  # argv after `train` -> the one-line error (exit code 2, before any data loads)
    "lr nan": (["--lr", "nan"], "--lr must be positive and finite, got nan"),
    "lr inf": (["--lr", "inf"], "--lr must be positive and finite, got inf"),
    "lr negative": (["--lr", "-0.1"], "--lr must be positive and finite, got -0.1"),
    "threads 0": (["--threads", "0"], "--threads must be >= 1, got 0"),
    "threads beyond the pool": (["--threads", "4096"], "--threads 4096: The number of "
                                                       "threads must be between 1 and"),
    "checkpoint-every negative": (["--checkpoint-every", "-2"], "--checkpoint-every must be "
                                                                 ">= 0 (0: at epoch ends only), "
                                                                 "got -2"),
    "limit negative": (["--limit", "-5"], "--limit must be >= 0, got -5"),
    "seed negative": (["--seed", "-1"], "--seed must be >= 0, got -1"),
    "epochs 0": (["--epochs", "0"], "--epochs must be positive, got 0"),
    "batch-size 0": (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    "profile 0": (["--profile", "0"], "--profile must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flag_value_is_a_one_line_usage_error(case, tmp_path, capsys):
    argv, message = BAD_FLAGS[case]
    assert cli.main(["train", "--data", str(tmp_path / "none"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minires train: error: {message}"), err


def test_gradcheck_threads_0_is_a_usage_error(capsys):
    assert cli.main(["gradcheck", "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("minires gradcheck: error: --threads must be "
                                               ">= 1, got 0")


def test_help_states_what_zero_means(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--limit N use only the first N train and test images (default 0: all of them)" \
        in text
    assert "(default 500; 0: at epoch ends only)" in text and "--threads THREADS CPU " \
        "threads for Numba and BLAS, >= 1" in text


def test_resume_reads_the_checkpoint_once(mnist_dir, tmp_path, monkeypatch, capsys):
    """The settings and the restore come from one read of the file (also with --profile)."""
    argv = ["train", "--limit", "64", "--data", str(mnist_dir), "--threads", "1"]
    assert cli.main(argv + ["--out", str(tmp_path)]) == 0
    calls = {"open": 0, "load": 0}
    for name, method in (("open", "__init__"), ("load", "load")):
        real = getattr(checkpoint.Reader, method)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(checkpoint.Reader, method, counted)
    ckpt = str(tmp_path / "checkpoint.npz")
    assert cli.main(argv + ["--resume", ckpt]) == 0
    assert calls == {"open": 1, "load": 1} and "resumed from" in capsys.readouterr().err
    assert cli.main(argv + ["--resume", ckpt, "--profile", "1", "--out",
                            str(tmp_path / "p")]) == 0
    assert calls == {"open": 2, "load": 2}


# --- failures and --profile ---------------------------------------------------------------
def test_cli_reports_a_failed_write_in_one_line(mnist_dir, tmp_path, monkeypatch, capsys):
    fail_on(monkeypatch, tempfile, "mkstemp",
             PermissionError(errno.EACCES, "Permission denied"), after=1)  # metrics ok
    argv = ["train", "--limit", "64", "--data", str(mnist_dir), "--out", str(tmp_path),
            "--threads", "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minires train: error: [Errno 13] cannot "
                                               "write checkpoint")
    assert "Permission denied" in err[0] and "no checkpoint was written" in err[0]


def test_cli_nan_names_parameter_and_with_detect_anomaly_the_op(mnist_dir, tmp_path, capsys):
    argv = ["train", "--limit", "256", "--data", str(mnist_dir), "--optimizer", "sgd",
            "--lr", "1e4", "--schedule", "none", "--checkpoint-every", "1", "--threads", "1"]
    assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    # which parameter's gradient overflows first depends on the kernels' summation order (a
    # diverging run amplifies rounding): check the message's form and the step, not the layer
    assert re.search(r"loss is nan at step 3; first parameter with a non-finite gradient: "
                     r"features\.\d+\.weight \(16, \d+, 3, 3\); training stopped", err), err
    assert "(step 2)" in err
    assert cli.main(argv + ["--out", str(tmp_path / "b"), "--detect-anomaly"]) == 1
    err = capsys.readouterr().err
    assert "step 3: anomaly: Conv2d forward produced" in err
    assert "from finite inputs; inputs (64, 16, 28, 28) float32, (16, 16, 3, 3) float32, " \
           "(16,) float32" in err and "(step 2)" in err
    for folder in "ab":
        assert checkpoint.load(tmp_path / folder / "checkpoint.npz")["step"] == 2


def test_train_profile_prints_table_and_writes_trace(mnist_dir, tmp_path, capsys):
    argv = ["train", "--limit", "64", "--batch-size", "16", "--data", str(mnist_dir),
            "--out", str(tmp_path), "--profile", "3", "--threads", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["Conv2d"][1] == "15" and rows["CrossEntropy"][1] == "3"  # 5 convs x 3 steps
    assert "3 steps: " in out and "trace.json" in out
    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    conv = [e for e in trace if e.get("name") == "Conv2d"]
    assert sum(e["cat"] == "forward" for e in conv) == 15
    assert sum(e["cat"] == "backward" for e in conv) == 15
    assert sorted(os.listdir(tmp_path)) == ["trace.json"]  # no checkpoint, no metrics
    assert cli.main(argv[:-4] + ["--profile", "0"]) == 2
    assert "--profile must be >= 1" in capsys.readouterr().err
