"""A stand-in for CuPy over NumPy that counts what would be device work, for
`python -m bench launches --simulate` (no GPU): minires runs its `--device cuda` code path
unchanged, its numba.cuda kernels run under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1), and
every array operation that CuPy would run as a kernel is counted here instead.

What counts as one CuPy launch (an estimate; on a GPU `bench launches --device cuda` counts the
real kernels with CUPTI): each elementwise ufunc call (operators and in-place operators
included), each reduction (sum, max, all, argmax, ...; a mean counts once), each matmul (one
cuBLAS call), each copy, fill, zeros, arange, concatenate/stack, where, fancy-index read and
item assignment. Views (reshape, transpose, slicing, broadcast_to) and empty allocations count
nothing. Host <-> device copies are counted apart ("h2d", "d2h").

Imports numpy only. Nothing here is used outside the launch counter and its tests.
"""
import collections
import contextlib
import sys
import types

import numpy as np

COUNTS = collections.Counter()  # category -> operations since the last clear()
DETAIL = collections.Counter()  # "category:operation" -> operations since the last clear()
NO_KERNEL = {"broadcast_to", "swapaxes", "expand_dims", "split", "reshape", "transpose",
             "moveaxis", "squeeze", "empty", "empty_like", "shape", "ndim", "result_type",
             "dtype", "iinfo", "finfo", "may_share_memory", "broadcast_shapes", "isscalar"}
REDUCTIONS = {"sum", "max", "min", "mean", "argmax", "argmin", "all", "any", "prod", "argsort",
              "sort", "cumsum", "amax", "amin"}


def _count(kind, name):
    COUNTS[kind] += 1
    DETAIL[f"{kind}:{name}"] += 1


def clear():
    COUNTS.clear()
    DETAIL.clear()


def _plain(a):
    """a (or the arrays inside a list/tuple) as plain numpy.ndarray views."""
    if isinstance(a, Array):
        return a.view(np.ndarray)
    if isinstance(a, (list, tuple)):
        return type(a)(_plain(x) for x in a)
    if isinstance(a, dict):
        return {k: _plain(v) for k, v in a.items()}
    return a


def wrap(r):
    """Arrays as Array views and NumPy scalars as 0-d Arrays (CuPy returns 0-d arrays)."""
    if isinstance(r, tuple):
        return tuple(wrap(x) for x in r)
    if isinstance(r, list):
        return [wrap(x) for x in r]
    if isinstance(r, np.ndarray):
        return r if isinstance(r, Array) else r.view(Array)
    if isinstance(r, np.generic):
        return np.asarray(r).view(Array)
    return r


class Array(np.ndarray):
    """A NumPy array standing for a device array (stays one through every operation)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        kind = "matmul" if ufunc is np.matmul else (
            "elementwise" if method == "__call__" else "reduction")
        _count(kind, ufunc.__name__ + ("" if method == "__call__" else "." + method))
        out = kwargs.get("out")
        if out:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        if name not in NO_KERNEL:
            _count("reduction" if name in REDUCTIONS else "other", name)
        with _quiet():
            return wrap(func(*_plain(args), **_plain(kwargs)))

    def __getitem__(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, (np.ndarray, list)) for k in keys):
            _count("gather", "getitem")
        return wrap(np.ndarray.__getitem__(self.view(np.ndarray), _plain(key)))

    def __setitem__(self, key, value):
        _count("copy", "setitem")
        np.ndarray.__setitem__(self.view(np.ndarray), _plain(key), _plain(value))

    def copy(self, order="C"):
        _count("copy", "copy")
        return wrap(self.view(np.ndarray).copy(order))

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        if copy or np.dtype(dtype) != self.dtype:
            _count("copy", "astype")
        return wrap(self.view(np.ndarray).astype(dtype, order, casting, copy=copy))

    def fill(self, value):
        _count("fill", "fill")
        self.view(np.ndarray).fill(value)

    def mean(self, *args, **kwargs):  # one CuPy reduction kernel (NumPy: sum, then divide)
        _count("reduction", "mean")
        return wrap(self.view(np.ndarray).mean(*args, **kwargs))

    def argmax(self, *args, **kwargs):
        _count("reduction", "argmax")
        return wrap(self.view(np.ndarray).argmax(*args, **kwargs))

    def get(self):
        _count("d2h", "get")
        return self.view(np.ndarray).copy()

    def item(self, *args):
        _count("d2h", "item")
        return self.view(np.ndarray).item(*args)

    def __float__(self):
        _count("d2h", "float")
        return float(self.view(np.ndarray))

    def __int__(self):
        _count("d2h", "int")
        return int(self.view(np.ndarray))

    def __bool__(self):
        _count("d2h", "bool")
        return bool(self.view(np.ndarray))


@contextlib.contextmanager
def _quiet():
    with np.errstate(all="ignore"):
        yield


def _function(name):
    """xp.<name>: the NumPy function on plain arrays, counted unless it makes no kernel."""
    func = getattr(np, name)
    if not callable(func) or isinstance(func, type):
        return func  # dtypes (xp.float32), constants

    def call(*args, **kwargs):
        if name not in NO_KERNEL:
            _count("reduction" if name in REDUCTIONS else
                   "elementwise" if isinstance(func, np.ufunc) else "other", name)
        with _quiet():
            return wrap(func(*_plain(args), **_plain(kwargs)))
    call.__name__ = name
    return call


def asarray(a, dtype=None, order=None):
    if isinstance(a, Array):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    if isinstance(a, np.ndarray) or isinstance(a, (list, tuple)):
        _count("h2d", "asarray")  # a host array: one host-to-device copy
    return wrap(np.asarray(a, dtype=dtype, order=order))


def asnumpy(a):
    return a.get() if isinstance(a, Array) else np.asarray(a)


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    result = asarray(a, dtype)
    return result.copy() if copy and isinstance(a, Array) else result


def ascontiguousarray(a, dtype=None):
    a = asarray(a, dtype)
    return a if a.flags.c_contiguous else a.copy()


class _Stream:
    ptr = 0

    def synchronize(self):
        pass


def _module():
    """The module installed as sys.modules['cupy'] by fake_cupy()."""
    mod = types.ModuleType("cupy")
    mod.__getattr__ = _function
    mod.ndarray = Array
    mod.asarray, mod.asnumpy, mod.array = asarray, asnumpy, array
    mod.ascontiguousarray = ascontiguousarray
    mod.__version__ = "simulated (NumPy " + np.__version__ + ")"
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1,
                                    getDeviceProperties=lambda i: {"name": b"CUDA simulator"})
    device = types.SimpleNamespace(synchronize=lambda: None,
                                   __enter__=lambda s: s, __exit__=lambda *a: None)
    mod.cuda = types.SimpleNamespace(runtime=runtime, is_available=lambda: True,
                                     get_current_stream=lambda: _Stream(),
                                     Device=lambda i=0: device)
    return mod


@contextlib.contextmanager
def fake_cupy():
    """Install the stand-in as `cupy` (minires.backend then sees a usable GPU); restore after.
    Refuses to run where a real CuPy is already imported."""
    from minires import backend
    if "cupy" in sys.modules:
        raise RuntimeError("bench._simcupy: a real cupy is already imported in this process")
    sys.modules["cupy"] = _module()
    backend._probe_cupy.cache_clear()
    try:
        yield sys.modules["cupy"]
    finally:
        del sys.modules["cupy"]
        backend._probe_cupy.cache_clear()
