"""Plain array-module (NumPy or CuPy) kernels: the test oracle and the fallback without Numba.

Convolution uses im2col over the KH*KW kernel taps: one strided slice per tap, so the same
code runs on NumPy and CuPy. Never imports minires.

Notation: N batch, C input channels, O output channels, H W input size, KH KW kernel size,
OH OW output size, (sh, sw) stride, (ph, pw) padding.
"""
from ._common import array_module


def _out_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _taps(kh, kw, sh, sw, oh, ow):
    """Yield (i, j, slice_h, slice_w): the input window each kernel tap reads."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw)


def _pad(x, ph, pw):
    if ph == 0 and pw == 0:
        return x
    xp = array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def im2col(x, kh, kw, stride, padding):
    """(N, C, H, W) -> columns (N, C, KH, KW, OH, OW)."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, w = x.shape
    oh, ow = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
    xpad = _pad(x, ph, pw)
    col = array_module(x).empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i, j, si, sj in _taps(kh, kw, sh, sw, oh, ow):
        col[:, :, i, j] = xpad[:, :, si, sj]
    return col


def col2im(col, x_shape, stride, padding):
    """Columns (N, C, KH, KW, OH, OW) -> (N, C, H, W), summing overlapping taps."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, kh, kw, oh, ow = col.shape
    h, w = x_shape[2], x_shape[3]
    xp = array_module(col)
    xpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=col.dtype)
    for i, j, si, sj in _taps(kh, kw, sh, sw, oh, ow):
        xpad[:, :, si, sj] += col[:, :, i, j]
    return xpad[:, :, ph:ph + h, pw:pw + w]


def conv2d_forward(x, w, b, stride, padding):
    """y[n,o] = sum_{c,i,j} w[o,c,i,j] * xpad[n,c,i+sh*oh,j+sw*ow] + b[o]: (N,O,OH,OW)."""
    xp = array_module(x)
    col = im2col(x, w.shape[2], w.shape[3], stride, padding)
    y = xp.tensordot(col, w, axes=([1, 2, 3], [1, 2, 3]))  # (N, OH, OW, O)
    if b is not None:
        y += b
    return xp.ascontiguousarray(y.transpose(0, 3, 1, 2))


def conv2d_backward_input(gy, w, x_shape, stride, padding):
    """Gradient to the input (N, C, H, W) from gy (N, O, OH, OW)."""
    xp = array_module(gy)
    gcol = xp.tensordot(gy, w, axes=([1], [0]))  # (N, OH, OW, C, KH, KW)
    gcol = gcol.transpose(0, 3, 4, 5, 1, 2)
    return xp.ascontiguousarray(col2im(gcol, x_shape, stride, padding))


def conv2d_backward_weight(gy, x, w_shape, stride, padding, bias):
    """Gradients to the weight (O, C, KH, KW) and, if `bias`, the bias (O,); else None."""
    xp = array_module(gy)
    col = im2col(x, w_shape[2], w_shape[3], stride, padding)
    gw = xp.tensordot(gy, col, axes=([0, 2, 3], [0, 4, 5]))  # (O, C, KH, KW)
    gb = gy.sum(axis=(0, 2, 3)) if bias else None
    return xp.ascontiguousarray(gw), gb


def relu_forward(x):
    """max(x, 0), same shape and dtype."""
    return array_module(x).maximum(x, 0).astype(x.dtype, copy=False)


def relu_backward(gy, y):
    """gy where the forward output y > 0, else 0."""
    return gy * (y > 0)


def residual_add_forward(x, fx, alpha, relu):
    """act(x + alpha * fx); alpha None (1) or a one-element array; act ReLU if relu."""
    y = x + fx if alpha is None else x + alpha.reshape(()) * fx
    return relu_forward(y) if relu else y


def residual_add_backward(gy, y, fx, alpha, relu):
    """(gx, gfx, galpha) of act(x + alpha * fx); galpha is None when alpha is None.

    y (the forward output) is read only when relu; fx only when alpha is given.
    """
    g = relu_backward(gy, y) if relu else gy
    if alpha is None:
        return g, g.copy(), None
    galpha = (g * fx).sum().reshape(alpha.shape).astype(alpha.dtype)
    return g, g * alpha.reshape(()), galpha


def max_pool2d_forward(x, kernel, stride):
    """Max over each (KH, KW) window: y (N, C, OH, OW) and argmax, the int32 tap index
    i * KW + j of the first maximum in each window (the one the gradient goes to)."""
    (kh, kw), (sh, sw) = kernel, stride
    xp = array_module(x)
    n, c, h, w = x.shape
    oh, ow = _out_size(h, kh, sh, 0), _out_size(w, kw, sw, 0)
    y = argmax = None
    for i, j, si, sj in _taps(kh, kw, sh, sw, oh, ow):
        patch = x[:, :, si, sj]
        if y is None:
            y, argmax = patch.copy(), xp.zeros(patch.shape, dtype=xp.int32)
        else:
            better = patch > y
            y = xp.where(better, patch, y)
            argmax[better] = i * kw + j
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape, kernel, stride):
    """Send each window's gradient to its argmax: gx (N, C, H, W)."""
    (kh, kw), (sh, sw) = kernel, stride
    xp = array_module(gy)
    gx = xp.zeros(x_shape, dtype=gy.dtype)
    oh, ow = gy.shape[2], gy.shape[3]
    for i, j, si, sj in _taps(kh, kw, sh, sw, oh, ow):
        gx[:, :, si, sj] += xp.where(argmax == i * kw + j, gy, 0)
    return gx


def _channels(x):
    """The axes batch norm reduces over and the shape that broadcasts (C,) against x."""
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    return axes, (1, x.shape[1]) + (1,) * (x.ndim - 2)


def update_running(running_mean, running_var, mean, var, count, momentum):
    """In place: running = (1 - momentum) * running + momentum * batch value, with the
    unbiased variance var * count / (count - 1) (PyTorch's rule); None buffers are skipped."""
    if running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += momentum * mean
    if running_var is not None:
        running_var *= 1 - momentum
        running_var += momentum * var * (count / max(count - 1, 1))


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps,
                       relu):
    """Per-channel batch norm of x (N, C) or (N, C, H, W), then ReLU if relu:
    y = act((x - mean) * (gamma * inv_std) + beta), inv_std = 1 / sqrt(var + eps).

    training: mean and var are the batch's (biased var), and running_mean / running_var
    ((C,) or None) are updated in place (update_running); else the running statistics are
    used. Returns (y, mean, inv_std), the (C,) statistics used, in x's dtype.
    """
    xp = array_module(x)
    axes, bshape = _channels(x)
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        update_running(running_mean, running_var, mean, var, x.size // x.shape[1], momentum)
    else:
        mean, var = running_mean.astype(x.dtype), running_var.astype(x.dtype, copy=False)
    inv_std = (1 / xp.sqrt(var + eps)).astype(x.dtype, copy=False)
    y = _bn_value(x, gamma, beta, mean, inv_std, bshape)
    return (relu_forward(y) if relu else y), mean, inv_std


def _bn_value(x, gamma, beta, mean, inv_std, bshape):
    """(x - mean) * (gamma * inv_std) + beta, in x's dtype: the kernels round it the same way,
    so the ReLU mask that backward recomputes from x matches forward's output."""
    scale = (gamma * inv_std).reshape(bshape)
    return (x - mean.reshape(bshape)) * scale + beta.reshape(bshape)


def batch_norm_backward(gy, x, gamma, beta, mean, inv_std, training, relu):
    """(gx, ggamma, gbeta) of batch_norm_forward, from its input x and (mean, inv_std).

    g = gy (masked by y > 0 when relu, y recomputed from x), x_hat = (x - mean) * inv_std:
    gbeta = sum(g), ggamma = sum(g * x_hat) per channel; gx = gamma * inv_std * g in eval
    mode, and gamma * inv_std * (g - (gbeta + x_hat * ggamma) / count) in training, where
    mean and var depend on x (count = N * H * W).
    """
    axes, bshape = _channels(x)
    if relu:
        gy = gy * (_bn_value(x, gamma, beta, mean, inv_std, bshape) > 0)
    x_hat = (x - mean.reshape(bshape)) * inv_std.reshape(bshape)
    gbeta, ggamma = gy.sum(axis=axes), (gy * x_hat).sum(axis=axes)
    scale = (gamma * inv_std).reshape(bshape)
    if not training:
        return gy * scale, ggamma, gbeta
    count = x.size // x.shape[1]
    gx = scale * (gy - (gbeta.reshape(bshape) + x_hat * ggamma.reshape(bshape)) / count)
    return gx, ggamma, gbeta
