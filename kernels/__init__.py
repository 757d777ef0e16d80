"""The one dispatch point for minires's hot kernels: conv2d, relu, residual_add, max_pool2d,
batch_norm.

Each function validates its arguments and picks an implementation by array type: NumPy arrays
go to kernels.cpu (Numba @njit), CuPy arrays to kernels.cuda (numba.cuda); kernels.reference
(plain NumPy/CuPy) is the fallback when Numba is missing, with a warning the first time.
A NumPy array is never handed to a CUDA kernel. Never imports minires.

Shapes: x (N, C, H, W), w (O, C, KH, KW), b (O,), y/gy (N, O, OH, OW); stride and padding are
(int, int) pairs. All arrays of one call share a dtype: float32 or float64.
"""
import importlib
import warnings

import numpy as np

from . import reference
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


def _check(op, **arrays):
    """Same dtype (float32/float64) and same kind of device for every non-None array."""
    given = {k: a for k, a in arrays.items() if a is not None}
    dtypes = {np.dtype(a.dtype) for a in given.values()}
    if len(dtypes) != 1 or not dtypes <= set(_FLOATS):
        detail = ", ".join(f"{k}: {a.dtype}" for k, a in given.items())
        raise TypeError(f"{op}: expected float32 or float64 arrays of one dtype, got {detail}")
    if len({is_device_array(a) for a in given.values()}) != 1:
        detail = ", ".join(f"{k}: {type(a).__name__}" for k, a in given.items())
        raise TypeError(f"{op}: arrays on different devices ({detail})")


def _pair(op, name, v):
    if (isinstance(v, tuple) and len(v) == 2 and all(isinstance(i, (int, np.integer)) for i in v)):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{op}: {name} must be a pair of ints, got {v!r}")


def _check_conv(op, x_shape, w_shape, stride, padding):
    stride, padding = _pair(op, "stride", stride), _pair(op, "padding", padding)
    if len(x_shape) != 4 or len(w_shape) != 4 or x_shape[1] != w_shape[1]:
        raise ValueError(f"{op}: expected x (N, C, H, W) and w (O, C, KH, KW) with the same C, "
                         f"got x {tuple(x_shape)} and w {tuple(w_shape)}")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    oh = (x_shape[2] + 2 * padding[0] - w_shape[2]) // stride[0] + 1
    ow = (x_shape[3] + 2 * padding[1] - w_shape[3]) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"{op}: kernel {tuple(w_shape[2:])} larger than padded input "
                         f"{tuple(x_shape[2:])} with padding {padding}")
    return stride, padding, (x_shape[0], w_shape[0], oh, ow)


def _check_gy(op, gy, y_shape):
    if tuple(gy.shape) != tuple(y_shape):
        raise ValueError(f"{op}: gy has shape {tuple(gy.shape)}, expected {tuple(y_shape)}")


def conv2d_forward(x, w, b, stride, padding):
    """Cross-correlation y (N, O, OH, OW) of x with w, plus bias b (O,) or None."""
    _check("conv2d_forward", x=x, w=w, b=b)
    stride, padding, _ = _check_conv("conv2d_forward", x.shape, w.shape, stride, padding)
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"conv2d_forward: bias shape {tuple(b.shape)}, expected ({w.shape[0]},)")
    return backend_for(x).conv2d_forward(x, w, b, stride, padding)


def conv2d_backward_input(gy, w, x_shape, stride, padding):
    """Gradient to the input, (N, C, H, W) = x_shape."""
    _check("conv2d_backward_input", gy=gy, w=w)
    stride, padding, y_shape = _check_conv("conv2d_backward_input", x_shape, w.shape, stride,
                                           padding)
    _check_gy("conv2d_backward_input", gy, y_shape)
    return backend_for(gy).conv2d_backward_input(gy, w, tuple(x_shape), stride, padding)


def conv2d_backward_weight(gy, x, w_shape, stride, padding, bias=True):
    """Gradients (gw (O, C, KH, KW), gb (O,) or None when not `bias`)."""
    _check("conv2d_backward_weight", gy=gy, x=x)
    stride, padding, y_shape = _check_conv("conv2d_backward_weight", x.shape, w_shape, stride,
                                           padding)
    _check_gy("conv2d_backward_weight", gy, y_shape)
    return backend_for(gy).conv2d_backward_weight(gy, x, tuple(w_shape), stride, padding,
                                                  bool(bias))


def relu_forward(x):
    """max(x, 0), a new array of x's shape and dtype."""
    _check("relu_forward", x=x)
    return backend_for(x).relu_forward(x)


def relu_backward(gy, y):
    """gy * (y > 0), where y is the forward output."""
    _check("relu_backward", gy=gy, y=y)
    _check_gy("relu_backward", gy, y.shape)
    return backend_for(gy).relu_backward(gy, y)


def _check_alpha(op, alpha):
    if alpha is not None and alpha.size != 1:
        raise ValueError(f"{op}: alpha must have one element, got shape {tuple(alpha.shape)}")


def residual_add_forward(x, fx, alpha=None, relu=False):
    """act(x + alpha * fx) in one pass; alpha None or a one-element array, act ReLU if relu."""
    _check("residual_add_forward", x=x, fx=fx, alpha=alpha)
    _check_alpha("residual_add_forward", alpha)
    if x.shape != fx.shape:
        raise ValueError(f"residual_add_forward: x shape {tuple(x.shape)} != fx shape "
                         f"{tuple(fx.shape)}")
    return backend_for(x).residual_add_forward(x, fx, alpha, bool(relu))


def residual_add_backward(gy, y, fx, alpha=None, relu=False):
    """(gx, gfx, galpha) in one pass; galpha None when alpha is None.

    y (forward output) is needed only when relu; fx only when alpha is given.
    """
    _check("residual_add_backward", gy=gy, y=y, fx=fx, alpha=alpha)
    _check_alpha("residual_add_backward", alpha)
    for name, a in (("y", y if relu else None), ("fx", fx if alpha is not None else None)):
        if a is not None and a.shape != gy.shape:
            raise ValueError(f"residual_add_backward: {name} shape {tuple(a.shape)} != gy shape "
                             f"{tuple(gy.shape)}")
    if relu and y is None or alpha is not None and fx is None:
        raise ValueError("residual_add_backward: y is required when relu, fx when alpha is set")
    return backend_for(gy).residual_add_backward(gy, y, fx, alpha, bool(relu))


def _check_pool(op, x_shape, kernel, stride):
    kernel, stride = _pair(op, "kernel", kernel), _pair(op, "stride", stride)
    if len(x_shape) != 4:
        raise ValueError(f"{op}: expected x (N, C, H, W), got shape {tuple(x_shape)}")
    if min(kernel) < 1 or min(stride) < 1 or kernel[0] > x_shape[2] or kernel[1] > x_shape[3]:
        raise ValueError(f"{op}: kernel {kernel} / stride {stride} invalid for input "
                         f"{tuple(x_shape)}")
    out = (x_shape[0], x_shape[1], (x_shape[2] - kernel[0]) // stride[0] + 1,
           (x_shape[3] - kernel[1]) // stride[1] + 1)
    return kernel, stride, out


def max_pool2d_forward(x, kernel, stride):
    """(y (N, C, OH, OW), argmax int32 tap index i * KW + j of each window's maximum)."""
    _check("max_pool2d_forward", x=x)
    kernel, stride, _ = _check_pool("max_pool2d_forward", x.shape, kernel, stride)
    return backend_for(x).max_pool2d_forward(x, kernel, stride)


def max_pool2d_backward(gy, argmax, x_shape, kernel, stride):
    """Each window's gradient sent to its argmax: gx (N, C, H, W) = x_shape."""
    _check("max_pool2d_backward", gy=gy)
    kernel, stride, y_shape = _check_pool("max_pool2d_backward", x_shape, kernel, stride)
    _check_gy("max_pool2d_backward", gy, y_shape)  # the kernels index gx through gy's shape
    if gy.shape != argmax.shape:
        raise ValueError(f"max_pool2d_backward: gy shape {tuple(gy.shape)} != argmax shape "
                         f"{tuple(argmax.shape)}")
    if argmax.dtype.kind not in "iu" or is_device_array(argmax) != is_device_array(gy):
        raise TypeError(f"max_pool2d_backward: argmax must be an integer array on gy's device, "
                        f"got {type(argmax).__name__} of {argmax.dtype} (gy: {type(gy).__name__})")
    return backend_for(gy).max_pool2d_backward(gy, argmax, tuple(x_shape), kernel, stride)


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


# --- batch norm (x (N, C) or (N, C, H, W); per-channel arrays (C,)) --------------------------
def _check_bn(op, x, per_channel):
    if x.ndim not in (2, 4):
        raise ValueError(f"{op}: expected x (N, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    for name, a in per_channel.items():
        if a is not None and tuple(a.shape) != (x.shape[1],):
            raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, expected "
                             f"({x.shape[1]},) for x {tuple(x.shape)}")


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps,
                       relu=False):
    """(y, mean, inv_std): y = act((x - mean) * gamma * inv_std + beta) per channel, act ReLU
    if relu; batch statistics when training (running_mean/running_var, (C,) or None, updated
    in place), else the running ones. See kernels.reference.batch_norm_forward."""
    op = "batch_norm_forward"
    _check(op, x=x, gamma=gamma, beta=beta)
    stats = {"running_mean": running_mean, "running_var": running_var}
    _check_bn(op, x, dict(gamma=gamma, beta=beta, **stats))
    for name, a in stats.items():  # any float dtype: updated in place, read as x's dtype
        if a is not None and (a.dtype.kind != "f" or is_device_array(a) != is_device_array(x)):
            raise TypeError(f"{op}: {name} must be a float array on x's device, got "
                            f"{type(a).__name__} of {a.dtype} (x: {type(x).__name__})")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{op}: eval mode (training=False) needs running_mean and running_var")
    impl = reference if x.size == 0 else backend_for(x)  # empty batch: NaN, as NumPy's mean
    return impl.batch_norm_forward(x, gamma, beta, running_mean, running_var, bool(training),
                                   float(momentum), float(eps), bool(relu))


def batch_norm_backward(gy, x, gamma, beta, mean, inv_std, training, relu=False):
    """(gx, ggamma, gbeta) of batch_norm_forward from its input x and returned (mean,
    inv_std); the ReLU mask is recomputed from x. See kernels.reference.batch_norm_backward."""
    op = "batch_norm_backward"
    _check(op, gy=gy, x=x, gamma=gamma, beta=beta, mean=mean, inv_std=inv_std)
    _check_bn(op, x, dict(gamma=gamma, beta=beta, mean=mean, inv_std=inv_std))
    _check_gy(op, gy, x.shape)
    impl = reference if x.size == 0 else backend_for(gy)
    return impl.batch_norm_backward(gy, x, gamma, beta, mean, inv_std, bool(training),
                                    bool(relu))


PUBLIC_KERNELS = ("conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
                  "relu_forward", "relu_backward", "residual_add_forward",
                  "residual_add_backward", "max_pool2d_forward", "max_pool2d_backward",
                  "batch_norm_forward", "batch_norm_backward")
