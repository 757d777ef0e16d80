"""The example scripts (examples/*.py): each runs end to end in-process through main(argv) on a
few hundred real MNIST images and writes its CSV/JSON and PNG; plus the crossover detection
on synthetic curves, the moving average and the lesion's stand-in block."""
import csv
import importlib
import json
import sys

import numpy as np
import pytest

from conftest import REPO, TOL

sys.path.insert(0, str(REPO / "examples"))
C = importlib.import_module("_common")
grad_flow = importlib.import_module("grad_flow")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tiny(tmp_path, mnist_dir, *extra):
    """argv shared by the end-to-end runs: real MNIST, small subsets, no progress bars."""
    pytest.importorskip("matplotlib")
    return ["--data", str(mnist_dir), "--out", str(tmp_path), "--test-limit", "100",
            "--batch-size", "32", "--no-progress", *extra]


# --- crossover and moving average on synthetic curves ---------------------------------------
def test_moving_average_is_exact_on_lines_and_unbiased_at_the_ends():
    x = 3.0 + 0.5 * np.arange(20)
    ma = C.moving_average(x, 5)
    np.testing.assert_allclose(ma[2:-2], x[2:-2], **TOL["fwd_f64"])  # a line is its own mean
    np.testing.assert_allclose(ma[0], x[:3].mean(), **TOL["fwd_f64"])  # window cut at the end
    np.testing.assert_allclose(C.moving_average(np.full(7, 2.5), 50), 2.5, **TOL["fwd_f64"])
    np.testing.assert_array_equal(C.moving_average(x, 1), x)


def test_crossover_finds_the_smoothed_swap_not_the_first_noisy_one():
    steps = np.arange(1000)
    noise = np.tile([0.5, -0.25, -0.25], 334)[:1000]  # sums to 0 over any 3 (and 51) steps
    x_in = 0.2 + 1.8 * steps / 999 + noise  # the trend passes 1.0 after index 444
    x_res = np.ones(1000)
    assert np.flatnonzero(x_in > x_res)[0] < 200  # raw curves cross much earlier
    c = grad_flow.crossover(x_in, x_res, window=51)
    assert c == {"step": 446, "status": "crossed", "stays_above": True, "above_from": 446}


def test_crossover_reports_no_swap_a_swap_from_the_start_and_a_relapse():
    rng = np.random.default_rng(0)
    x_res = 1.0 + 0.1 * rng.random(500)
    below = 0.5 * x_res
    assert grad_flow.crossover(below, x_res, 50) == {"step": None, "status": "never",
                                                      "stays_above": False, "above_from": None}
    above = 2.0 * x_res
    assert grad_flow.crossover(above, x_res, 50) == {"step": None, "status": "from_start",
                                                      "stays_above": True, "above_from": 1}
    bump = np.where((np.arange(500) >= 200) & (np.arange(500) < 300), 2.0, 0.5) * x_res
    c = grad_flow.crossover(bump, x_res, 11)
    assert c["status"] == "crossed" and 190 < c["step"] <= 201 and not c["stays_above"]
    assert c["above_from"] is None
    relapse_then_up = np.where(np.arange(500) >= 400, 4.0, 1.0) * bump
    c = grad_flow.crossover(relapse_then_up, x_res, 11)
    assert c["step"] == grad_flow.crossover(bump, x_res, 11)["step"]
    assert 390 < c["above_from"] <= 401 and not c["stays_above"]
    with pytest.raises(ValueError, match="crossover"):
        grad_flow.crossover(below[:10], x_res, 5)


# --- the scripts end to end ------------------------------------------------------------------
def test_grad_flow_records_norms_per_step_for_each_seed(tmp_path, mnist_dir):
    summaries = grad_flow.main(tiny(tmp_path, mnist_dir, "--limit", "160", "--seeds", "0", "1",
                                    "--window", "3"))
    rows = read_csv(tmp_path / "grad_flow.csv")
    assert [(r["seed"], r["step"]) for r in rows] == [(s, str(i)) for s in "01"
                                                      for i in range(1, 6)]
    for key in ("x_in", "x_res", "loss"):
        assert all(np.isfinite(float(r[key])) and float(r[key]) > 0 for r in rows)
    saved = json.loads((tmp_path / "grad_flow.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1] and saved["config"]["lr"] == 3e-3
    assert saved["runs"][0]["crossover"] == summaries[0]["crossover"]
    assert (tmp_path / "grad_flow.png").stat().st_size > 0


def test_rezero_starts_with_no_gradient_into_the_block(tmp_path, mnist_dir):
    rezero = importlib.import_module("rezero")
    rezero.main(tiny(tmp_path, mnist_dir, "--limit", "96", "--seeds", "0", "--window", "3"))
    rows = read_csv(tmp_path / "grad_flow.csv")
    # alpha = 0 at the first forward: the block gets exactly zero gradient, the skip all of it
    assert float(rows[0]["x_in"]) == 0.0 and float(rows[0]["x_res"]) > 0
    assert float(rows[0]["alpha"]) != 0.0 and float(rows[1]["x_in"]) > 0
    assert (tmp_path / "grad_flow.png").exists()


def test_grad_flow_without_skip_records_only_the_block_input(tmp_path, mnist_dir):
    summaries = grad_flow.main(tiny(tmp_path, mnist_dir, "--limit", "64", "--seeds", "0",
                                    "--skip", "none", "--init", "pytorch"))
    rows = read_csv(tmp_path / "grad_flow.csv")
    assert len(rows) == 2 and all(float(r["x_in"]) > 0 and r["x_res"] == "" for r in rows)
    assert "crossover" not in summaries[0]


def test_pytorch_init_draws_uniform_weights_within_the_fan_in_bound():
    from minires import models
    model = models.seed_net(skip="residual", rng=0)
    grad_flow.pytorch_init(model, seed=1)
    w = model.head[2].weight.data  # Linear(144 -> 10)
    assert np.abs(w).max() <= 1 / 12 and np.abs(w).max() > 0.9 / 12
    np.testing.assert_allclose(w.std(), 1 / 12 / np.sqrt(3), rtol=0.05)  # U(-b, b): b/sqrt(3)


def test_depth_tabulates_plain_and_residual_nets(tmp_path, mnist_dir):
    depth = importlib.import_module("depth")
    depth.main(tiny(tmp_path, mnist_dir, "--depths", "1", "2", "--steps", "2"))
    rows = read_csv(tmp_path / "depth.csv")
    assert [(r["kind"], r["convs"]) for r in rows] == [
        ("plain", "3"), ("residual", "3"), ("plain", "5"), ("residual", "5")]
    assert all(0 <= float(r["test_accuracy"]) <= 1 and float(r["grad_first_init"]) > 0
               for r in rows)
    assert len(read_csv(tmp_path / "depth_curves.csv")) == 8
    assert (tmp_path / "depth.png").exists()


def test_removed_block_equals_a_block_whose_branch_outputs_zero():
    lesion = importlib.import_module("lesion")
    from minires import nn
    from minires.tensor import Tensor, no_grad
    x = Tensor(np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32))
    for block in (nn.BasicBlock(4, 4, rng=0), nn.BasicBlock(4, 8, stride=2, rng=0)):
        block.eval()
        bn = block.block[4]  # the branch's last BatchNorm: gamma = beta = 0 makes f(x) = 0
        bn.weight.data[...] = 0
        bn.bias.data[...] = 0
        with no_grad():
            np.testing.assert_allclose(lesion.Removed(block)(x).data, block(x).data,
                                       **TOL["fwd_f32"])


def test_lesion_removes_each_block_once(tmp_path, mnist_dir):
    lesion = importlib.import_module("lesion")
    lesion.main(tiny(tmp_path, mnist_dir, "--blocks", "1", "1", "--steps", "2"))
    rows = read_csv(tmp_path / "lesion.csv")
    assert [(r["model"], r["block"], r["kind"]) for r in rows] == [
        ("ResNet 1-1", "-1", "none"), ("ResNet 1-1", "0", "identity"),
        ("ResNet 1-1", "1", "projection"), ("plain net 2", "-1", "none"),
        ("plain net 2", "0", "plain"), ("plain net 2", "1", "plain")]
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    assert (tmp_path / "lesion.png").exists()


def test_activations_trains_saves_and_reloads_the_same_maps(tmp_path, mnist_dir):
    activations = importlib.import_module("activations")
    argv = tiny(tmp_path, mnist_dir, "--steps", "2", "--digits", "2", "--maps", "3")
    maps = activations.main(argv)
    labels = [label for label, _ in maps]
    assert "skip: after the skip" in labels and any("f(x)" in label for label in labels)
    assert all(a.shape[0] == 2 and a.ndim == 4 for _, a in maps)
    first = read_csv(tmp_path / "activations.csv")
    again = activations.main(argv + ["--checkpoint", str(tmp_path / "model.npz")])
    for (_, a), (_, b) in zip(maps, again):
        np.testing.assert_array_equal(a, b)
    assert read_csv(tmp_path / "activations.csv") == first
    assert (tmp_path / "activations.png").exists()


def test_resnet_mnist_reports_test_accuracy(tmp_path, mnist_dir):
    resnet_mnist = importlib.import_module("resnet_mnist")
    summary = resnet_mnist.main(tiny(tmp_path, mnist_dir, "--limit", "64", "--depth", "8"))
    saved = json.loads((tmp_path / "resnet_mnist.json").read_text())
    assert saved["steps"] == 2 and saved["test_accuracy"] == summary["test_accuracy"]
    assert len(read_csv(tmp_path / "metrics.csv")) == 2
    assert (tmp_path / "resnet_mnist.png").exists()
