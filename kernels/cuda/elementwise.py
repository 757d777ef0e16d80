"""CUDA ReLU and fused residual add (one thread per element), and the two-stage deterministic
sum behind the residual add's galpha.
"""
from numba import cuda

from ._device import RED, THREADS, block_sum, flat, launch, launcher, per_element
from ._device import MAX_PARTIALS


# Launch signature of each @cuda.jit kernel below, for the PTX compile test
# (tests/test_kernels_cuda.py fills in {a1}: a flat C-contiguous array of the float type).
PTX_SIGNATURES = {
    "relu_forward_kernel": "void({a1}, {a1})",
    "relu_backward_kernel": "void({a1}, {a1}, {a1})",
    "residual_add_forward_kernel": "void({a1}, {a1}, {a1}, boolean, boolean, {a1})",
    "residual_add_backward_kernel":
        "void({a1}, {a1}, {a1}, {a1}, boolean, boolean, {a1}, {a1}, {a1})",
    "sum_kernel": "void({a1}, {a1})",
}


@cuda.jit(cache=True)
def relu_forward_kernel(x, y):
    """y = max(x, 0) on flat arrays; NaN stays NaN and -0.0 stays -0.0, as numpy.maximum."""
    t = cuda.grid(1)
    if t < x.size:
        y[t] = y.dtype.type(0) if x[t] < 0 else x[t]


@cuda.jit(cache=True)
def relu_backward_kernel(gy, y, gx):
    """gx = gy * (y > 0) on flat arrays (inf or NaN in gy gives NaN where masked, as there)."""
    t = cuda.grid(1)
    if t < gy.size:
        gx[t] = gy[t] if y[t] > 0 else gy[t] * gx.dtype.type(0)


@cuda.jit(cache=True)
def residual_add_forward_kernel(x, fx, alpha, has_alpha, relu, y):
    """y = act(x + alpha[0] * fx) on flat arrays (alpha unread when not has_alpha)."""
    t = cuda.grid(1)
    if t < x.size:
        v = x[t] + alpha[0] * fx[t] if has_alpha else x[t] + fx[t]
        y[t] = y.dtype.type(0) if relu and v < 0 else v


@cuda.jit(cache=True)
def residual_add_backward_kernel(gy, y, fx, alpha, has_alpha, relu, gx, gfx, partial):
    """gx = g, gfx = alpha * g with g = gy * (y > 0) if relu else gy, on flat arrays.

    With has_alpha, block b also writes partial[b], its share of sum(g * fx) (grid-stride
    loop, then a shared-memory tree); y, fx, alpha and partial are unread otherwise.
    """
    tid = cuda.threadIdx.x
    acc = gy.dtype.type(0)
    for t in range(cuda.grid(1), gy.size, cuda.gridsize(1)):
        g = gy[t]
        if relu and not y[t] > 0:
            g = g * gy.dtype.type(0)
        gx[t] = g
        if has_alpha:
            gfx[t] = g * alpha[0]
            acc += g * fx[t]
        else:
            gfx[t] = g
    total = block_sum(acc, tid, gy)
    if has_alpha and tid == 0:
        partial[cuda.blockIdx.x] = total


@cuda.jit(cache=True)
def sum_kernel(a, out):
    """out[0] = sum(a), one block of RED threads: strided partial sums, then a tree."""
    tid = cuda.threadIdx.x
    acc = a.dtype.type(0)
    for t in range(tid, a.size, RED):
        acc += a[t]
    total = block_sum(acc, tid, a)
    if tid == 0:
        out[0] = total



@launcher
def relu_forward(xp, x):
    """max(x, 0), a new array of x's shape and dtype."""
    y = xp.empty(x.shape, dtype=x.dtype)
    launch(xp, relu_forward_kernel, per_element(x.size), THREADS, *flat(xp, x, y))
    return y


@launcher
def relu_backward(xp, gy, y):
    """gy where the forward output y > 0, else 0."""
    gx = xp.empty(gy.shape, dtype=gy.dtype)
    launch(xp, relu_backward_kernel, per_element(gy.size), THREADS, *flat(xp, gy, y, gx))
    return gx


@launcher
def residual_add_forward(xp, x, fx, alpha, relu):
    """act(x + alpha * fx); alpha None (1) or a one-element array; act ReLU if relu."""
    y = xp.empty(x.shape, dtype=x.dtype)
    views = flat(xp, x, fx, alpha, y)
    launch(xp, residual_add_forward_kernel, per_element(x.size), THREADS,
            *views[:3], alpha is not None, relu, views[3])
    return y


@launcher
def residual_add_backward(xp, gy, y, fx, alpha, relu):
    """(gx, gfx, galpha) of act(x + alpha * fx); galpha (alpha's shape) None without alpha.

    y is read only when relu, fx only when alpha is given. galpha is reduced on the device in
    two deterministic stages: per-block partial sums, then one block over the partials.
    """
    gx, gfx = xp.empty(gy.shape, dtype=gy.dtype), xp.empty(gy.shape, dtype=gy.dtype)
    blocks = min(MAX_PARTIALS, (gy.size + RED - 1) // RED)
    partial = None if alpha is None else xp.empty((blocks,), dtype=gy.dtype)
    views = flat(xp, gy, y, fx, alpha, gx, gfx, partial)
    launch(xp, residual_add_backward_kernel, blocks, RED,
            *views[:4], alpha is not None, relu, *views[4:])
    if alpha is None:
        return gx, gfx, None
    galpha = xp.zeros(alpha.shape, dtype=alpha.dtype)  # stays 0 for empty arrays
    launch(xp, sum_kernel, min(blocks, 1), RED, partial, galpha.reshape(-1))
    return gx, gfx, galpha
