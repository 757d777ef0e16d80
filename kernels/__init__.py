"""The one dispatch point for minires's hot kernels: conv2d, relu, residual_add, max_pool2d,
batch_norm, each with its forward and backward (kernels/registry.py lists them).

One function per registered kernel, built from its registry entry: it validates the arguments
(the entry's check) and picks an implementation by the first array's type: NumPy arrays go to
kernels.cpu (Numba @njit), CuPy arrays to kernels.cuda (numba.cuda); kernels.reference (plain
NumPy/CuPy) is the fallback when Numba is missing, with a warning the first time, and handles
empty arrays (nothing to compute; NumPy's semantics, e.g. a NaN mean). A NumPy array is never
handed to a CUDA kernel. sgd_update and adam_update, CUDA-only multi-tensor updates with their
own contract (they may decline), are written out below. Never imports minires.

Shapes: x (N, C, H, W), w (O, C, KH, KW), b (O,), y/gy (N, O, OH, OW); stride and padding are
(int, int) pairs. All arrays of one call share a dtype: float32 or float64.
"""
import importlib
import inspect
import warnings

import numpy as np

from . import reference, registry
from ._common import is_device_array

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_loaded = {}  # "cpu" | "cuda" -> (module, name)


def _load(kind):
    """Import kernels.cpu or kernels.cuda once; fall back to reference with one warning."""
    if kind not in _loaded:
        try:
            module = importlib.import_module(f"{__name__}.{kind}")
            _loaded[kind] = (module, "numba-cpu" if kind == "cpu" else "numba-cuda")
        except ImportError as e:
            warnings.warn(f"kernels: Numba {kind.upper()} kernels unavailable ({e}); "
                          f"using the slower kernels.reference implementation",
                          RuntimeWarning, stacklevel=3)
            _loaded[kind] = (reference, "reference")
    return _loaded[kind]


def backend_for(x):
    """The kernel module that handles array x."""
    return _load("cuda" if is_device_array(x) else "cpu")[0]


def backend_name(x):
    """'numba-cpu', 'numba-cuda' or 'reference': which kernels handle arrays like x."""
    return _load("cuda" if is_device_array(x) else "cpu")[1]


def _dispatcher(kernel):
    """kernels.<name>: check the arguments, then run the implementation for the first one."""
    check, name = kernel.check, kernel.name

    def dispatch(*args, **kwargs):
        args = check(*args, **kwargs)
        first = args[0]
        if first.size == 0:
            return getattr(reference, name)(*args)
        kind = "cpu" if type(first) is np.ndarray or not is_device_array(first) else "cuda"
        module = _loaded[kind][0] if kind in _loaded else _load(kind)[0]
        return getattr(module, name)(*args)

    dispatch.__name__ = dispatch.__qualname__ = name
    dispatch.__doc__ = getattr(reference, name).__doc__  # the semantics: the oracle's
    dispatch.__signature__ = inspect.signature(check)  # the public call, with its defaults
    return dispatch


for _kernel in registry.KERNELS:
    globals()[_kernel.name] = _dispatcher(_kernel)
del _kernel
PUBLIC_KERNELS = registry.NAMES  # the registered kernels, in registry order


def warm_up(xp=np, dtype=np.float32):
    """Run every registered kernel once on its test cases (tiny, and big enough to be split
    over threads) with arrays of module xp (numpy or cupy) and this dtype, so that Numba
    compiles them now (or loads them from its cache) rather than inside the first training
    step. Returns nothing; a kernel that fails raises as it would in training."""
    rng = np.random.default_rng(0)
    for kernel in registry.KERNELS:
        for case in kernel.cases(rng, dtype):
            args = [xp.asarray(a) if isinstance(a, np.ndarray) else a for a in case.args]
            globals()[kernel.name](*args)


def _multi_tensor(name, params, *groups):
    """The kernel module's multi-tensor function `name` when it can update these lists (one
    per parameter each, same shapes, one float dtype, C-contiguous, all on the device), else
    None."""
    fn = getattr(backend_for(params[0]), name, None) if params else None
    if fn is None or any(len(g) != len(params) for g in groups):
        return None
    dtype = np.dtype(params[0].dtype)
    device = is_device_array(params[0])
    arrays = [a for group in (params, *groups) for a in group]
    if dtype not in _FLOATS or any(np.dtype(a.dtype) != dtype or not a.flags.c_contiguous
                                   or is_device_array(a) != device for a in arrays):
        return None
    if any(a.shape != p.shape for group in groups for p, a in zip(params, group)):
        raise ValueError(f"{name}: an array's shape differs from its parameter's")
    return fn


def sgd_update(params, grads, bufs, fresh, lr, momentum, weight_decay, nesterov):
    """One SGD step over lists of parameters, gradients and momentum buffers, in place, in one
    launch per 16 tensors, where a multi-tensor kernel handles these arrays (CUDA); returns
    True then. Returns False, changing nothing, otherwise (NumPy arrays, the reference
    fallback, mixed dtypes or devices, non-contiguous arrays): the caller updates tensor by
    tensor. fresh[k]: buffer k is new and is set to the gradient; bufs empty without momentum.
    Semantics: minires.optim.SGD (torch.optim.SGD with dampening 0)."""
    fn = _multi_tensor("sgd_update", params, grads, *([bufs] if momentum else []))
    if fn is None:
        return False
    fn(list(params), list(grads), list(bufs), [bool(f) for f in fresh], float(lr),
       float(momentum), float(weight_decay), bool(nesterov))
    return True


def adam_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps, weight_decay,
                decoupled):
    """One Adam (decoupled: AdamW) step over lists of parameters, gradients and moments, in
    place, in one launch per 12 tensors where a multi-tensor kernel handles these arrays
    (CUDA); True then, else False with nothing changed (as sgd_update). steps[k]: tensor k's
    step count including this step. Semantics: minires.optim.Adam / AdamW."""
    fn = _multi_tensor("adam_update", params, grads, exp_avgs, exp_avg_sqs)
    if fn is None:
        return False
    fn(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [int(t) for t in steps],
       float(lr), (float(betas[0]), float(betas[1])), float(eps), float(weight_decay),
       bool(decoupled))
    return True
