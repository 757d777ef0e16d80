"""Checkpoint files: round trip, atomic writes (failed writes keep the previous file and leave no
temp file), and refusal of pickles, object arrays, lying headers, damage and oversized members;
minires.load never unpickles."""
import errno
import os
import pickle
import tempfile
import zipfile

import numpy as np
import pytest

from helpers import fail_on, same
from minires import checkpoint, cli


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


def test_sizes_are_checked_before_any_data_is_read(tmp_path, rng, monkeypatch):
    """Reader reads only the index and the .npy headers: outline() has each array's
    declared shape and dtype; a total over max_bytes is refused naming the member."""
    path = tmp_path / "ck.npz"
    checkpoint.save(_sample(rng), path)
    reads = []
    real = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: reads.append(1) or
                        real(*a, **k))
    with checkpoint.Reader(path) as reader:
        outline = reader.outline()
        assert len(reads) == 1  # the JSON index only
        assert outline["model"]["conv1.weight"] == ((4, 1, 3, 3), np.dtype(np.float32))
        assert outline["step"] == 12 and outline["name"] == "seed"
        loaded = reader.load()
    np.testing.assert_array_equal(loaded["model"]["fc.bias"], np.zeros(10))
    with pytest.raises(ValueError, match=r"ck\.npz: member '.*' takes the declared size to "
                                         r"\d+ bytes, over the limit of 1000 \(max_bytes\)"):
        checkpoint.load(path, max_bytes=1000)


# --- checkpoint writes that fail ----------------------------------------------------------
def _state(rng):
    return {"step": 1, "w": rng.standard_normal((4, 3)), "m": {"b": np.arange(5)}}


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
    fail_on(monkeypatch, target, attr, exc, after)
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


# --- hostile and broken files -------------------------------------------------------------
class _Marker:
    """Unpickling this creates the file at `path`: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _live_payload_check(make, load, tmp_path):
    """The hostile payload really runs code when loaded carelessly (so the test can fail)."""
    probe = tmp_path / "probe-marker"
    path = make(_Marker(probe), tmp_path / "probe.npz")
    load(path)
    assert probe.exists()


def _pickle_file(marker, path):
    path.write_bytes(pickle.dumps({"model": marker}))
    return path


def _object_npz(marker, path):
    np.savez(path, w=np.ones(2), bad=np.array([marker], dtype=object))  # pickles the array
    return path


def _pickle_member(marker, path):
    """A zip whose member is named like an array but holds a pickle."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__minires__.npy", pickle.dumps(marker))
    return path


HOSTILE = {  # builder, careless loader (proves the payload is live), expected error
    "pickle renamed .npz": (_pickle_file, lambda p: pickle.loads(p.read_bytes()),
                            r"not an \.npz \(zip\) archive; pickles .* refused"),
    "object array in .npz": (_object_npz, lambda p: np.load(p, allow_pickle=True)["bad"],
                             r"member 'bad\.npy' is an object array; refused"),
    "pickle as .npy member": (_pickle_member,
                              lambda p: pickle.loads(zipfile.ZipFile(p).read("__minires__.npy")),
                              r"the magic string is not correct"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_load_never_unpickles(case, tmp_path, capsys):
    make, careless, message = HOSTILE[case]
    _live_payload_check(make, careless, tmp_path)
    marker = tmp_path / "marker"
    path = make(_Marker(marker), tmp_path / "evil.npz")
    with pytest.raises(ValueError, match=rf"minires.load: .*evil\.npz: {message}"):
        checkpoint.load(path)
    assert cli.main(["train", "--resume", str(path)]) == 2  # the CLI's way in
    assert "evil.npz" in capsys.readouterr().err
    assert not marker.exists()


def test_npy_header_that_lies_about_its_size(tmp_path):
    path = tmp_path / "ck.npz"
    checkpoint.save({"w": np.arange(6.0)}, path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["w.npy"] = members["w.npy"].replace(b"(6,)", b"(9,)")  # claims 9 values
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    with pytest.raises(ValueError, match=r"member 'w\.npy' declares \(9,\) float64 \(200 "
                                         r"bytes\) but holds 176 bytes"):
        checkpoint.load(path)


def test_every_single_bit_flip_is_caught_or_harmless(tmp_path, rng):
    """Flip one bit of every byte of a small checkpoint (bit i % 8 of byte i): load either
    raises a ValueError naming the file or returns exactly the original content (a flip in a
    field zip ignores, e.g. a timestamp) -- never different data."""
    path, bad = tmp_path / "ck.npz", tmp_path / "flipped.npz"
    checkpoint.save({"w": rng.standard_normal((3, 4)).astype(np.float32), "step": 3}, path)
    raw, original = path.read_bytes(), checkpoint.load(path)
    outcomes = {"error": 0, "same": 0}
    for i in range(len(raw)):
        damaged = bytearray(raw)
        damaged[i] ^= 1 << (i % 8)
        bad.write_bytes(damaged)
        try:
            got = checkpoint.load(bad)
        except ValueError as err:
            assert "flipped.npz" in str(err)
            outcomes["error"] += 1
        else:
            assert same(original, got), i
            outcomes["same"] += 1
    assert outcomes["error"] > 0.75 * len(raw), outcomes  # data, CRCs, sizes, names checked
