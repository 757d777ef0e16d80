"""Checkpoint files: round trip, atomic writes, and refusal of pickles/object arrays/damage."""
import os
import pickle
import zipfile

import numpy as np
import pytest

from minires import checkpoint


def _sample(rng):
    return {
        "model": {"conv1.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                  "fc.bias": np.zeros(10, np.float64)},
        "optimizer": {"state": {0: {"m": np.arange(6).reshape(2, 3), "t": 7}},
                      "groups": [{"lr": 2.5e-3, "betas": (0.9, 0.999)}]},
        "step": 12, "loss": float("nan"), "done": False, "name": "seed", "note": None,
        "rng": np.random.default_rng(3).bit_generator.state,  # 128-bit Python ints inside
        "scalar": np.float32(1.5), "empty": np.zeros((0, 3), np.int32),
        "flags": np.array([True, False]), "text": np.array(["a", "bc"]),
    }


def _assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b)
    else:
        assert a == b


def test_round_trip(tmp_path, rng):
    obj = _sample(rng)
    path = tmp_path / "ck.npz"
    checkpoint.save(obj, path)
    back = checkpoint.load(path)
    obj["scalar"] = np.asarray(obj["scalar"])  # NumPy scalars come back as 0-d arrays
    _assert_same(obj, back)
    with np.load(path, allow_pickle=False) as npz:  # a plain .npz with flattened keys
        assert "model/conv1.weight" in npz.files and "optimizer/state/0/m" in npz.files
        np.testing.assert_array_equal(npz["model/fc.bias"], np.zeros(10))
    assert sorted(os.listdir(tmp_path)) == ["ck.npz"]  # no temp file left behind


def test_save_rejects_unsupported_values(tmp_path):
    path = tmp_path / "ck.npz"
    with pytest.raises(TypeError, match="'a/b' is an object array"):
        checkpoint.save({"a": {"b": np.array([1, "x", None], dtype=object)}}, path)
    with pytest.raises(TypeError, match="'f' has type set"):
        checkpoint.save({"f": {1}}, path)
    with pytest.raises(ValueError, match="contains '/'"):
        checkpoint.save({"a/b": 1}, path)
    with pytest.raises(ValueError, match="same key '1'"):
        checkpoint.save({1: np.ones(1), "1": np.ones(1)}, path)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    checkpoint.save({"step": 1, "w": np.ones(3)}, path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"step": 2, "w": np.zeros(3)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", crash)  # dies at the rename instead
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"step": 3, "w": np.zeros(3)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]
    assert checkpoint.load(path)["step"] == 1


class _Boom:
    """Unpickling this would run code: the test fails if it ever does."""

    def __reduce__(self):
        return (pytest.fail, ("pickle was executed",))


def test_refuses_pickle_renamed_npz(tmp_path):
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"model": _Boom()}))
    with pytest.raises(ValueError, match=r"evil\.npz.*not an \.npz"):
        checkpoint.load(path)


def test_refuses_object_array(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, w=np.ones(2), bad=np.array([_Boom()], dtype=object))
    with pytest.raises(ValueError, match=r"obj\.npz.*[Oo]bject array"):
        checkpoint.load(path)


def test_refuses_truncated_and_foreign_files(tmp_path, rng):
    path = tmp_path / "ck.npz"
    checkpoint.save(_sample(rng), path)
    raw = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz"):
        checkpoint.load(cut)
    flipped = bytearray(raw)
    member = zipfile.ZipFile(path).getinfo("model/conv1.weight.npy")
    flipped[member.header_offset + 200] ^= 0xFF  # inside that member's data: CRC mismatch
    bad = tmp_path / "crc.npz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"crc\.npz.*CRC"):
        checkpoint.load(bad)
    plain = tmp_path / "plain.npz"
    np.savez(plain, w=np.ones(2))
    with pytest.raises(ValueError, match=r"plain\.npz is not a minires checkpoint"):
        checkpoint.load(plain)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.npz")


def test_device_arrays_saved_via_host_copies(xp, tmp_path):
    w = xp.arange(6, dtype=xp.float32).reshape(2, 3)
    checkpoint.save({"w": w, "step": 1}, tmp_path / "ck.npz")
    back = checkpoint.load(tmp_path / "ck.npz")
    assert type(back["w"]) is np.ndarray and back["w"].dtype == np.float32
    np.testing.assert_array_equal(back["w"], np.arange(6).reshape(2, 3))
