"""bench/ (the `python -m bench` suite): the PyTorch twins of minires's models compute the same
losses from the same weights, and `python -m bench epoch` runs and reports what it promises,
with PyTorch, with --no-torch and without PyTorch installed."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from bench import epoch

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")


def _batch(n=8):
    rng = np.random.default_rng(3)
    return (rng.standard_normal((n, 1, 28, 28)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int64))


def _minires_loss(model, x, y):
    import minires.ops as F
    from minires.tensor import Tensor
    return F.cross_entropy(model(Tensor(x)), y)


@needs_torch
@pytest.mark.parametrize("name", sorted(epoch.RECIPES))
def test_torch_twin_matches_first_and_second_step_loss(name):
    """Same weights, same batch: same first-step loss to ~1e-5; after one step of the
    recipe's optimizer at its first scheduled lr, the same loss again (optimizer twin)."""
    from bench._torch_models import mirror
    recipe = epoch.RECIPES[name]
    ours = recipe["build"](0)
    theirs = mirror(torch, ours)
    assert [tuple(p.shape) for p in ours.parameters()] == \
        [tuple(p.shape) for p in theirs.parameters()]
    x, y = _batch()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lr = epoch._lr_values(recipe["run"], 100)[0]
    opt, _ = epoch._optimizer(recipe["run"], ours.parameters(), 100)
    opt.lr = lr
    topt = epoch._torch_optimizer(torch, recipe["run"], theirs.parameters(), lr)
    ours.train()
    theirs.train()
    losses = []
    for _ in range(2):
        loss = _minires_loss(ours, x, y)
        ours.zero_grad()
        loss.backward()
        opt.step()
        tloss = torch.nn.functional.cross_entropy(theirs(xt), yt)
        topt.zero_grad(set_to_none=True)
        tloss.backward()
        topt.step()
        losses.append((loss.item(), tloss.item()))
    (a1, b1), (a2, b2) = losses
    assert abs(a1 - b1) <= 1e-5 * max(1.0, abs(b1)), losses
    assert abs(a2 - b2) <= 1e-4 * max(1.0, abs(b2)), losses
    assert a2 != a1  # the step changed the weights


def test_mirror_rejects_unknown_layer():
    pytest.importorskip("torch")
    from bench._torch_models import mirror
    from minires import nn
    with pytest.raises(TypeError, match="Dropout"):
        mirror(torch, nn.Sequential(nn.Dropout(0.5)))


def test_first_batches_are_the_full_epochs_first():
    images = np.arange(300 * 28 * 28, dtype=np.int64).reshape(300, 28, 28).astype(np.uint8)
    labels = np.arange(300) % 10
    full = epoch.data.DataLoader(images, labels, batch_size=64, seed=5)
    cut = epoch._FirstBatches(images, labels, batch_size=64, seed=5, steps=2)
    assert len(cut) == 2 and len(full) == 5
    got, want = list(cut), list(full)[:2]
    assert len(got) == 2 and cut.epoch == 1  # the epoch ends after 2 batches
    for (gx, gy), (wx, wy) in zip(got, want):
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)


def test_verdict_flags_nan_and_chance_accuracy_only_after_enough_steps():
    row = dict(diverged=None, test_loss=2.3, test_accuracy=0.1)
    assert epoch._verdict(row, epoch.ACCURACY_CHECK_STEPS - 1) is None
    assert "accuracy" in epoch._verdict(row, epoch.ACCURACY_CHECK_STEPS)
    assert "nan" in epoch._verdict(dict(row, test_loss=math.nan, test_accuracy=0.9), 2)
    assert epoch._verdict(dict(row, diverged="loss nan at step 3"), 2) == "loss nan at step 3"
    assert epoch._verdict(dict(row, test_accuracy=0.9), 10_000) is None


def _bench(mnist_dir, *args, env=None):
    env = {**os.environ, "MINIRES_DATA": str(mnist_dir), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bench", "epoch", "--steps", "2",
                           "--rounds", "1", "--test-limit", "500", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def _check_result(out, sides):
    result = json.loads(out)  # ONE JSON object, nothing else on stdout
    assert result["command"] == "epoch" and result["model"] == "seed"
    assert result["steps"] == 2 and result["batch"] == 64 and result["test_images"] == 500
    assert result["vector_isa"] and result["sgemm_gflops"] > 0
    assert result["threads"]["minires"] >= 1
    assert [r["side"] for r in result["rounds"]] == sides
    for r in result["rounds"]:
        assert r["steps"] == 2 and r["images"] == 128 and r["train_s"] > 0
        assert 0 <= r["test_accuracy"] <= 1 and r["verdict"] is None
        assert r["images_per_s"] > 0 and 0 < r["cpu_busy"]
    assert result["best"]["minires"]["train_s"] > 0
    return result


def test_epoch_json_no_torch(mnist_dir):
    proc = _bench(mnist_dir, "--json", "--model", "seed", "--no-torch")
    assert proc.returncode == 0, proc.stderr
    result = _check_result(proc.stdout, ["minires"])
    assert result["ratio"] is None and "--no-torch" in result["ratio_note"]
    assert result["best"]["torch"] is None and result["threads"]["torch"] is None


def test_epoch_without_torch_installed(mnist_dir, tmp_path):
    """A `torch` that fails to import stands for PyTorch not being installed: the minires
    side runs and the output says why there is no comparison."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('hidden by a test')\n")
    proc = _bench(mnist_dir, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch not installed" in proc.stdout and "minires/PyTorch n/a" in proc.stdout
    assert "best minires" in proc.stdout and "best PyTorch" not in proc.stdout


@needs_torch
def test_epoch_json_with_torch(mnist_dir):
    proc = _bench(mnist_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    result = _check_result(proc.stdout, ["minires", "torch"])
    assert result["ratio"] > 0 and result["ratio_note"] is None
    # same weights, batches and lr schedule: after 2 steps both sides score alike
    ours, theirs = (result["best"][s]["test_accuracy"] for s in ("minires", "torch"))
    assert abs(ours - theirs) <= 0.02


def test_epoch_cuda_without_gpu_is_one_line_exit_2(mnist_dir):
    from minires import backend
    if backend.cupy_available():
        pytest.skip("a GPU is present")
    proc = _bench(mnist_dir, "--device", "cuda", "--no-torch")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "error" in proc.stderr and not proc.stdout


def test_epoch_usage_errors():
    from bench.__main__ import parse
    with pytest.raises(SystemExit):
        parse(["epoch", "--batch", "64", "256"])
    with pytest.raises(SystemExit):
        parse(["epoch", "--steps", "0"])
    args = parse(["epoch"])
    assert args.rounds == 2 and args.batch == [64] and args.model == "seed"
    assert parse(["step"]).batch == [64, 256] and parse([]).rounds == 3
