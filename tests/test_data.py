"""MNIST loading (real files from the mnist_dir fixture), validation, download, DataLoader."""
import functools
import gzip
import http.server
import re
import shutil
import threading

import numpy as np
import pytest

from minires import backend, data

NAMES = [n for pair in data.FILES.values() for n in pair]


def _copy_split(src, dst, split="test"):
    dst.mkdir(exist_ok=True)
    for name in data.FILES[split]:
        shutil.copy(src / name, dst / name)
    return dst


def _rewrite(path, transform):
    """Replace path's gzip payload by transform(payload) (a well-formed gzip again)."""
    body = bytearray(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(bytes(transform(body)), compresslevel=1))


def test_load_mnist_shapes_dtypes_and_first_labels(mnist_dir):
    images, labels = data.load_mnist("train", root=mnist_dir)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    # Histogram and pixel mean from the data folder's README (independent parse).
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                            5851, 5949]
    assert round(float(images.mean()), 4) == 33.3184
    images, labels = data.load_mnist("test", root=mnist_dir)
    assert images.shape == (10000, 28, 28)
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_root_from_environment(mnist_dir, monkeypatch):
    monkeypatch.setenv("MINIRES_DATA", str(mnist_dir))
    assert data.default_root() == mnist_dir
    assert data.load_mnist("test")[1][:3].tolist() == [7, 2, 1]
    monkeypatch.delenv("MINIRES_DATA")
    assert data.default_root().parts[-3:] == (".cache", "minires", "mnist")


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("valid")


def test_md5_mismatch_names_file(mnist_dir, tmp_path):
    root = _copy_split(mnist_dir, tmp_path)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    _rewrite(labels, lambda b: b[:-1] + bytes([(b[-1] + 1) % 10]))  # one label changed
    with pytest.raises(data.MnistError, match=r"t10k-labels-idx1-ubyte\.gz: MD5"):
        data.load_mnist("test", root=root)


def test_wrong_magic(mnist_dir, tmp_path):
    root = _copy_split(mnist_dir, tmp_path)
    images = root / "t10k-images-idx3-ubyte.gz"
    _rewrite(images, lambda b: b"\x00\x00\x08\x01" + b[4:])  # a labels magic in an images file
    with pytest.raises(data.MnistError, match="t10k-images.*magic number 2049, expected 2051"):
        data.load_mnist("test", root=root)


def test_count_does_not_match_size(mnist_dir, tmp_path):
    root = _copy_split(mnist_dir, tmp_path)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    _rewrite(labels, lambda b: b[:-5])  # header still says 10000 labels
    with pytest.raises(data.MnistError, match="header says 10000 items .* holds 10003 bytes"):
        data.load_mnist("test", root=root)


def test_truncated_gzip(mnist_dir, tmp_path):
    root = _copy_split(mnist_dir, tmp_path)
    images = root / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100000])
    with pytest.raises(data.MnistError, match="t10k-images-idx3-ubyte.gz is unreadable or trunc"):
        data.load_mnist("test", root=root)


def test_image_and_label_counts_must_agree(mnist_dir, tmp_path, monkeypatch):
    root = _copy_split(mnist_dir, tmp_path)
    monkeypatch.delitem(data.MD5, "t10k-labels-idx1-ubyte.gz")  # let a re-counted file pass
    _rewrite(root / "t10k-labels-idx1-ubyte.gz",
             lambda b: (9999).to_bytes(4, "big").join([b[:4], b[8:-1]]))
    with pytest.raises(data.MnistError, match="10000 images but .* 9999 labels"):
        data.load_mnist("test", root=root)


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over tmp_path/'srv'; yields (folder, base URL)."""
    folder = tmp_path / "srv"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_mirror(mnist_dir, tmp_path, server, monkeypatch):
    folder, url = server
    _copy_split(mnist_dir, folder)
    # The first mirror is down (nothing listens there); the second serves the real files.
    monkeypatch.setattr(data, "MIRRORS", ["http://127.0.0.1:9/", url])
    root = tmp_path / "cache" / "mnist"
    images, labels = data.load_mnist("test", root=root)
    assert images.shape == (10000, 28, 28) and labels[:3].tolist() == [7, 2, 1]
    assert sorted(p.name for p in root.iterdir()) == sorted(data.FILES["test"])
    for name in data.FILES["test"]:
        assert (root / name).read_bytes() == (mnist_dir / name).read_bytes()


def test_corrupted_download_leaves_no_file(mnist_dir, tmp_path, server, monkeypatch):
    folder, url = server
    _copy_split(mnist_dir, folder)
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-10])
    monkeypatch.setattr(data, "MIRRORS", [url])
    root = tmp_path / "cache"
    with pytest.raises(data.MnistError) as info:
        data.load_mnist("test", root=root)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "MD5" in message
    assert "--data" in message and "MINIRES_DATA" in message and str(root) in message
    # The good labels file may arrive; the bad images file and its temp file must not.
    assert [p.name for p in root.iterdir()] in ([], ["t10k-labels-idx1-ubyte.gz"])


def test_offline_single_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MIRRORS", ["http://127.0.0.1:9/", "http://127.0.0.1:9/x/"])
    with pytest.raises(data.MnistError) as info:
        data.load_mnist("train", root=tmp_path)
    message = str(info.value)
    for url in data.MIRRORS:  # both mirrors reported, in one error
        assert f"{url}train-images-idx3-ubyte.gz: " in message
    assert "--data" in message and "MINIRES_DATA" in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(data.MnistError, match="download=False"):
        data.load_mnist("train", root=tmp_path, download=False)


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10)


def test_loader_normalises_and_batches(small):
    images, labels = small
    loader = data.DataLoader(images, labels, batch_size=4, shuffle=False)
    assert len(loader) == 3
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 1, 28, 28)] * 2 + [(2, 1, 28, 28)]
    x, y = batches[0]
    assert x.dtype == np.float32 and y.dtype == np.int64 and y.tolist() == [0, 1, 2, 3]
    expected = (images[:4, None].astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    assert len(data.DataLoader(images, labels, batch_size=4, drop_last=True)) == 2
    assert len(list(data.DataLoader(images, labels, batch_size=4, drop_last=True))) == 2


def test_loader_shuffle_deterministic_per_epoch(small):
    images, labels = small
    a = data.DataLoader(images, labels, batch_size=3, seed=7)
    b = data.DataLoader(images, labels, batch_size=3, seed=7)
    epoch0 = [y.tolist() for _, y in a]
    epoch1 = [y.tolist() for _, y in a]
    assert epoch0 == [y.tolist() for _, y in b]
    assert epoch1 == [y.tolist() for _, y in b]
    assert epoch0 != epoch1  # a fresh order each epoch
    assert sorted(sum(epoch0, [])) == list(range(10))
    c = data.DataLoader(images, labels, batch_size=3, seed=8)
    assert [y.tolist() for _, y in c] != epoch0


def test_loader_resumes_exact_batches(small):
    images, labels = small
    straight = data.DataLoader(images, labels, batch_size=3, seed=1)
    expected = [y.tolist() for _ in range(3) for _, y in straight]
    first = data.DataLoader(images, labels, batch_size=3, seed=1)
    seen = [y.tolist() for _, y in first]
    for i, (_, y) in enumerate(first):  # stop after two batches of epoch 1
        seen.append(y.tolist())
        if i == 1:
            break
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    resumed = data.DataLoader(images, labels, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    seen += [y.tolist() for _, y in resumed] + [y.tolist() for _, y in resumed]
    assert seen == expected
    # The end of an epoch is saved as the start of the next one.
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["batch"] == 0


def test_loader_refuses_mismatched_state(small):
    images, labels = small
    state = data.DataLoader(images, labels, batch_size=3, seed=1).state_dict()
    other = data.DataLoader(images, labels, batch_size=4, seed=1)
    with pytest.raises(ValueError, match="batch_size=3 .* batch_size=4"):
        other.load_state_dict(state)


def test_loader_bad_input(small):
    images, labels = small
    with pytest.raises(ValueError, match="DataLoader: expected images"):
        data.DataLoader(images, labels[:5])
    with pytest.raises(TypeError, match="uint8"):
        data.DataLoader(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="unknown device"):
        data.DataLoader(images, labels, device="tpu")


def test_loader_batches_land_on_the_device(xp, small):
    images, labels = small
    device = "cpu" if xp is np else "cuda"
    host = list(data.DataLoader(images, labels, batch_size=4, seed=3))
    moved = list(data.DataLoader(images, labels, batch_size=4, seed=3, device=device))
    for (hx, hy), (x, y) in zip(host, moved):
        assert isinstance(x, xp.ndarray) and isinstance(y, xp.ndarray)
        np.testing.assert_array_equal(hx, backend.to_device(x, "cpu"))
        np.testing.assert_array_equal(hy, backend.to_device(y, "cpu"))


# --- damaged MNIST files ------------------------------------------------------------------
def _gz(transform):
    def apply(path):
        body = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(transform(body), compresslevel=1))
    return apply


MNIST_DAMAGE = {  # (file, damage, expected message after "MNIST file <path>")
    "empty file": ("t10k-labels-idx1-ubyte.gz", lambda p: p.write_bytes(b""),
                   r": 0 bytes is too short for an IDX header"),
    "not gzip": ("t10k-labels-idx1-ubyte.gz",
                 lambda p: p.write_bytes(gzip.decompress(p.read_bytes())),
                 r" is unreadable or truncated .*Not a gzipped file"),
    "gzip cut short": ("t10k-images-idx3-ubyte.gz",
                       lambda p: p.write_bytes(p.read_bytes()[:-20]),
                       r" is unreadable or truncated"),
    "header only": ("t10k-images-idx3-ubyte.gz", _gz(lambda b: b[:12]),
                    r": 12 bytes is too short for an IDX header"),
    "wrong magic": ("t10k-labels-idx1-ubyte.gz", _gz(lambda b: b"\0\0\x08\x03" + b[4:]),
                    r": magic number 2051, expected 2049 \(labels file\)"),
    "wrong image size": ("t10k-images-idx3-ubyte.gz",
                         _gz(lambda b: b[:8] + (32).to_bytes(4, "big") + b[12:]),
                         r": images are 32x28, expected 28x28"),
    "content truncated": ("t10k-images-idx3-ubyte.gz", _gz(lambda b: b[:-784]),
                          r": header says 10000 items \(7840016 bytes\) but the file holds "
                          r"7839232 bytes"),
    "one pixel changed": ("t10k-images-idx3-ubyte.gz",
                          _gz(lambda b: b[:-1] + bytes([b[-1] ^ 1])),
                          r": MD5 [0-9a-f]{32}, expected 9fb629c4189551a2d022fa330f9573f3"),
}


@pytest.mark.parametrize("case", MNIST_DAMAGE)
def test_damaged_mnist_file_is_named(case, mnist_dir, tmp_path):
    name, damage, message = MNIST_DAMAGE[case]
    for other in data.FILES["test"]:
        shutil.copy(mnist_dir / other, tmp_path / other)
    damage(tmp_path / name)
    where = re.escape(str(tmp_path / name))
    with pytest.raises(data.MnistError, match=rf"^MNIST file {where}{message}"):
        data.load_mnist("test", root=tmp_path, download=False)
