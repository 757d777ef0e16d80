"""Reliability (issue 8). Faults: a CLI training run SIGKILLed at many points (inside a
checkpoint's temp file, between its fsync and its rename, after the rename, between a metrics
row and its checkpoint, during evaluation, at a random moment, twice in a row) resumes from
its last complete checkpoint bit-identical to an unbroken run; a failed checkpoint write
(disk full, permission denied) raises, keeps the previous one and leaves no temp file.
Numerical faults (NaN/inf stop, anomaly detection), flat memory, `train --profile`.
Hostile files and misuse: test_misuse.py."""
import errno
import gc
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import minires.ops as F
from conftest import REPO
from minires import checkpoint, cli, data, models, optim, run, train
from minires.anomaly import AnomalyError, detect_anomaly
from minires.profile import profile
from minires.tensor import Function, Tensor

tensor_module = importlib.import_module("minires.tensor")  # `minires.tensor` is also a function

# Runs `minires train` (argv after the fault) with one fault injected in its own process:
# the process SIGKILLs itself at the named point of the n-th checkpoint write (or step n).
DRIVER = r"""
import os, signal, sys
import numpy as np
from minires import checkpoint, cli, run, train

fault, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
count = {"saves": 0, "members": 0}
real_save, real_write, real_replace = checkpoint.save, np.lib.format.write_array, os.replace
real_row, real_evaluate = run._Metrics.__call__, train.evaluate


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def save(obj, path):
    count["saves"] += 1
    count["members"] = 0
    real_save(obj, path)


def write_array(fp, array, **kwargs):  # one .npy member of the temp file
    real_write(fp, array, **kwargs)
    count["members"] += 1
    if fault == "mid_write" and count["saves"] == n and count["members"] == 3:
        die()


def replace(src, dst):
    if fault == "metrics_rewrite" and str(dst).endswith("metrics.csv"):
        die()  # a resume rewrites metrics.csv (rows after its checkpoint dropped)
    here = count["saves"] == n and str(dst).endswith("checkpoint.npz")
    if fault == "before_rename" and here:
        die()
    real_replace(src, dst)
    if fault == "after_rename" and here:
        die()


def row(self, record):  # a metrics.csv row is written before that step's checkpoint
    real_row(self, record)
    if fault == "after_row" and record["step"] == n:
        die()


def evaluate(*args, **kwargs):
    if fault == "evaluate":
        die()
    return real_evaluate(*args, **kwargs)


checkpoint.save, np.lib.format.write_array, os.replace = save, write_array, replace
run._Metrics.__call__, train.evaluate = row, evaluate
sys.exit(cli.main(argv))
"""
# 256 images in batches of 16 for 2 epochs: 32 steps, a checkpoint every 2 steps (save k at
# step 2k; the epoch end, step 16, is save 8).
RUN = ["train", "--limit", "256", "--batch-size", "16", "--epochs", "2", "--threads", "1",
       "--optimizer", "adam"]
STEPS, EVERY = 32, 2


def _launch(out, mnist_dir, *extra, fault="none", n=0, every=EVERY):
    env = dict(os.environ, PYTHONPATH=str(REPO), NUMBA_NUM_THREADS="1")
    argv = RUN + ["--data", str(mnist_dir), "--out", str(out), "--checkpoint-every",
                  str(every), *extra]
    return subprocess.Popen([sys.executable, "-c", DRIVER, fault, str(n), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, killed=False):
    stdout, stderr = proc.communicate(timeout=300)
    if killed:
        assert proc.returncode == -signal.SIGKILL, stderr
    else:
        assert proc.returncode == 0, stderr
        assert f"after {STEPS} steps" in stdout
    return stdout


def _assert_identical(a, b, where="checkpoint"):
    """Recursive exact equality: same keys in order, types, dtypes, shapes and bits."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}/{i}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def straight(mnist_dir, tmp_path_factory):
    """The unbroken run: its final checkpoint and metrics.csv bytes."""
    out = tmp_path_factory.mktemp("straight")
    _finish(_launch(out, mnist_dir))
    return checkpoint.load(out / "checkpoint.npz"), (out / "metrics.csv").read_bytes()


def _resume(out, mnist_dir, **fault):
    ckpt = out / "checkpoint.npz"
    extra = ("--resume", str(ckpt)) if ckpt.exists() else ()  # none yet: start afresh
    return _launch(out, mnist_dir, *extra, **fault)


def _check_final(out, straight):
    _assert_identical(straight[0], checkpoint.load(out / "checkpoint.npz"))
    assert (out / "metrics.csv").read_bytes() == straight[1]
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "metrics.csv"]  # no temp file left


def _saved_step(out):
    ckpt = out / "checkpoint.npz"
    return checkpoint.load(ckpt)["step"] if ckpt.exists() else None


# (fault, n, step of the last complete checkpoint the kill leaves; None: none written yet)
KILLS = [
    ("mid_write", 1, None),      # inside the very first checkpoint's temp file
    ("mid_write", 5, 8),         # inside save 5's temp file (3 arrays written)
    ("before_rename", 8, 14),    # the epoch-end temp file complete and fsynced, not renamed
    ("after_rename", 3, 6),      # renamed, before the folder fsync and temp cleanup
    ("after_row", 12, 10),       # step 12's metrics row written, its checkpoint not yet
    ("evaluate", 0, 32),         # training done, killed in the final evaluation
]


@pytest.mark.parametrize("fault,n,left", KILLS, ids=[f"{f}-{n}" for f, n, _ in KILLS])
def test_sigkill_then_resume_is_bit_identical(fault, n, left, straight, mnist_dir, tmp_path):
    _finish(_launch(tmp_path, mnist_dir, fault=fault, n=n), killed=True)
    assert _saved_step(tmp_path) == left  # the last complete checkpoint, intact and loadable
    temps = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert bool(temps) == (fault in ("mid_write", "before_rename"))  # a kill skips cleanup
    _finish(_resume(tmp_path, mnist_dir))
    _check_final(tmp_path, straight)


def test_killed_three_times_including_during_the_resumes(straight, mnist_dir, tmp_path):
    _finish(_launch(tmp_path, mnist_dir, fault="after_row", n=7), killed=True)
    assert _saved_step(tmp_path) == 6
    rows = (tmp_path / "metrics.csv").read_bytes()
    # killed while the resume rewrites metrics.csv: the old file, rows 1-7, is still whole
    _finish(_resume(tmp_path, mnist_dir, fault="metrics_rewrite"), killed=True)
    assert (tmp_path / "metrics.csv").read_bytes() == rows and rows.count(b"\n") == 8
    # the resumed run writes saves at steps 8, 10, 12, ...: killed inside its 4th (step 14)
    _finish(_resume(tmp_path, mnist_dir, fault="mid_write", n=4), killed=True)
    assert _saved_step(tmp_path) == 12
    _finish(_resume(tmp_path, mnist_dir))
    _check_final(tmp_path, straight)


def test_sigkill_at_a_random_moment_while_checkpointing_every_step(straight, mnist_dir,
                                                                   tmp_path):
    """Killed from outside at an arbitrary time (checkpoint-every 1: most of the run is
    spent near a write), after ~20 steps, then resumed."""
    proc = _launch(tmp_path, mnist_dir, every=1)
    metrics, deadline = tmp_path / "metrics.csv", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") > 20:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert 1 <= _saved_step(tmp_path) <= STEPS
    _finish(_resume(tmp_path, mnist_dir, every=1))
    _check_final(tmp_path, straight)


def test_resume_keeps_only_whole_rows_up_to_the_checkpoint(tmp_path):
    """Rows after the checkpoint's step are dropped, and so is anything after a torn line."""
    path = tmp_path / "metrics.csv"
    head = ",".join(run.CSV_FIELDS + train.SkipNorms.columns)
    good = [f"{s},0,2.{s},0.5,0.01,," for s in (1, 2, 3)]
    cases = [(3, ["4,0,2.4,0.5,0.01,,", "5,0,2.5"]),  # after the checkpoint, then torn
             (3, ["1"]),  # the torn start of row 12: its step reads 1 but it is not a row
             (2, ["3,0,2.3,0.5,0.0"])]  # torn inside the last field
    for keep, tail in cases:
        path.write_text("\r\n".join([head] + good[:keep] + tail) + "\r\n")
        metrics = run._Metrics(path, step=3, columns=train.SkipNorms.columns)
        metrics.close()
        assert path.read_text().splitlines() == [head] + good[:keep], tail
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv"]


# --- checkpoint writes that fail ----------------------------------------------------------
def _state(rng):
    return {"step": 1, "w": rng.standard_normal((4, 3)), "m": {"b": np.arange(5)}}


def _fail_on(monkeypatch, target, attr, exc, after=0):
    """Make target.attr raise exc on its (after+1)-th call (calls before it go through)."""
    real, calls = getattr(target, attr), []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, fake)


FAILURES = {  # where a write can fail, and how
    "disk full mid-write": (np.lib.format, "write_array",
                            OSError(errno.ENOSPC, "No space left on device"), 1),
    "disk full at fsync": (os, "fsync", OSError(errno.ENOSPC, "No space left on device"), 0),
    "read-only folder": (tempfile, "mkstemp", PermissionError(errno.EACCES,
                                                              "Permission denied"), 0),
    "rename refused": (os, "replace", PermissionError(errno.EACCES, "Permission denied"), 0),
}


@pytest.mark.parametrize("case", FAILURES)
def test_failed_write_raises_and_keeps_the_previous_checkpoint(case, tmp_path, rng,
                                                               monkeypatch):
    path = tmp_path / "ck.npz"
    checkpoint.save(_state(rng), path)
    before = path.read_bytes()
    target, attr, exc, after = FAILURES[case]
    _fail_on(monkeypatch, target, attr, exc, after)
    with pytest.raises(OSError) as info:
        checkpoint.save({"step": 2, "w": np.zeros((4, 3)), "m": {"b": np.ones(5)}}, path)
    monkeypatch.undo()
    assert info.value.errno == exc.errno
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]
    assert checkpoint.load(path)["step"] == 1


def test_really_read_only_folder(tmp_path, rng):
    path = tmp_path / "ck.npz"
    checkpoint.save(_state(rng), path)
    before = path.read_bytes()
    tmp_path.chmod(0o500)
    try:
        probe = tmp_path / "probe"
        try:
            probe.touch()
            probe.unlink()
            pytest.skip("chmod does not stop this user (root): see the simulated case")
        except PermissionError:
            pass
        with pytest.raises(PermissionError):
            checkpoint.save({"step": 2}, path)
    finally:
        tmp_path.chmod(0o700)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return data.load_mnist("train", mnist_dir)


def test_disk_full_during_training_stops_with_a_clear_error(mnist, tmp_path, monkeypatch):
    """fit: the write at step 4 fails -> CheckpointError naming the file, the step and the
    intact step-2 checkpoint; the CLI turns it into one line and exit code 1."""
    x, y = mnist
    loader = data.DataLoader(x[:128], y[:128], batch_size=16, seed=0)
    model = models.seed_net(rng=0)
    opt = optim.SGD(model.parameters(), 0.01)
    real = checkpoint.save

    def save(obj, path):
        if obj["step"] == 4:
            _fail_on(monkeypatch, np.lib.format, "write_array",
                     OSError(errno.ENOSPC, "No space left on device"), after=2)
        real(obj, path)

    monkeypatch.setattr(checkpoint, "save", save)
    with cli._threads(1), pytest.raises(run.CheckpointError) as info:
        run.fit(model, loader, opt, out=tmp_path, checkpoint_every=2, progress=False)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "No space left on device" in message
    assert f"cannot write checkpoint {tmp_path / 'checkpoint.npz'} at step 4" in message
    assert "last good checkpoint" in message and "(step 2)" in message
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "checkpoint.npz")["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "metrics.csv"]


def test_cli_reports_a_failed_write_in_one_line(mnist_dir, tmp_path, monkeypatch, capsys):
    _fail_on(monkeypatch, tempfile, "mkstemp",
             PermissionError(errno.EACCES, "Permission denied"), after=1)  # metrics ok
    argv = ["train", "--limit", "64", "--data", str(mnist_dir), "--out", str(tmp_path),
            "--threads", "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minires train: error: [Errno 13] cannot "
                                               "write checkpoint")
    assert "Permission denied" in err[0] and "no checkpoint was written" in err[0]


# --- numerical faults ---------------------------------------------------------------------
def _setup(mnist, n=128, batch_size=16):
    x, y = mnist
    loader = data.DataLoader(x[:n], y[:n], batch_size=batch_size, seed=0)
    model = models.seed_net(rng=0)
    return model, loader, optim.SGD(model.parameters(), 0.01, momentum=0.9)


def _params(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}


def test_nan_loss_names_step_and_parameters(mnist, tmp_path):
    """A weight poisoned after step 5's update: step 6's loss is NaN. The stop names the
    step, the first parameter with a non-finite gradient and the one with a non-finite
    value; the weights are not updated; the step-4 checkpoint is kept."""
    model, loader, opt = _setup(mnist)
    real_step, calls = opt.step, []

    def poisoned_step():
        real_step()
        calls.append(1)
        if len(calls) == 5:
            model.head[2].weight.data[3, 7] = np.nan

    opt.step = poisoned_step
    snapshot = {}
    real_zero = model.zero_grad

    def zero_grad():  # called in every step before backward: remember the weights
        snapshot.update(_params(model))
        real_zero()

    model.zero_grad = zero_grad
    with cli._threads(1), pytest.raises(train.NonFiniteLoss) as info:
        run.fit(model, loader, opt, out=tmp_path, checkpoint_every=2, progress=False)
    message = str(info.value)
    assert message.startswith("loss is nan at step 6; first parameter with a non-finite "
                              "gradient: features.0.weight (16, 1, 3, 3); first parameter "
                              "with a non-finite value: head.2.weight (10, 144)")
    assert message.endswith(f"last good checkpoint: {tmp_path / 'checkpoint.npz'} (step 4)")
    assert info.value.step == 6 and info.value.parameter == "features.0.weight"
    for name, value in _params(model).items():  # step 6 changed nothing
        np.testing.assert_array_equal(value, snapshot[name])
    saved = checkpoint.load(tmp_path / "checkpoint.npz")
    assert saved["step"] == 4 and all(np.isfinite(w).all() for w in saved["model"].values())


def test_inf_gradient_with_finite_loss_stops_before_the_update(mnist):
    model, loader, opt = _setup(mnist)
    bias = model.head[2].bias
    bias.register_hook(lambda g: np.where(np.arange(g.size) == 2, np.inf, g).astype(g.dtype))
    before = _params(model)
    with cli._threads(1), pytest.raises(train.NonFiniteLoss) as info:
        run.fit(model, loader, opt, progress=False)
    assert str(info.value).startswith("gradient not finite at step 1 although the loss is "
                                      "finite (")
    assert "first parameter with a non-finite gradient: head.2.bias (10,)" in str(info.value)
    assert info.value.parameter == "head.2.bias"
    for name, value in _params(model).items():
        np.testing.assert_array_equal(value, before[name])


def test_cli_nan_names_parameter_and_with_detect_anomaly_the_op(mnist_dir, tmp_path, capsys):
    argv = ["train", "--limit", "256", "--data", str(mnist_dir), "--optimizer", "sgd",
            "--lr", "1e4", "--schedule", "none", "--checkpoint-every", "1", "--threads", "1"]
    assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3; first parameter with a non-finite gradient: " \
           "features.4.weight (16, 16, 3, 3); training stopped" in err and "(step 2)" in err
    assert cli.main(argv + ["--out", str(tmp_path / "b"), "--detect-anomaly"]) == 1
    err = capsys.readouterr().err
    assert "step 3: anomaly: Conv2d forward produced" in err
    assert "from finite inputs; inputs (64, 16, 28, 28) float32, (16, 16, 3, 3) float32, " \
           "(16,) float32" in err and "(step 2)" in err
    for folder in "ab":
        assert checkpoint.load(tmp_path / folder / "checkpoint.npz")["step"] == 2


# --- memory -------------------------------------------------------------------------------
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def _live(cls):
    # type(o), not isinstance: some modules' objects warn when their __class__ is read
    return sum(1 for o in gc.get_objects() if issubclass(type(o), cls))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_thousand_steps_keep_memory_flat(mnist):
    """1,000 steps of the CLI's seed net (batch 8, Adam, one thread): resident memory after
    a 100-step warm-up grows by less than MEMORY_SLACK_MB (measured: about 0.1 MB; one
    leaked activation per step would add over 300 MB)."""
    x, y = mnist
    loader = data.DataLoader(x[:512], y[:512], batch_size=8, seed=0)
    model = cli.MODELS["seed"](0)
    opt = optim.Adam(model.parameters(), 1e-3)
    rss, step = [], 0
    with cli._threads(1):
        while step < 1000:
            for xb, yb in loader:
                train.train_step(model, xb, yb, opt, step=step + 1)
                step += 1
                if step % 100 == 0:
                    rss.append(_rss_mb())
                if step == 1000:
                    break
    assert max(rss[1:]) - rss[0] < MEMORY_SLACK_MB, rss


MEMORY_SLACK_MB = 3.0


def test_no_tensor_or_function_survives_a_step(mnist):
    """With the cycle collector off, a training step leaves no Function and no new Tensor
    behind: the graph is freed by reference counting alone (no cycles)."""
    x, y = mnist
    model = cli.MODELS["seed"](0)
    opt = optim.Adam(model.parameters(), 1e-3)
    xb, yb = data.DataLoader(x[:8], y[:8], batch_size=8).images, y[:8]
    with cli._threads(1):
        train.train_step(model, xb, yb, opt)  # state created: the optimizer's moments
        gc.collect()
        gc.disable()
        try:
            tensors, functions = _live(Tensor), _live(Function)
            train.train_step(model, xb, yb, opt)
            assert (_live(Tensor), _live(Function)) == (tensors, functions)
        finally:
            gc.enable()
    assert functions == 0 and tensors == len(opt.params)  # only the Parameters


# --- anomaly detection --------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns, too
def test_detect_anomaly_names_the_forward_op():
    x = Tensor(np.array([1.0, -1.0, 4.0], np.float32), requires_grad=True)
    with detect_anomaly(), pytest.raises(AnomalyError) as info:
        F.log(x * 2.0)
    err = info.value
    assert (err.op, err.phase, err.shapes) == ("Log", "forward", ((3,),))
    assert str(err) == ("anomaly: Log forward produced 1 NaN and 0 inf values from finite "
                        "inputs; inputs (3,) float32")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns, too
def test_detect_anomaly_names_the_backward_op():
    x = Tensor(np.array([0.0, 1.0], np.float64), requires_grad=True)
    with detect_anomaly():
        y = F.pow(x, 0.5)  # finite forward; d/dx at 0 is infinite
        with pytest.raises(AnomalyError) as info:
            F.sum(y).backward()
    err = info.value
    assert (err.op, err.phase, err.shapes) == ("Pow", "backward", ((2,),))
    assert "Pow backward produced 0 NaN and 1 inf values in the gradient of input 0, from a " \
           "finite incoming gradient" in str(err)


def test_detect_anomaly_blames_a_non_finite_leaf():
    layer = models.seed_net(rng=0).head[2]
    layer.weight.data[0, 0] = np.inf
    with detect_anomaly(), pytest.raises(AnomalyError, match=r"^anomaly: Linear forward "
                                         r"produced .* its input 1 was already non-finite"):
        layer(Tensor(np.ones((2, 144), np.float32)))


def test_detect_anomaly_changes_nothing_and_restores_the_observer(mnist):
    """Same gradients with and without detection; nested in a profiler, both observers see
    every op, and each block restores the observer it found."""
    x, y = mnist
    xb = data.DataLoader(x[:8], y[:8], batch_size=8).images

    def grads():
        model = models.seed_net(rng=0)
        F.cross_entropy(model(Tensor(xb)), y[:8]).backward()
        return [p.grad for p in model.parameters()]

    plain = grads()
    with profile() as prof:
        with detect_anomaly() as detector:
            assert tensor_module._observer is detector
            checked = grads()
        assert tensor_module._observer is prof
    assert tensor_module._observer is None
    for a, b in zip(plain, checked):
        np.testing.assert_array_equal(a, b)
    assert sum(r["calls"] for r in prof.stats() if r["op"] == "Conv2d") == 5


# --- train --profile N --------------------------------------------------------------------
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
