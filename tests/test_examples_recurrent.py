"""examples/residual_lstm.py and examples/superres.py: end to end on a tiny MNIST subset, and the
superres resampling helpers against closed forms (and PyTorch where installed)."""
import csv
import importlib.util
import math

import numpy as np
import pytest

from conftest import REPO, tol

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_residual_lstm_end_to_end(tmp_path, mnist_dir):
    example = load_example("residual_lstm")
    summary = example.main(["--data", str(mnist_dir), "--limit", "256", "--steps", "3",
                            "--batch-size", "32", "--hidden", "8", "--layers", "2",
                            "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "residual_lstm.csv")
    assert [(r["variant"], int(r["step"])) for r in rows] == \
        [(v, s) for v in ("plain", "residual") for s in (1, 2, 3)]
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r["grad_first"]) > 0
    # the first step sees the same batch from the same weights: only the skips differ
    assert rows[0]["loss"] != rows[3]["loss"]
    table = {r["variant"]: r for r in read_csv(tmp_path / "residual_lstm_summary.csv")}
    for name in ("plain", "residual"):
        assert float(table[name]["test_accuracy"]) == pytest.approx(summary[name]["accuracy"])
        assert 0 <= summary[name]["accuracy"] <= 1
    assert (tmp_path / "residual_lstm.png").read_bytes()[:8] == PNG_MAGIC


def test_superres_end_to_end(tmp_path, mnist_dir):
    example = load_example("superres")
    psnrs = example.main(["--data", str(mnist_dir), "--limit", "256", "--steps", "2",
                          "--batch-size", "32", "--hidden", "4", "--depth", "3",
                          "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "superres.csv")
    assert [(r["variant"], int(r["step"])) for r in rows] == \
        [(v, s) for v in ("full", "residual") for s in (1, 2)]
    table = {r["variant"]: float(r["test_psnr_db"])
             for r in read_csv(tmp_path / "superres_summary.csv")}
    assert table == pytest.approx(psnrs) and set(table) == {"upscale", "full", "residual"}
    assert all(math.isfinite(v) and v > 0 for v in table.values())
    assert (tmp_path / "superres.png").read_bytes()[:8] == PNG_MAGIC


def test_superres_resampling_closed_form():
    example = load_example("superres")
    x = np.array([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)
    up = example.upscale(x, "bilinear")
    # pixel centres: output 0..3 sit at input -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped)
    row = np.array([0.0, 0.25, 0.75, 1.0])
    expected = row[None, :] + 2 * row[:, None]
    np.testing.assert_allclose(up[0, 0], expected, **tol("fwd_f64"))
    np.testing.assert_array_equal(example.upscale(x, "nearest")[0, 0],
                                  [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    np.testing.assert_allclose(example.downscale(up), [[[[0.375, 1.125], [1.875, 2.625]]]],
                               **tol("fwd_f64"))
    pred = np.full((2, 1, 2, 2), 0.5)
    np.testing.assert_allclose(example.psnr(pred, pred - 0.1), [20.0, 20.0], **tol("fwd_f64"))
    losses = [(1, 5.0), (2, 1.0), (3, 0.5), (4, 0.1)]
    assert example.first_step_below(losses, 1.0, k=2) == 3  # trailing means 5, 3, 0.75
    assert example.first_step_below(losses, 2.0, k=1) == 2
    assert example.first_step_below(losses, 0.01) is None


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_superres_upscale_matches_torch(rng, mode):
    torch = pytest.importorskip("torch")
    example = load_example("superres")
    x = rng.standard_normal((2, 1, 7, 5))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=2, mode=mode,
                                             **({"align_corners": False}
                                                if mode == "bilinear" else {}))
    np.testing.assert_allclose(example.upscale(x, mode), theirs.numpy(), **tol("fwd_f64"))
    np.testing.assert_allclose(example.downscale(x[..., :6, :4]),
                               torch.nn.functional.avg_pool2d(
                                   torch.from_numpy(x[..., :6, :4]), 2).numpy(),
                               **tol("fwd_f64"))
