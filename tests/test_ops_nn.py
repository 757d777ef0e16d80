"""Network ops: forward vs kernels.reference or a closed form (float32 and float64), float64
gradcheck of every differentiable input, and bad-input errors. Runs on every `xp` backend."""
import numpy as np
import pytest

import minires.ops as F
from conftest import fwd_tol, to_numpy
from helpers import check_forward, check_grad
from minires.kernels import reference
from minires.gradcheck import away_from_kinks, distinct
from minires.tensor import Tensor

DTYPES = [np.float32, np.float64]


def on(xp, a, dtype=np.float64):
    """A copy of host data `a` as an xp array of `dtype` (never an alias of `a`)."""
    return xp.asarray(np.array(a, dtype=dtype))


def _pair(v):
    return (v, v) if isinstance(v, int) else v


# --- direct NumPy closed forms (float64; sliding windows, independent of the im2col oracle) --
def windows(x, kernel, stride):
    """(N, C, H, W) -> every window, (N, C, OH, OW, KH, KW); the output size is floored."""
    (sh, sw) = _pair(stride)
    view = np.lib.stride_tricks.sliding_window_view(x, _pair(kernel), axis=(2, 3))
    return view[:, :, ::sh, ::sw]


def direct_conv(x, w, b, stride, padding):
    (ph, pw) = _pair(padding)
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.einsum("nchwij,ocij->nohw", windows(xpad, w.shape[2:], stride), w)
    return y if b is None else y + b[None, :, None, None]


def direct_pool(x, kernel, stride, reduce):
    return reduce(windows(x, kernel, kernel if stride is None else stride), axis=(4, 5))


def direct_batch_norm(x, gamma, beta, mean, var, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape)
            + beta.reshape(shape))


def direct_log_softmax(x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


# --- conv2d ---------------------------------------------------------------------------------
CONV_CASES = [  # x shape, w shape, stride, padding
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 0),
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1),
    ((1, 2, 6, 5), (3, 2, 3, 2), 2, 1),              # N=1, rectangular kernel and image
    ((2, 1, 5, 7), (2, 1, 2, 3), (2, 1), (1, 0)),    # C=1, pair stride and padding
    ((2, 3, 4, 4), (5, 3, 1, 1), 1, 0),              # 1x1
    ((1, 2, 5, 4), (2, 2, 1, 1), 2, 0),              # 1x1 stride 2 (projection shortcut)
    ((2, 2, 6, 6), (3, 2, 3, 3), 2, 1),              # downsampling 3x3
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, ws, stride, padding", CONV_CASES)
def test_conv2d_forward(xp, rng, dtype, xs, ws, stride, padding):
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])
    y = F.conv2d(on(xp, x, dtype), on(xp, w, dtype), on(xp, b, dtype), stride, padding)
    assert y.dtype == dtype and y.device == ("cpu" if xp is np else "cuda")
    check_forward(y, direct_conv(x, w, b, stride, padding), dtype, reduce=True)
    ref = reference.conv2d_forward(on(xp, x, dtype), on(xp, w, dtype), on(xp, b, dtype),
                                   _pair(stride), _pair(padding))
    check_forward(y, ref, dtype, reduce=True)
    y0 = F.conv2d(on(xp, x, dtype), on(xp, w, dtype), None, stride, padding)
    check_forward(y0, direct_conv(x, w, None, stride, padding), dtype, reduce=True)


@pytest.mark.parametrize("xs, ws, stride, padding", CONV_CASES)
def test_conv2d_grad(xp, rng, xs, ws, stride, padding):
    x, w, b = (on(xp, rng.standard_normal(shape)) for shape in (xs, ws, ws[:1]))
    check_grad(lambda x, w, b: F.conv2d(x, w, b, stride, padding), [x, w, b])
    # no bias; and a first layer, whose x needs no gradient (backward skips gx): the same
    # kernels, so one random direction per input is enough
    check_grad(lambda x, w: F.conv2d(x, w, stride=stride, padding=padding), [x, w], fast=True)
    check_grad(lambda x, w, b: F.conv2d(x, w, b, stride, padding), [x, w, b],
               check=(False, True, True), fast=True)


# --- pooling --------------------------------------------------------------------------------
POOL_CASES = [  # x shape, kernel, stride
    ((2, 2, 4, 4), 2, None),
    ((1, 3, 5, 5), 2, None),         # floored: 5 -> 2, last row/column unused
    ((2, 1, 5, 5), 3, 1),            # overlapping windows
    ((1, 2, 5, 7), (2, 3), (1, 2)),  # rectangular kernel, pair stride
    ((2, 2, 7, 6), 3, 2),            # overlapping, stride 2, floored
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, kernel, stride", POOL_CASES)
def test_pool_forward(xp, rng, dtype, xs, kernel, stride):
    x = rng.standard_normal(xs)
    ymax, yavg = (op(on(xp, x, dtype), kernel, stride) for op in (F.max_pool2d, F.avg_pool2d))
    assert ymax.dtype == yavg.dtype == dtype
    check_forward(ymax, direct_pool(x.astype(dtype), kernel, stride, np.max), dtype)
    check_forward(yavg, direct_pool(x, kernel, stride, np.mean), dtype, reduce=True)


@pytest.mark.parametrize("xs, kernel, stride", POOL_CASES)
def test_pool_grad(xp, rng, xs, kernel, stride):
    x = on(xp, distinct(rng.standard_normal(xs)))  # ties make max pooling non-differentiable
    check_grad(lambda x: F.max_pool2d(x, kernel, stride), [x])
    check_grad(lambda x: F.avg_pool2d(x, kernel, stride), [x])


def test_max_pool_tie_goes_to_first_maximum(xp):
    x = Tensor(xp.ones((1, 1, 2, 4)), requires_grad=True)
    F.max_pool2d(x, 2).backward(on(xp, [[[[3.0, 5.0]]]]))
    np.testing.assert_array_equal(to_numpy(x.grad)[0, 0], [[3, 0, 5, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs", [(2, 3, 4, 5), (1, 1, 1, 1), (3, 2, 1, 6)])
def test_global_avg_pool2d(xp, rng, dtype, xs):
    x = rng.standard_normal(xs)
    y = F.global_avg_pool2d(on(xp, x, dtype))
    assert y.shape == xs[:2] and y.dtype == dtype
    check_forward(y, x.mean(axis=(2, 3)), dtype, reduce=True)
    check_grad(F.global_avg_pool2d, [on(xp, x)])


# --- batch_norm -----------------------------------------------------------------------------
BN_SHAPES = [(6, 3), (2, 3, 3, 4)]


def bn_inputs(xp, rng, xs, dtype=np.float64):
    x = 2 * rng.standard_normal(xs) + 1
    gamma, beta = rng.standard_normal(xs[1]), rng.standard_normal(xs[1])
    return x, gamma, beta, [on(xp, a, dtype) for a in (x, gamma, beta)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs", BN_SHAPES)
def test_batch_norm_forward_and_running_stats(xp, rng, dtype, xs, training):
    x, gamma, beta, args = bn_inputs(xp, rng, xs, dtype)
    rm0, rv0 = rng.standard_normal(xs[1]), rng.random(xs[1]) + 0.5
    rm, rv = on(xp, rm0, dtype), on(xp, rv0, dtype)
    y = F.batch_norm(*args, running_mean=rm, running_var=rv, training=training, momentum=0.2,
                     eps=1e-3)
    assert y.dtype == dtype
    if not training:  # the running statistics are used and left alone
        check_forward(y, direct_batch_norm(x, gamma, beta, rm0, rv0, 1e-3), dtype, reduce=True)
        np.testing.assert_array_equal(to_numpy(rm), rm0.astype(dtype))
        np.testing.assert_array_equal(to_numpy(rv), rv0.astype(dtype))
        return
    axes = (0,) if len(xs) == 2 else (0, 2, 3)
    mean, var = x.mean(axis=axes), x.var(axis=axes)  # biased for normalising
    check_forward(y, direct_batch_norm(x, gamma, beta, mean, var, 1e-3), dtype, reduce=True)
    count = x.size // xs[1]
    check_forward(rm, 0.8 * rm0 + 0.2 * mean, dtype, reduce=True)
    check_forward(rv, 0.8 * rv0 + 0.2 * var * count / (count - 1), dtype, reduce=True)  # unbiased


@pytest.mark.parametrize("xs", BN_SHAPES)
def test_batch_norm_grad(xp, rng, xs):
    _, _, _, args = bn_inputs(xp, rng, xs)
    check_grad(lambda x, g, b: F.batch_norm(x, g, b, training=True), args)
    rm, rv = on(xp, rng.standard_normal(xs[1])), on(xp, rng.random(xs[1]) + 0.5)
    check_grad(lambda x, g, b: F.batch_norm(x, g, b, rm, rv, training=False), args)


@pytest.mark.parametrize("xs", BN_SHAPES)
def test_batch_norm_matches_torch(rng, xs):
    torch = pytest.importorskip("torch")
    x, gamma, beta, args = bn_inputs(np, rng, xs)
    gy = rng.standard_normal(xs)
    rm, rv = np.zeros(xs[1]), np.ones(xs[1])
    ts = [torch.tensor(a, requires_grad=True) for a in (x, gamma, beta)]
    trm, trv = torch.zeros(xs[1], dtype=torch.float64), torch.ones(xs[1], dtype=torch.float64)
    ty = torch.nn.functional.batch_norm(ts[0], trm, trv, ts[1], ts[2], training=True,
                                        momentum=0.1, eps=1e-5)
    ty.backward(torch.tensor(gy))
    tensors = [Tensor(a, requires_grad=True) for a in args]
    y = F.batch_norm(*tensors, running_mean=rm, running_var=rv, training=True)
    y.backward(gy)
    check_forward(y, ty.detach().numpy(), np.float64)
    for mine, theirs in [(rm, trm), (rv, trv)] + [(t.grad, s.grad) for t, s in zip(tensors, ts)]:
        check_forward(mine, theirs.numpy(), np.float64)


# --- residual_add ---------------------------------------------------------------------------
ALPHAS = [None, np.array([0.7]), np.array(-1.3)]  # none, ReZero-style (1,), and a 0-d scalar


def residual_inputs(rng, shape, alpha, relu):
    """(x, fx, s): s = x + alpha * fx, the pre-activation, kept off the ReLU kink."""
    fx = rng.standard_normal(shape)
    s = away_from_kinks(rng.standard_normal(shape), 0.1) if relu else rng.standard_normal(shape)
    return s - (1.0 if alpha is None else alpha.reshape(())) * fx, fx, s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_residual_add_forward(xp, rng, dtype, relu, alpha):
    x, fx, s = residual_inputs(rng, (2, 3, 4, 4), alpha, relu)
    args = [on(xp, a, dtype) for a in (x, fx, alpha) if a is not None]
    y = F.residual_add(*args, relu=relu)
    assert y.dtype == dtype
    check_forward(y, np.maximum(s, 0) if relu else s, dtype)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_residual_add_grad(xp, rng, relu, alpha):
    x, fx, _ = residual_inputs(rng, (2, 3, 3, 2), alpha, relu)
    if alpha is None:
        check_grad(lambda x, fx: F.residual_add(x, fx, relu=relu), [on(xp, x), on(xp, fx)])
        return
    inputs = on(xp, x), on(xp, fx), on(xp, alpha)
    check_grad(lambda x, fx, a: F.residual_add(x, fx, a, relu=relu), inputs)
    # alpha a constant: the kernel skips its gradient
    check_grad(lambda x, fx, a: F.residual_add(x, fx, a, relu=relu), inputs,
               check=(True, True, False))


# --- activations ----------------------------------------------------------------------------
ELEMENTWISE = {
    "relu": (F.relu, lambda x: np.maximum(x, 0)),
    "sigmoid": (F.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    "tanh": (F.tanh, np.tanh),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_activation(xp, rng, dtype, name):
    op, closed_form = ELEMENTWISE[name]
    x = away_from_kinks(3 * rng.standard_normal((3, 4, 5)), 0.05)  # ReLU: off the kink at 0
    y = op(on(xp, x, dtype))
    assert y.dtype == dtype and y.shape == x.shape
    check_forward(y, closed_form(x.astype(dtype).astype(np.float64)), dtype)
    check_grad(op, [on(xp, x)])


def test_extreme_inputs_stay_finite(xp):
    y = to_numpy(F.sigmoid(on(xp, [-1000.0, 0.0, 1000.0], np.float32)))
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])  # no overflow in exp
    logp = to_numpy(F.log_softmax(on(xp, [[1000.0, 0.0, -1000.0]])))
    np.testing.assert_allclose(logp, [[0.0, -1000.0, -2000.0]], **fwd_tol(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_and_log_softmax(xp, rng, dtype, axis):
    x = 3 * rng.standard_normal((2, 3, 4))
    logp = direct_log_softmax(x.astype(dtype).astype(np.float64), axis)
    check_forward(F.log_softmax(on(xp, x, dtype), axis=axis), logp, dtype, reduce=True)
    y = F.softmax(on(xp, x, dtype), axis=axis)
    check_forward(y, np.exp(logp), dtype, reduce=True)
    check_forward(to_numpy(y).sum(axis=axis), np.ones(np.delete(x.shape, axis)), dtype,
               reduce=True)
    check_grad(lambda a: F.log_softmax(a, axis=axis), [on(xp, x)])
    check_grad(lambda a: F.softmax(a, axis=axis), [on(xp, x)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(xp, rng, dtype):
    logits, labels = 2 * rng.standard_normal((5, 4)), np.array([0, 3, 1, 1, 2])
    loss = F.cross_entropy(on(xp, logits, dtype), xp.asarray(labels))
    assert loss.shape == () and loss.dtype == dtype
    expected = -direct_log_softmax(logits, 1)[np.arange(5), labels].mean()  # mean over batch
    check_forward(loss, expected, dtype, reduce=True)
    as_tensor = F.cross_entropy(on(xp, logits, dtype), Tensor(xp.asarray(labels)))
    check_forward(as_tensor, expected, dtype, reduce=True)
    check_grad(F.cross_entropy, [on(xp, logits), xp.asarray(labels)])


def test_cross_entropy_gradient_closed_form(xp, rng):
    logits, labels = rng.standard_normal((3, 4)), np.array([2, 0, 3])
    z = Tensor(on(xp, logits), requires_grad=True)
    F.cross_entropy(z, xp.asarray(labels)).backward()
    expected = np.exp(direct_log_softmax(logits, 1))
    expected[np.arange(3), labels] -= 1
    check_forward(z.grad, expected / 3, np.float64)  # (softmax - onehot) / N


# --- dropout --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_statistics_and_scaling(xp, dtype):
    p, n = 0.3, 20000
    y = to_numpy(F.dropout(on(xp, np.ones((100, n // 100)), dtype), p, rng=1))
    assert y.dtype == dtype
    kept = y != 0
    np.testing.assert_array_equal(y[kept], dtype(1 / (1 - p)))  # kept values scaled exactly
    # the dropped fraction is binomial: 5 standard deviations cannot fail by chance
    assert abs((1 - kept.mean()) - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_dropout_eval_and_zero_p_are_identity(xp, rng):
    x = on(xp, rng.standard_normal((4, 5)))
    for y in (F.dropout(x, 0.5, training=False), F.dropout(Tensor(x), 0.0, rng=0)):
        np.testing.assert_array_equal(to_numpy(y), to_numpy(x))


def test_dropout_same_rng_same_mask(xp, rng):
    x = on(xp, rng.standard_normal((8, 8)))
    a, b, c = (to_numpy(F.dropout(x, 0.5, rng=s)) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a != 0, c != 0)
    host = to_numpy(F.dropout(to_numpy(x), 0.5, rng=7))  # the mask is drawn on the host
    np.testing.assert_array_equal(a, host)


def test_dropout_grad(xp, rng):
    x = on(xp, rng.standard_normal((3, 4)))
    check_grad(lambda a: F.dropout(a, 0.4, rng=np.random.default_rng(3)), [x])
    t, gy = Tensor(x, requires_grad=True), on(xp, rng.standard_normal((3, 4)))
    y = F.dropout(t, 0.4, rng=3)
    y.backward(gy)
    mask = to_numpy(y) / to_numpy(x)  # 0 or 1 / (1 - p) per element
    check_forward(t.grad, mask * to_numpy(gy), np.float64)


# --- bad input: a clear error naming the op and the shapes / dtypes -------------------------
def z(xp, *shape, dtype=np.float64):
    return Tensor(xp.zeros(shape, dtype=dtype))


BAD_INPUTS = {  # name: (call(xp), error type, message regex)
    "conv_ndim": (lambda xp: F.conv2d(z(xp, 3, 5, 5), z(xp, 4, 3, 3, 3)), ValueError,
                  r"conv2d: .* got x \(3, 5, 5\) and w \(4, 3, 3, 3\)"),
    "conv_channels": (lambda xp: F.conv2d(z(xp, 2, 3, 5, 5), z(xp, 4, 2, 3, 3)), ValueError,
                      r"conv2d: .*same C.* x \(2, 3, 5, 5\) and w \(4, 2, 3, 3\)"),
    "conv_int": (lambda xp: F.conv2d(z(xp, 2, 3, 5, 5, dtype=np.int64), z(xp, 4, 3, 3, 3)),
                 TypeError, "conv2d: expected float32 or float64 .*int64"),
    "conv_mixed_dtypes": (lambda xp: F.conv2d(z(xp, 1, 3, 5, 5),
                                              z(xp, 4, 3, 3, 3, dtype=np.float32)),
                          TypeError, "conv2d: .*one dtype, got float64, float32"),
    "conv_stride": (lambda xp: F.conv2d(z(xp, 1, 3, 5, 5), z(xp, 4, 3, 3, 3), stride=(1, 2, 3)),
                    ValueError, "conv2d: stride must be an int or a pair"),
    "conv_too_small": (lambda xp: F.conv2d(z(xp, 1, 3, 2, 2), z(xp, 4, 3, 3, 3)), ValueError,
                       r"kernel \(3, 3\) larger than padded input \(2, 2\)"),
    "max_pool_ndim": (lambda xp: F.max_pool2d(z(xp, 2, 4, 4), 2), ValueError,
                      r"max_pool2d: expected x \(N, C, H, W\), got shape \(2, 4, 4\)"),
    "avg_pool_kernel": (lambda xp: F.avg_pool2d(z(xp, 1, 1, 2, 2), 3), ValueError,
                        r"avg_pool2d: kernel \(3, 3\) larger than input \(2, 2\)"),
    "max_pool_int": (lambda xp: F.max_pool2d(z(xp, 1, 1, 2, 2, dtype=np.int32), 2), TypeError,
                     "max_pool2d: expected a float32 or float64 input, got int32"),
    "global_pool_ndim": (lambda xp: F.global_avg_pool2d(z(xp, 2, 3)), ValueError,
                         r"global_avg_pool2d: .*got shape \(2, 3\)"),
    "bn_ndim": (lambda xp: F.batch_norm(z(xp, 2, 3, 4), z(xp, 3), z(xp, 3)), ValueError,
                r"batch_norm: expected x \(N, C\) or \(N, C, H, W\), got \(2, 3, 4\)"),
    "bn_gamma": (lambda xp: F.batch_norm(z(xp, 2, 3, 4, 4), z(xp, 4), z(xp, 3)), ValueError,
                 r"batch_norm: gamma shape \(4,\), expected \(3,\) for x \(2, 3, 4, 4\)"),
    "bn_eval_no_stats": (lambda xp: F.batch_norm(z(xp, 2, 3), z(xp, 3), z(xp, 3),
                                                 training=False),
                         ValueError, "batch_norm: eval mode .* needs running statistics"),
    "bn_int": (lambda xp: F.batch_norm(z(xp, 2, 3, dtype=np.int64), z(xp, 3), z(xp, 3)),
               TypeError, "batch_norm: expected float32 or float64"),
    "residual_shapes": (lambda xp: F.residual_add(z(xp, 2, 3), z(xp, 2, 4)), ValueError,
                        r"residual_add: skip x has shape \(2, 3\) but block output fx has "
                        r"shape \(2, 4\)"),
    "residual_alpha": (lambda xp: F.residual_add(z(xp, 2, 3), z(xp, 2, 3), z(xp, 2)),
                       ValueError, r"residual_add: alpha must be a scalar, got shape \(2,\)"),
    "residual_int": (lambda xp: F.residual_add(z(xp, 2, 3, dtype=np.int64), z(xp, 2, 3)),
                     TypeError, "residual_add: expected float32 or float64.*int64"),
    "ce_shapes": (lambda xp: F.cross_entropy(z(xp, 2, 3), xp.zeros(3, dtype=np.int64)),
                  ValueError, r"cross_entropy: expected logits \(N, K\) and labels \(N,\), "
                              r"got logits \(2, 3\) and labels \(3,\)"),
    "ce_float_labels": (lambda xp: F.cross_entropy(z(xp, 2, 3), xp.zeros(2)), TypeError,
                        "cross_entropy: labels must be integers, got float64"),
    "ce_label_range": (lambda xp: F.cross_entropy(z(xp, 2, 3), xp.asarray([0, 3])), ValueError,
                       r"cross_entropy: labels must be in \[0, 3\), got values in \[0, 3\]"),
    "dropout_p": (lambda xp: F.dropout(z(xp, 3), 1.0), ValueError,
                  r"dropout: p must be in \[0, 1\), got 1.0"),
}
BAD_INPUTS.update({  # every activation rejects integer input by name
    f"{op.__name__}_int": (lambda xp, op=op: op(z(xp, 2, 3, dtype=np.int64)), TypeError,
                           f"{op.__name__}: expected a float32 or float64 input, got int64")
    for op in (F.relu, F.sigmoid, F.tanh, F.softmax, F.log_softmax)})


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(xp, case):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call(xp)
