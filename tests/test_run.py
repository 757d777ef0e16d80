"""minires.run (fit, metrics.csv, checkpoints, resume). Faults: a CLI training run SIGKILLed
at many points (inside a checkpoint's temp file, between its fsync and its rename, after the
rename, between a metrics row and its checkpoint, during evaluation, at a random moment, twice
in a row) resumes from its last complete checkpoint bit-identical to an unbroken run; a disk
full during training and a NaN stop name the last good checkpoint; a broken checkpoint passed
to restore raises an error naming the problem and changes nothing."""
import errno
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from conftest import REPO
from helpers import fail_on, param_copies, same, sgd_setup
from minires import checkpoint, data, models, optim, run, runtime, train


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
    metrics, deadline = tmp_path / "metrics.csv", time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") > 20:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # (a run that already ended was killed "after the end")
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


# --- failures during training -----------------------------------------------------
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
            fail_on(monkeypatch, np.lib.format, "write_array",
                     OSError(errno.ENOSPC, "No space left on device"), after=2)
        real(obj, path)

    monkeypatch.setattr(checkpoint, "save", save)
    with runtime.limit_threads(1), pytest.raises(run.CheckpointError) as info:
        run.fit(model, loader, opt, out=tmp_path, checkpoint_every=2, progress=False)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "No space left on device" in message
    assert f"cannot write checkpoint {tmp_path / 'checkpoint.npz'} at step 4" in message
    assert "last good checkpoint" in message and "(step 2)" in message
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "checkpoint.npz")["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "metrics.csv"]


def test_nan_loss_names_step_and_parameters(mnist, tmp_path):
    """A weight poisoned after step 5's update: step 6's loss is NaN. The stop names the
    step, the first parameter with a non-finite gradient and the one with a non-finite
    value; the weights are not updated; the step-4 checkpoint is kept."""
    model, loader, opt = sgd_setup(mnist)
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
        snapshot.update(param_copies(model))
        real_zero()

    model.zero_grad = zero_grad
    with runtime.limit_threads(1), pytest.raises(train.NonFiniteLoss) as info:
        run.fit(model, loader, opt, out=tmp_path, checkpoint_every=2, progress=False)
    message = str(info.value)
    assert message.startswith("loss is nan at step 6; first parameter with a non-finite "
                              "gradient: features.0.weight (16, 1, 3, 3); first parameter "
                              "with a non-finite value: head.2.weight (10, 144)")
    assert message.endswith(f"last good checkpoint: {tmp_path / 'checkpoint.npz'} (step 4)")
    assert info.value.step == 6 and info.value.parameter == "features.0.weight"
    for name, value in param_copies(model).items():  # step 6 changed nothing
        np.testing.assert_array_equal(value, snapshot[name])
    saved = checkpoint.load(tmp_path / "checkpoint.npz")
    assert saved["step"] == 4 and all(np.isfinite(w).all() for w in saved["model"].values())


# --- broken checkpoints into a run: clear error, nothing changed --------------------------
def _run(mnist, model="seed", channels=16, opt="adam", batch_size=16, steps=2):
    """(model, optimizer, scheduler, loader) after `steps` training steps."""
    x, y = mnist
    loader = data.DataLoader(x[:64], y[:64], batch_size=batch_size, seed=0)
    net = (models.seed_net(channels=channels, rng=0) if model == "seed" else
           models.resnet(depth=8, rng=0))
    optimizer = (optim.Adam(net.parameters(), 1e-3) if opt == "adam" else
                 optim.SGD(net.parameters(), 0.01, momentum=0.9))
    sched = optim.OneCycleLR(optimizer, 1e-3, 8)
    with runtime.limit_threads(1):
        for _, (xb, yb) in zip(range(steps), loader):
            train.train_step(net, xb, yb, optimizer, sched)
    return net, optimizer, sched, loader


def _everything(job):
    net, optimizer, sched, loader = job
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": sched.state_dict(), "loader": loader.state_dict(),
            "lr": optimizer.lr}


def _write(job, path, hparams):
    checkpoint.save(run.training_state(*job, step=3, hparams=hparams), path)
    return path


def _truncated(mnist, path):
    raw = _write(_run(mnist, steps=3), path, {"model": "seed"}).read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


def _flipped(mnist, path):
    _write(_run(mnist, steps=3), path, {"model": "seed"})
    raw = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("model/features.2.weight.npy")
    raw[info.header_offset + 300] ^= 0x10  # one bit of a weight
    path.write_bytes(bytes(raw))


BROKEN = {  # how the file is made -> the error (this run: seed net, Adam, batch 16)
    "truncated": (_truncated, r"cannot read checkpoint .*ck\.npz"),
    "bit-flipped": (_flipped, r"member 'model/features\.2\.weight\.npy' is corrupted "
                              r"\(bad CRC-32\)"),
    "wrong model name": (lambda m, p: _write(_run(m), p, {"model": "rezero"}),
                         r"written with model='rezero' but this run has model='seed'"),
    "wrong architecture": (lambda m, p: _write(_run(m, model="resnet"), p, {}),
                           r"does not fit this run: load_state_dict\(Net\): missing keys "
                           r"\['features\.0\.weight'"),
    "wrong shape": (lambda m, p: _write(_run(m, channels=8), p, {}),
                    r"'features\.0\.weight' has shape \(8, 1, 3, 3\), the model expects "
                    r"\(16, 1, 3, 3\); nothing was loaded"),
    "wrong optimizer": (lambda m, p: _write(_run(m, opt="sgd"), p, {}),  # model part fits
                        r"Adam\.load_state_dict: unexpected key 'state\.0\.momentum_buffer'"),
    "wrong batching": (lambda m, p: _write(_run(m, batch_size=32), p, {}),  # model+opt fit
                       r"saved batch_size=32 but this loader has batch_size=16"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_changes_nothing(case, mnist, tmp_path):
    make, message = BROKEN[case]
    path = tmp_path / "ck.npz"
    make(mnist, path)
    job = _run(mnist)
    before = _everything(job)
    with pytest.raises(run.ResumeError, match=message):
        run.restore(path, *job, hparams={"model": "seed"})
    assert same(before, _everything(job))  # every parameter, moment, position, lr


def test_good_checkpoint_does_change_the_run(mnist, tmp_path):
    """The control for the test above: a fitting checkpoint from a later step loads."""
    path = _write(_run(mnist, steps=3), tmp_path / "ck.npz", {"model": "seed"})
    job = _run(mnist)
    before = _everything(job)
    assert run.restore(path, *job, hparams={"model": "seed"}) == 3
    assert not same(before, _everything(job))
    assert same(_everything(_run(mnist, steps=3)), _everything(job))
