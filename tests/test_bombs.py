"""Decompression bombs (issue 15 item 8): a small MNIST .gz or checkpoint .npz that inflates to
gigabytes is refused with the usual one-line error, checked before it is inflated, in a
subprocess whose address space is capped a few hundred MB above what its imports use. Each
bomb is shown to be live first: a careless loader runs out of memory on it under that cap."""
import gzip
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest

from conftest import REPO
from minires import checkpoint, cli, data

MiB = 1 << 20
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc: Linux")

# Runs `body` with the address space capped at CAP bytes above the current size.
CAPPED = r"""
import gzip, resource, sys
import numpy as np
from minires import checkpoint, cli, data

size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + {cap}, size + {cap}))
path = sys.argv[1]
try:
    {careless}
    print("careless: loaded")
except MemoryError:
    print("careless: MemoryError")
{body}
"""


def _capped(path, cap, careless, body, *args):
    code = CAPPED.format(cap=cap, careless=careless, body=body)
    env = dict(os.environ, PYTHONPATH=str(REPO), NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, str(path), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout, out.stderr


def _zeros_deflate(prefix, total):
    """A raw deflate stream of `prefix` then zeros, `total` bytes in all, built from one
    compressed MiB repeated (full flushes make the pieces independent): cheap to build.
    Returns (stream, crc32 of the inflated bytes)."""
    c, zeros = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(MiB)
    head = prefix + bytes(MiB - len(prefix))
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    piece = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    n = total // MiB - 1
    crc = zlib.crc32(head)
    for _ in range(n):
        crc = zlib.crc32(zeros, crc)
    return first + piece * n + c.flush(), crc


def _write_zip(path, members):
    """A zip of (name, method, data, crc, inflated size) members, written by hand so that a
    deflated member can be given as an already compressed stream."""
    body, directory = bytearray(), bytearray()
    for name, method, payload, crc, size in members:
        raw = name.encode()
        directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0,
                                 crc, len(payload), size, len(raw), 0, 0, 0, 0, 0, len(body)) + raw
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(payload),
                            size, len(raw), 0) + raw + payload
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members),
                      len(directory), len(body), 0)
    path.write_bytes(bytes(body + directory + end))
    return path


def _npy_header(shape, dtype="<f4"):
    """The .npy (1.0) header of an array of this shape and dtype, padded as NumPy pads it."""
    text = repr({"descr": dtype, "fortran_order": False, "shape": shape})
    pad = 64 - (10 + len(text) + 1) % 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + pad + 1) + \
        (text + " " * pad + "\n").encode()


@pytest.fixture(scope="module")
def training_checkpoint(mnist_dir, tmp_path_factory):
    """A real `minires train` checkpoint (64 images, one step): its members, as stored."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--limit", "64", "--batch-size", "64", "--data", str(mnist_dir), "--out",
            str(out), "--threads", "1"]
    assert cli.main(argv) == 0
    with zipfile.ZipFile(out / "checkpoint.npz") as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _bomb_checkpoint(path, members, size):
    """The training checkpoint with model/features.0.weight.npy replaced by a deflated
    float32 vector of `size` bytes in all (header included): a few hundred KB on disk."""
    name = "model/features.0.weight.npy"
    header = _npy_header(((size - 128) // 4,))
    assert len(header) == 128
    stream, crc = _zeros_deflate(header, size)
    entries = [(n, 0, raw, zlib.crc32(raw), len(raw)) for n, raw in members.items() if n != name]
    _write_zip(path, entries + [(name, 8, stream, crc, size)])
    return path, sum(e[4] for e in entries) + size  # the bomb comes last


def test_checkpoint_bomb_over_the_limit_is_refused_by_load(training_checkpoint, tmp_path):
    size = checkpoint.MAX_BYTES + 256 * MiB
    path, total = _bomb_checkpoint(tmp_path / "bomb.npz", training_checkpoint, size)
    assert path.stat().st_size < 2 * MiB
    careless = 'np.load(path)["model/features.0.weight"]'
    body = ("try:\n    checkpoint.load(path)\nexcept ValueError as err:\n    print(err)")
    code, out, err = _capped(path, 384 * MiB, careless, body)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "careless: MemoryError"
    assert lines[1] == (f"minires.load: cannot read checkpoint {path}: member 'model/features."
                        f"0.weight.npy' takes the declared size to {total} bytes, over the "
                        f"limit of {checkpoint.MAX_BYTES} (max_bytes)")


def test_resume_from_a_bomb_compares_shapes_before_reading(training_checkpoint, mnist_dir,
                                                           tmp_path):
    """Under the size limit, but not this model's shape: refused before any data is read."""
    size = 640 * MiB
    path, _ = _bomb_checkpoint(tmp_path / "bomb.npz", training_checkpoint, size)
    careless = 'np.load(path)["model/features.0.weight"]'
    body = ("sys.exit(cli.main(['train', '--resume', path, '--data', sys.argv[2], "
            "'--threads', '1', '--out', sys.argv[3]]))")
    code, out, err = _capped(path, 384 * MiB, careless, body, str(mnist_dir),
                             str(tmp_path / "out"))
    assert out.splitlines()[0] == "careless: MemoryError"
    assert code == 2, err
    n = (size - 128) // 4
    assert err.strip().splitlines() == [
        f"minires train: error: resume: {path} does not fit this run: load_state_dict: "
        f"'features.0.weight' has shape ({n},), the model expects (16, 1, 3, 3); nothing was "
        f"loaded"]


def _gzip_bomb(path, header, total):
    """A .gz of `header` then zeros, `total` bytes inflated, as concatenated gzip members
    (one compressed MiB repeated): about total / 1000 bytes on disk."""
    zeros = gzip.compress(bytes(MiB), compresslevel=9)
    first = gzip.compress(header + bytes(MiB - len(header)), compresslevel=9)
    path.write_bytes(first + zeros * (total // MiB - 1))
    return path


def test_mnist_bomb_is_refused_after_inflating_what_mnist_holds(tmp_path):
    """A train-images file whose header is right (60,000 28x28 images) but which inflates to
    1 GiB: refused after the 47 MB the header promises, before any MD5 could be checked."""
    header = struct.pack(">IIII", 2051, 60000, 28, 28)
    path = _gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz", header, 1024 * MiB)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    assert path.stat().st_size < 2 * MiB
    careless = "gzip.decompress(open(path, 'rb').read())"
    body = ("try:\n    data.load_mnist('train', root=sys.argv[2], download=False)\n"
            "except data.MnistError as err:\n    print(err)")
    code, out, err = _capped(path, 256 * MiB, careless, body, str(tmp_path))
    assert code == 0, err
    assert out.splitlines() == [
        "careless: MemoryError",
        f"MNIST file {path}: header says 60000 items (47040016 bytes) but the file holds more"]


def test_mnist_bomb_of_zeros_is_refused_after_its_header(tmp_path, monkeypatch):
    """All zeros: the magic number is wrong, and only the first bytes were inflated."""
    path = _gzip_bomb(tmp_path / "t10k-labels-idx1-ubyte.gz", b"", 512 * MiB)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(path.read_bytes())
    reads = []
    real = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, n=-1: reads.append(n) or
                        real(self, n))
    with pytest.raises(data.MnistError, match=r"t10k-images-idx3-ubyte\.gz: magic number 0, "
                                              r"expected 2051 \(images file\)$"):
        data.load_mnist("test", root=tmp_path, download=False)
    assert reads == [16]  # the IDX header, nothing more
