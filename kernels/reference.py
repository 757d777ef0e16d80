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
