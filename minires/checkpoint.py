"""Checkpoints: `save`/`load` nested dicts of arrays and Python scalars as a pickle-free .npz.

Arrays are stored under flattened keys ("model/conv1.weight"); the nesting and the scalars
live in one JSON string entry. Imports only minires.backend, NumPy and the standard library.
"""
import collections
import glob
import json
import os
import struct
import tempfile
import zipfile
import zlib

import numpy as np

from minires import backend

_META = "__minires__"  # the JSON entry: format version and the tree skeleton
_FORMAT = 1
_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}  # bool before int matters
_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,  # .npy header readers (no pickle)
            (2, 0): np.lib.format.read_array_header_2_0}
# What a damaged or hostile archive can raise while being parsed (zipfile and the .npy
# header parser are not specific); each becomes one ValueError naming the file.
# The most a checkpoint's members may declare in all: far above any minires model (ResNet-14
# with Adam state: about 2 MB), far below what a decompression bomb would ask for.
MAX_BYTES = 1 << 30
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, IndexError, OverflowError,
                RuntimeError, NotImplementedError, struct.error, zipfile.BadZipFile, zlib.error)


def save(obj, path):
    """Write `obj` (a nested dict/list/tuple of arrays, ints, floats, bools, strs, None) to path.

    NumPy/CuPy arrays (CuPy via a host copy) become .npy members of an uncompressed .npz; the
    write is atomic: a temp file in the same folder, fsync, then os.replace, so a crash never
    leaves a half-written file at `path`.
    """
    arrays = {}
    tree = _encode(obj, "", arrays)
    arrays[_META] = np.array(json.dumps({"format": _FORMAT, "tree": tree}))
    write_atomic(path, lambda f: _write_npz(f, arrays))


def load(path, max_bytes=None):
    """Read a file written by `save`: the same nesting, with NumPy arrays for the arrays.

    Never unpickles: a pickle, an object array, or a truncated/corrupted file raises
    ValueError naming the path and the problem. Sizes are checked before anything is
    inflated or allocated: every member's .npy header against its size, and their sum
    against max_bytes (default MAX_BYTES); every member's CRC is verified as it is read.
    """
    with Reader(path, max_bytes) as reader:
        return reader.load()


class Declared(collections.namedtuple("Declared", "shape dtype")):
    """An array as its .npy header declares it (Reader.outline), before any data is read."""


class Reader:
    """An open checkpoint with its index and every member's .npy header read and checked,
    but no array data: `outline()` is the nesting with Declared placeholders, `load()` reads
    the arrays (once). A context manager; errors are ValueErrors as in `load`."""

    def __init__(self, path, max_bytes=None):
        self.path, self.zf = os.fspath(path), None
        try:
            self.headers = self._open(MAX_BYTES if max_bytes is None else max_bytes)
            meta = json.loads(str(self._array(_META)))
        except FileNotFoundError:
            raise
        except KeyError as err:
            self.close()
            raise ValueError(f"minires.load: {self.path} is not a minires checkpoint "
                             f"(missing entry {err})") from err
        except _READ_ERRORS as err:
            self.close()
            raise ValueError(f"minires.load: cannot read checkpoint {self.path}: "
                             f"{err}") from err
        self.tree = self._index(meta)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.zf is not None:
            self.zf.close()

    def _open(self, max_bytes):
        """Open the zip; {key: (ZipInfo, Declared)} of every member, sizes checked."""
        with open(self.path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise ValueError("not an .npz (zip) archive; pickles and other formats are "
                                 "refused")
        self.zf = zipfile.ZipFile(self.path)
        headers, total = {}, 0
        for info in self.zf.infolist():
            total += info.file_size
            if total > max_bytes:  # a decompression bomb, or not a minires model
                raise ValueError(f"member {info.filename!r} takes the declared size to "
                                 f"{total} bytes, over the limit of {max_bytes} (max_bytes)")
            headers[_key(info.filename)] = (info, _header(self.zf, info))
        return headers

    def _index(self, meta):
        try:
            if meta.get("format") != _FORMAT:
                raise ValueError(f"unsupported format {meta.get('format')!r}")
            _decode(meta["tree"], self._declared())  # every array it names is there
            return meta["tree"]
        except KeyError as err:
            self.close()
            raise ValueError(f"minires.load: {self.path} is not a minires checkpoint "
                             f"(missing entry {err})") from err
        except (ValueError, TypeError, AttributeError, RecursionError) as err:
            self.close()
            raise ValueError(f"minires.load: {self.path} has a malformed index: "
                             f"{err}") from err

    def outline(self):
        """The saved nesting with a Declared (shape, dtype) for each array; reads no data."""
        return _decode(self.tree, self._declared())

    def _declared(self):
        return {k: d for k, (_, d) in self.headers.items() if k != _META}

    def load(self):
        """The saved nesting with its arrays read (each member's CRC verified)."""
        try:
            arrays = {k: self._array(k) for k in self.headers if k != _META}
        except _READ_ERRORS as err:
            raise ValueError(f"minires.load: cannot read checkpoint {self.path}: "
                             f"{err}") from err
        try:
            return _decode(self.tree, arrays)
        except (ValueError, TypeError, AttributeError, RecursionError) as err:
            raise ValueError(f"minires.load: {self.path} has a malformed index: "
                             f"{err}") from err

    def _array(self, key):
        """Read one member: exactly the bytes its header declares (checked against the
        zip's size already), then the end of the member, where zipfile checks its CRC."""
        info, declared = self.headers[key]
        try:
            with self.zf.open(info) as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
                f.read(1)  # reaches the end: zipfile compares the CRC-32 there
        except zipfile.BadZipFile as err:
            if "CRC" not in str(err):
                raise
            raise ValueError(f"member {info.filename!r} is corrupted (bad CRC-32)") from None
        return array


def _key(name):
    if not name.endswith(".npy"):
        raise ValueError(f"unexpected member {name!r} (a checkpoint holds .npy arrays only)")
    return name[:-len(".npy")]


def _header(zf, info):
    """The Declared (shape, dtype) of one .npy member, read from its first bytes; refuses
    object dtypes and headers whose size disagrees with the member's, before any data."""
    name = info.filename
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in _HEADERS:
            raise ValueError(f"member {name!r} has unsupported .npy version {version}")
        shape, _, dtype = _HEADERS[version](f)
        if dtype.hasobject:
            raise ValueError(f"member {name!r} is an object array; refused (loading it would "
                             f"need pickle)")
        expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != info.file_size:
        raise ValueError(f"member {name!r} declares {shape} {dtype} ({expected} bytes) but "
                         f"holds {info.file_size} bytes")
    return Declared(tuple(shape), dtype)


def _encode(value, key, arrays):
    """Return the JSON skeleton of `value`; arrays go into `arrays` under their flat key."""
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, _child(key, k), arrays)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, _child(key, i), arrays) for i, v in enumerate(value)]}
    if value is None:
        return {"none": None}
    if type(value) in _SCALARS:
        return {_SCALARS[type(value)]: value}
    if isinstance(value, (np.ndarray, np.generic)) or backend.is_cupy_array(value):
        array = np.asarray(backend.to_device(value, "cpu") if backend.is_cupy_array(value)
                           else value)
        if array.dtype.hasobject:
            raise TypeError(f"minires.save: {key or 'value'!r} is an object array; only "
                            f"numeric/bool/str arrays can be saved without pickle")
        name = key or "value"
        if name in arrays:
            raise ValueError(f"minires.save: two entries flatten to the same key {name!r}")
        arrays[name] = array
        return {"array": name}
    raise TypeError(f"minires.save: {key or 'value'!r} has type {type(value).__name__}; "
                    f"expected a dict, list, tuple, array, int, float, bool, str or None")


def _child(key, k):
    """Flat key of entry k below key; keys must be str/int and free of '/'."""
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise TypeError(f"minires.save: key {k!r} under {key or 'the root'!r} must be a str "
                        f"or int, got {type(k).__name__}")
    if isinstance(k, str) and ("/" in k or not k or k == _META):
        raise ValueError(f"minires.save: key {k!r} under {key or 'the root'!r} is empty, "
                         f"reserved or contains '/'")
    return f"{key}/{k}" if key else str(k)


def _decode(node, arrays):
    """Rebuild the value from its skeleton `node` (the inverse of _encode)."""
    (kind, body), = node.items()
    if kind == "dict":
        return {k: _decode(v, arrays) for k, v in body}
    if kind in ("list", "tuple"):
        items = [_decode(v, arrays) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "array":
        if not isinstance(arrays[body], (np.ndarray, Declared)):
            raise ValueError(f"entry {body!r} is not an array")
        return arrays[body]
    if kind in ("none", "bool", "int", "float", "str"):
        return body
    raise ValueError(f"unknown node kind {kind!r}")


def _write_npz(f, arrays):
    """arrays as the .npy members of an uncompressed .npz written to the open file f."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def write_atomic(path, write, mode="wb", **open_kwargs):
    """Replace the file at path by what write(f) writes, atomically: into a temp file beside
    it, flushed and fsynced, then renamed over path (and the folder fsynced), so a crash or
    a kill leaves either the old file or the new one, never a mix. On an error path is
    untouched and the temp file is gone; temp files of killed earlier writers are deleted.
    `mode` and `open_kwargs` (e.g. newline="") open the temp file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_folder(folder)
    remove_stale_temps(path)


def remove_stale_temps(path):
    """Delete the temp files (`.NAME.*.tmp` beside it) that earlier atomic writes of `path`
    left when their process was killed (a SIGKILL skips every `finally`); `path` itself is
    never touched."""
    folder, name = os.path.split(os.path.abspath(path))
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        try:
            os.remove(stale)
        except OSError:  # already gone (another writer cleaned it), or not ours to remove
            pass


def _fsync_folder(folder):
    # Makes the rename itself durable on POSIX; Windows cannot open folders, so skip there.
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
