"""MNIST: find, download (MD5-checked, atomic), validate and parse the IDX files; DataLoader.

Imports only minires.backend, NumPy and the standard library.
"""
import gzip
import hashlib
import os
import pathlib
import sys
import tempfile
import urllib.request
import zlib

import numpy as np

from minires import backend

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MD5 = {  # MD5 of the standard .gz files (yann.lecun.com originals; every mirror serves these)
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Base URLs tried in order; tests point this at a local server.
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
# What each genuine file inflates to: no file is inflated further than this (a 6 MB .gz of
# zeros can inflate to gigabytes before any other check could refuse it).
BODY_BYTES = {"train-images-idx3-ubyte.gz": 16 + 60000 * 784,
              "train-labels-idx1-ubyte.gz": 8 + 60000,
              "t10k-images-idx3-ubyte.gz": 16 + 10000 * 784,
              "t10k-labels-idx1-ubyte.gz": 8 + 10000}
DOWNLOAD_TIMEOUT = 30.0  # seconds per connection attempt / read
MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel mean and std (in [0, 1] units)

_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049  # IDX: 0x0803 = uint8 with 3 dims, 0x0801 = 1 dim


class MnistError(RuntimeError):
    """MNIST files missing, corrupted or not downloadable; the message says what to do."""


def default_root():
    """$MINIRES_DATA if set, else ~/.cache/minires/mnist."""
    env = os.environ.get("MINIRES_DATA")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "minires" / "mnist"


def load_mnist(split="train", root=None, download=True):
    """Load one MNIST split, downloading missing files into `root` first.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        root: folder with the four IDX .gz files; default `default_root()`.
        download: fetch missing files from MIRRORS (False: raise instead).
    Returns:
        (images uint8 (N, 28, 28), labels int64 (N,)).
    """
    if split not in FILES:
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}")
    root = pathlib.Path(root) if root is not None else default_root()
    image_name, label_name = FILES[split]
    for name in (image_name, label_name):
        if not (root / name).exists():
            if not download:
                raise MnistError(_missing_message(root, name, "download=False"))
            _download(root, name)
    images = _read_idx(root / image_name, _IMAGE_MAGIC)
    labels = _read_idx(root / label_name, _LABEL_MAGIC)
    if len(images) != len(labels):
        raise MnistError(f"MNIST {split}: {root / image_name} holds {len(images)} images but "
                         f"{root / label_name} holds {len(labels)} labels")
    return images, labels.astype(np.int64)


def _read_idx(path, magic):
    """Parse one IDX .gz file: its MD5 is taken from the compressed bytes, then it is
    inflated in a stream, never past what its header promises nor past the genuine file's
    size; gzip integrity, magic, dims and size are checked, then the MD5."""
    limit = BODY_BYTES.get(path.name, 16 + 70000 * 784)
    try:
        digest = _md5(path)
        with gzip.open(path, "rb") as f:
            body = _read_body(path, f, magic, limit)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise MnistError(f"MNIST file {path} is unreadable or truncated ({err}); "
                         f"delete it to download it again") from err
    if path.name in MD5 and digest != MD5[path.name]:
        raise MnistError(f"MNIST file {path}: MD5 {digest}, expected {MD5[path.name]}; "
                         f"delete it to download it again")
    ndim = 3 if magic == _IMAGE_MAGIC else 1
    shape = tuple(np.frombuffer(body, dtype=">u4", count=1 + ndim).tolist()[1:])
    return np.frombuffer(body, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _md5(path):
    """MD5 hex digest of a file's bytes, read in 1 MiB chunks."""
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
    return md5.hexdigest()


def _read_body(path, f, magic, limit):
    """The inflated IDX bytes from the open gzip stream f, after the header checks; reads
    at most one byte past what the header promises (to see that nothing follows)."""
    ndim = 3 if magic == _IMAGE_MAGIC else 1
    header = 4 + 4 * ndim
    body = f.read(header)
    if len(body) < header:
        raise MnistError(f"MNIST file {path}: {len(body)} bytes is too short for an IDX header")
    fields = np.frombuffer(body, dtype=">u4", count=1 + ndim).tolist()
    if fields[0] != magic:
        raise MnistError(f"MNIST file {path}: magic number {fields[0]}, expected {magic} "
                         f"({'images' if ndim == 3 else 'labels'} file)")
    shape = tuple(fields[1:])
    if ndim == 3 and shape[1:] != (28, 28):
        raise MnistError(f"MNIST file {path}: images are {shape[1]}x{shape[2]}, expected 28x28")
    expected = header + int(np.prod(shape))
    if expected > limit:
        raise MnistError(f"MNIST file {path}: header says {shape[0]} items ({expected} bytes), "
                         f"more than MNIST's {limit} bytes; delete it to download it again")
    body += f.read(expected - header + 1)
    if len(body) != expected:
        held = f"{len(body)} bytes" if len(body) < expected else "more"
        raise MnistError(f"MNIST file {path}: header says {shape[0]} items ({expected} bytes) "
                         f"but the file holds {held}")
    return body


def _missing_message(root, name, reason):
    return (f"MNIST file {name} is not in {root} and could not be downloaded ({reason}). "
            f"Download the four files {', '.join(MD5)} (e.g. from {MIRRORS[0]}) into {root}, "
            f"or point `minires train --data DIR` or the MINIRES_DATA environment variable "
            f"at a folder that holds them.")


def _download(root, name):
    """Fetch `name` into root: first mirror whose bytes match the MD5 wins (atomic rename)."""
    errors = []
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MnistError(_missing_message(root, name, f"cannot create the folder: {err}"))
    for base in MIRRORS:
        url = base.rstrip("/") + "/" + name
        print(f"minires: downloading {url} -> {root}", file=sys.stderr)
        try:
            _fetch(url, root / name)
            return
        except (OSError, ValueError) as err:  # URLError, HTTPError, timeouts are OSErrors
            errors.append(f"{url}: {err}")
    raise MnistError(_missing_message(root, name, "; ".join(errors)))


def _fetch(url, dest):
    """Stream url into a temp file beside dest, check its MD5, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        md5 = hashlib.md5()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url,
                                                              timeout=DOWNLOAD_TIMEOUT) as r:
            while chunk := r.read(1 << 20):
                md5.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if md5.hexdigest() != MD5[dest.name]:
            raise ValueError(f"MD5 {md5.hexdigest()} != expected {MD5[dest.name]}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class DataLoader:
    """Mini-batches of normalised images (B, 1, 28, 28) and int64 labels (B,) on a device.

    Normalises once at construction; each batch (images, labels) is copied to the device
    once. The shuffle order of epoch e is a pure function of (seed, e), and the position
    (epoch, next batch) is saved by `state_dict()`, so a resumed loader yields exactly the
    batches an unbroken run would.
    """

    def __init__(self, images, labels, batch_size=64, shuffle=True, seed=0, device="cpu",
                 drop_last=False, dtype=np.float32):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"DataLoader: expected images (N, H, W) and labels (N,), got "
                             f"{images.shape} and {labels.shape}")
        if images.dtype != np.uint8:
            raise TypeError(f"DataLoader: expected uint8 images (raw pixels), got {images.dtype}")
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be >= 1, got {batch_size}")
        self.device = backend.check_device(device)
        cast = np.dtype(dtype).type
        # A 256-entry table normalises uint8 pixels in one pass (same values as elementwise).
        table = (np.arange(256, dtype=cast) / cast(255) - cast(MEAN)) / cast(STD)
        self.images = table[images][:, None]  # (N, H, W) -> (N, 1, H, W)
        self.labels = labels.astype(np.int64)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.drop_last = bool(drop_last)
        if len(self) == 0:
            raise ValueError(f"DataLoader: {len(labels)} samples make no batch of {batch_size} "
                             f"with drop_last=True")
        self.epoch, self.batch = 0, 0  # position: the next batch to yield

    def __len__(self):
        """Batches per epoch."""
        n, b = len(self.labels), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch):
        """Sample indices of one epoch: a permutation drawn from (seed, epoch), or arange."""
        if not self.shuffle:
            return np.arange(len(self.labels))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))

    def __iter__(self):
        """Yield (x, y) device arrays from the saved position to the end of the epoch."""
        self._roll_over()
        order = self.order(self.epoch)
        while self.batch < len(self):
            start = self.batch * self.batch_size
            self.batch += 1  # advanced before yielding: a checkpoint taken now resumes after it
            yield self._load(order[start:start + self.batch_size])
        self._roll_over()

    def _roll_over(self):
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0

    def _load(self, idx):
        x, y = self.images[idx], self.labels[idx]
        return backend.to_device(x, self.device), backend.to_device(y, self.device)

    def state_dict(self):
        """Position and the settings it depends on: {epoch, batch, seed, batch_size, ...}."""
        epoch, batch = (self.epoch + 1, 0) if self.batch >= len(self) else (self.epoch,
                                                                            self.batch)
        return {"epoch": epoch, "batch": batch, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "size": len(self.labels)}

    def load_state_dict(self, state):
        """Restore a position; refuse one saved under a different seed/batching/data size."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "batch_size", "size"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"DataLoader.load_state_dict: saved {key}={state[key]!r} "
                                 f"but this loader has {key}={mine[key]!r}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
