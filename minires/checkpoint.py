"""Checkpoints: `save`/`load` nested dicts of arrays and Python scalars as a pickle-free .npz.

Arrays are stored under flattened keys ("model/conv1.weight"); the nesting and the scalars
live in one JSON string entry. Imports only minires.backend, NumPy and the standard library.
"""
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


def load(path):
    """Read a file written by `save`: the same nesting, with NumPy arrays for the arrays.

    Never unpickles: a pickle, an object array, or a truncated/corrupted file raises
    ValueError naming the path and the problem. Every member's CRC is verified and its
    .npy header checked against its size before any array is read.
    """
    path = os.fspath(path)
    arrays = _read_npz(path)
    try:
        meta = json.loads(str(arrays.pop(_META)))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"unsupported format {meta.get('format')!r}")
        return _decode(meta["tree"], arrays)
    except KeyError as err:
        raise ValueError(f"minires.load: {path} is not a minires checkpoint "
                         f"(missing entry {err})") from err
    except (ValueError, TypeError, AttributeError, RecursionError) as err:
        raise ValueError(f"minires.load: {path} has a malformed index: {err}") from err


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
        if not isinstance(arrays[body], np.ndarray):
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


def _read_npz(path):
    """Every member of the .npz at path as NumPy arrays, with errors turned into ValueError."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise ValueError("not an .npz (zip) archive; pickles and other formats are "
                                 "refused")
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every member: a flipped bit anywhere fails its CRC
            if bad is not None:
                raise ValueError(f"member {bad!r} is corrupted (bad CRC-32)")
            return dict(_read_member(zf, info) for info in zf.infolist())
    except FileNotFoundError:
        raise
    except _READ_ERRORS as err:
        raise ValueError(f"minires.load: cannot read checkpoint {path}: {err}") from err


def _read_member(zf, info):
    """(key, array) of one .npy member, refusing object dtypes and sizes that disagree
    with the header before reading (np.load would otherwise read a prefix, unchecked)."""
    name = info.filename
    if not name.endswith(".npy"):
        raise ValueError(f"unexpected member {name!r} (a checkpoint holds .npy arrays only)")
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
    with zf.open(info) as f:
        return name[:-len(".npy")], np.lib.format.read_array(f, allow_pickle=False)
