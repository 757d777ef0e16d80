"""conv_transpose2d and the higher-order gradients of the conv ops: forward against a direct
NumPy scatter loop and the adjoint identity (float32 and float64), float64 gradcheck and
gradgradcheck of every input, a third-order check, bad-argument errors, nn.ConvTranspose2d,
and (where torch is installed) torch.nn.functional.conv_transpose2d. Runs on every `xp`."""
import numpy as np
import pytest

import minires
import minires.ops as F
from conftest import fwd_tol, to_numpy
from helpers import check_forward, check_grad, check_gradgrad, check_module_grad
from minires import nn
from minires.gradcheck import away_from_kinks
from minires.tensor import Tensor

DTYPES = [np.float32, np.float64]


def on(xp, a, dtype=np.float64):
    """A copy of host data `a` as an xp array of `dtype` (never an alias of `a`)."""
    return xp.asarray(np.array(a, dtype=dtype))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def scatter_transpose(x, w, b, stride, padding, output_padding):
    """Direct loops, float64: each input pixel x[:, :, i, j] adds x . w (C_in, C_out, KH, KW)
    into the uncropped output at (i*sh, j*sw); then `padding` rows and columns are cut from
    each side. x (N, C_in, H, W) -> (N, C_out, (H-1)*sh - 2*ph + KH + oph, ...)."""
    (sh, sw), (ph, pw), (oh, ow) = _pair(stride), _pair(padding), _pair(output_padding)
    n, _, h, wd = x.shape
    kh, kw = w.shape[2:]
    full = np.zeros((n, w.shape[1], (h - 1) * sh + kh + oh, (wd - 1) * sw + kw + ow))
    for i in range(h):
        for j in range(wd):
            full[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += np.einsum(
                "nc,cokl->nokl", x[:, :, i, j], w)
    y = full[:, :, ph:full.shape[2] - ph, pw:full.shape[3] - pw]
    return y if b is None else y + b[None, :, None, None]


CASES = [  # x shape, w shape (C_in, C_out, KH, KW), stride, padding, output_padding
    ((2, 3, 4, 4), (3, 2, 3, 3), 1, 0, 0),
    ((2, 3, 4, 4), (3, 2, 3, 3), 1, 1, 0),
    ((1, 2, 4, 3), (2, 3, 3, 3), 2, 1, 1),                # stride 2, padding, output_padding
    ((2, 2, 3, 5), (2, 1, 2, 3), (2, 1), (0, 1), (1, 0)),  # rectangular, pair arguments
    ((2, 3, 3, 3), (3, 4, 1, 1), 2, 0, 1),                # 1x1: zero-insertion upsampling
    ((1, 1, 3, 3), (1, 2, 4, 4), 2, 1, 0),                # the usual 2x upsampler k4 s2 p1
    ((2, 2, 2, 3), (2, 2, 3, 2), 3, (1, 0), (2, 1)),      # stride 3, output_padding 2
]


def _data(rng, xs, ws):
    return rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[1])


# --- forward ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, ws, stride, padding, opad", CASES)
def test_forward_matches_scatter_loops(xp, rng, dtype, xs, ws, stride, padding, opad):
    x, w, b = _data(rng, xs, ws)
    for bias in (b, None):
        y = F.conv_transpose2d(on(xp, x, dtype), on(xp, w, dtype),
                               None if bias is None else on(xp, bias, dtype), stride, padding,
                               opad)
        assert y.device == ("cpu" if xp is np else "cuda")
        check_forward(y, scatter_transpose(x, w, bias, stride, padding, opad), dtype,
                      reduce=True)


@pytest.mark.parametrize("xs, ws, stride, padding, opad", CASES)
def test_adjoint_of_conv2d(xp, rng, xs, ws, stride, padding, opad):
    """<conv2d(z, w), x> == <z, conv_transpose2d(x, w)>: the same w, read as conv2d's
    (O, C, KH, KW) with O = C_in, maps the transposed output's size back to x's."""
    x, w, _ = _data(rng, xs, ws)
    y = to_numpy(F.conv_transpose2d(on(xp, x), on(xp, w), None, stride, padding, opad))
    z = rng.standard_normal(y.shape)
    back = to_numpy(F.conv2d(on(xp, z), on(xp, w), None, stride, padding))
    assert back.shape == x.shape
    np.testing.assert_allclose(np.vdot(back, x), np.vdot(z, y), **fwd_tol(np.float64))


# --- first and second derivatives ---------------------------------------------------------------
@pytest.mark.parametrize("xs, ws, stride, padding, opad", CASES)
def test_conv_transpose2d_grad(xp, rng, xs, ws, stride, padding, opad):
    x, w, b = (on(xp, a) for a in _data(rng, xs, ws))
    check_grad(lambda x, w, b: F.conv_transpose2d(x, w, b, stride, padding, opad), [x, w, b])
    check_grad(lambda x, w: F.conv_transpose2d(x, w, None, stride, padding, opad), [x, w],
               fast=True)
    check_grad(lambda x, w, b: F.conv_transpose2d(x, w, b, stride, padding, opad), [x, w, b],
               check=(False, True, True), fast=True)  # backward skips gx


@pytest.mark.parametrize("xs, ws, stride, padding, opad", CASES[1:5])
def test_conv_transpose2d_gradgrad(xp, rng, xs, ws, stride, padding, opad):
    x, w, b = (on(xp, a) for a in _data(rng, xs, ws))
    check_gradgrad(lambda x, w, b: F.conv_transpose2d(x, w, b, stride, padding, opad),
                   [x, w, b])


def _off_kink(x, w, b, stride, padding, margin=0.05):
    """b shifted per channel until no pre-activation of conv2d(x, w, b) is within `margin` of
    the ReLU's kink at 0 (gradcheck's steps then never flip the mask)."""
    pre = to_numpy(F.conv2d(x, w, None, stride, padding))
    b = to_numpy(b).copy()
    for o in range(b.size):
        while np.abs(pre[:, o] + b[o]).min() < margin:
            b[o] += 0.013
    return b


CONV_CASES = [  # x shape, w shape (O, C, KH, KW), stride, padding, bias, relu
    ((2, 2, 4, 4), (3, 2, 3, 3), 1, 0, False, False),     # plain
    ((2, 2, 4, 5), (3, 2, 3, 2), 1, 1, True, False),      # bias
    ((1, 2, 6, 5), (2, 2, 3, 3), 2, 1, True, False),      # stride 2 + padding, rows floored
    ((2, 2, 5, 4), (3, 2, 3, 3), (2, 1), (1, 0), True, True),  # fused ReLU
    ((2, 3, 4, 4), (2, 3, 1, 1), 1, 0, True, False),      # 1x1
    ((1, 2, 5, 5), (2, 2, 1, 1), 2, 0, False, True),      # 1x1 stride 2, ReLU, constant bias
]


@pytest.mark.parametrize("xs, ws, stride, padding, bias, relu", CONV_CASES)
def test_conv2d_gradgrad(xp, rng, xs, ws, stride, padding, bias, relu):
    x = on(xp, away_from_kinks(rng.standard_normal(xs)) if relu else rng.standard_normal(xs))
    w, b = on(xp, rng.standard_normal(ws)), on(xp, rng.standard_normal(ws[0]))
    if relu:
        b = on(xp, _off_kink(x, w, b, stride, padding))
    if bias:
        check_gradgrad(lambda x, w, b: F.conv2d(x, w, b, stride, padding, relu), [x, w, b])
    else:
        check_gradgrad(lambda x, w: F.conv2d(x, w, b if relu else None, stride, padding, relu),
                       [x, w])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_graph_gradients_equal_backward(xp, rng, dtype, relu):
    """create_graph=True (backward_graph) gives the kernels' backward values, float32 too."""
    x, w, b = (Tensor(on(xp, rng.standard_normal(s), dtype), requires_grad=True)
               for s in ((2, 3, 7, 6), (4, 3, 3, 3), (4,)))
    g = on(xp, rng.standard_normal((2, 4, 4, 3)), dtype)  # W: 6 -> 3, the last column unused
    plain = minires.grad(F.conv2d(x, w, b, 2, 1, relu), [x, w, b], g)
    graph = minires.grad(F.conv2d(x, w, b, 2, 1, relu), [x, w, b], g, create_graph=True)
    # gb = sum of the constant g: no graph to record (as in PyTorch); gx and gw depend on w, x
    assert [q.requires_grad for q in graph] == [True, True, False]
    for p, q in zip(plain, graph):
        check_forward(q, to_numpy(p).astype(np.float64), dtype, reduce=True)


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_third_order(xp, rng, op):
    """gradgradcheck of a first derivative: third derivatives of sum(tanh(op(x, w, b))), so
    backward_graph of every conv op runs on a graph that itself came from backward_graph."""
    conv = F.conv2d if op == "conv2d" else F.conv_transpose2d
    ws = (3, 2, 3, 3) if op == "conv2d" else (2, 3, 3, 3)
    x, w, b = (on(xp, rng.standard_normal(s)) for s in ((1, 2, 4, 4), ws, (3,)))

    def first_derivative(x, w, b):
        # gradcheck also calls this without grad and with constant inputs: differentiate
        # anyway, through fresh leaves then (those calls only read the values)
        with minires.enable_grad():
            x, w = (t if t.requires_grad else Tensor(t.data, requires_grad=True) for t in (x, w))
            y = F.sum(F.tanh(conv(x, w, b, 2, 1)))
            gx, gw = minires.grad(y, [x, w], create_graph=True)
            return F.concat([F.reshape(gx, -1), F.reshape(gw, -1)])

    check_gradgrad(first_derivative, [x, w, b])


# --- bad arguments: one error naming the op and the shapes --------------------------------------
def z(xp, *shape, dtype=np.float64):
    return Tensor(xp.zeros(shape, dtype=dtype))


BAD = {  # name: (call(xp), error type, message regex)
    "ndim": (lambda xp: F.conv_transpose2d(z(xp, 3, 4, 4), z(xp, 3, 2, 3, 3)), ValueError,
             r"conv_transpose2d: expected x \(N, C_in, H, W\) and w \(C_in, C_out, KH, KW\)"
             r".* got x \(3, 4, 4\) and w \(3, 2, 3, 3\)"),
    "channels": (lambda xp: F.conv_transpose2d(z(xp, 2, 3, 4, 4), z(xp, 2, 3, 3, 3)),
                 ValueError, r"conv_transpose2d: .*\(C_in, C_out, KH, KW\) with the same C_in"
                             r".*FIRST axis.* got x \(2, 3, 4, 4\) and w \(2, 3, 3, 3\)"),
    "output_padding": (lambda xp: F.conv_transpose2d(z(xp, 1, 2, 3, 3), z(xp, 2, 2, 3, 3),
                                                     stride=2, output_padding=(1, 2)),
                       ValueError, r"conv_transpose2d: output_padding must be >= 0 and smaller "
                                   r"than stride, got output_padding \(1, 2\) and stride \(2, 2\)"),
    "output_padding_stride_1": (lambda xp: F.conv_transpose2d(z(xp, 1, 2, 3, 3),
                                                              z(xp, 2, 2, 3, 3), output_padding=1),
                                ValueError, r"conv_transpose2d: output_padding .* stride \(1, 1\)"),
    "int": (lambda xp: F.conv_transpose2d(z(xp, 1, 2, 3, 3, dtype=np.int64), z(xp, 2, 2, 3, 3)),
            TypeError, "conv_transpose2d: expected float32 or float64 .*int64"),
    "mixed_dtypes": (lambda xp: F.conv_transpose2d(z(xp, 1, 2, 3, 3),
                                                   z(xp, 2, 2, 3, 3, dtype=np.float32)),
                     TypeError, "conv_transpose2d: .*one dtype, got float64, float32"),
    "bias": (lambda xp: F.conv_transpose2d(z(xp, 1, 2, 3, 3), z(xp, 2, 4, 3, 3), z(xp, 2)),
             ValueError, r"conv_transpose2d: bias shape \(2,\), expected \(C_out,\) = \(4,\) "
                         r"for w \(2, 4, 3, 3\)"),
    "stride_pair": (lambda xp: F.conv_transpose2d(z(xp, 1, 2, 3, 3), z(xp, 2, 2, 3, 3),
                                                  stride=(1, 2, 3)),
                    ValueError, "conv_transpose2d: stride must be an int or a pair"),
    "stride_zero": (lambda xp: F.conv_transpose2d(z(xp, 1, 2, 3, 3), z(xp, 2, 2, 3, 3),
                                                  stride=0),
                    ValueError, r"conv_transpose2d: stride must be >= 1 .* \(0, 0\)"),
    "empty_output": (lambda xp: F.conv_transpose2d(z(xp, 1, 1, 1, 1), z(xp, 1, 1, 1, 1),
                                                   padding=1),
                     ValueError, r"conv_transpose2d: output size \(-1, -1\) < 1 for x "
                                 r"\(1, 1, 1, 1\), w \(1, 1, 1, 1\)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments(xp, case):
    call, error, message = BAD[case]
    with pytest.raises(error, match=message):
        call(xp)


# --- nn.ConvTranspose2d --------------------------------------------------------------------------
def _device(xp):
    return "cpu" if xp is np else "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_forward_and_parameters(xp, rng, dtype):
    layer = nn.ConvTranspose2d(3, 2, (3, 2), stride=2, padding=(1, 0), output_padding=1,
                               rng=0, dtype=dtype).to(_device(xp))
    assert [(n, p.shape, p.dtype) for n, p in layer.named_parameters()] == [
        ("weight", (3, 2, 3, 2), dtype), ("bias", (2,), dtype)]
    assert not to_numpy(layer.bias).any()
    layer.bias.data[...] = on(xp, [0.5, -1.0], dtype)
    x = rng.standard_normal((2, 3, 4, 5))
    y = layer(on(xp, x, dtype))
    assert y.shape == (2, 2, 8, 11) and y.device == _device(xp)
    w, b = (to_numpy(p).astype(np.float64) for p in (layer.weight, layer.bias))
    check_forward(y, scatter_transpose(x.astype(dtype), w, b, 2, (1, 0), 1), dtype,
                  reduce=True)
    no_bias = nn.ConvTranspose2d(3, 2, 3, bias=False, rng=0)
    assert [n for n, _ in no_bias.named_parameters()] == ["weight"] and no_bias.bias is None


def test_layer_init_follows_pytorch_fan_in():
    """PyTorch's fan-in for a (C_in, C_out, KH, KW) weight comes from its second axis."""
    w = nn.ConvTranspose2d(16, 64, 3, rng=0).weight.data.astype(np.float64)
    # 9216 draws: the std estimate has relative sd ~0.7%; 4% is far outside chance
    assert abs(w.std() / np.sqrt(2 / (64 * 9)) - 1) < 0.04 and abs(w.mean()) < 0.02
    np.testing.assert_array_equal(w, nn.ConvTranspose2d(16, 64, 3, rng=0, dtype=np.float64)
                                  .weight.data.astype(np.float32))  # one seed, either dtype


def test_layer_gradcheck(xp, rng):
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, rng=0,
                               dtype=np.float64).to(_device(xp))
    layer.bias.data[...] = on(xp, rng.standard_normal(3))
    check_module_grad(layer, on(xp, rng.standard_normal((2, 2, 3, 4))))


def test_layer_repr_and_errors(xp):
    layer = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
    text = ("ConvTranspose2d(3, 2, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), "
            "output_padding=(1, 1), bias=True)")
    assert repr(layer) == text
    layer.to(_device(xp))
    with pytest.raises(ValueError, match=r"ConvTranspose2d\(3, 2, .*\): expected input of shape "
                                         r"\(N, 3, H, W\), got \(3, 4, 4\) \(add the batch"):
        layer(xp.zeros((3, 4, 4), np.float32))
    with pytest.raises(TypeError, match=r"ConvTranspose2d\(3, 2, .*\): input dtype float64"):
        layer(xp.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"ConvTranspose2d: output_padding must be >= 0 and "
                                         r"smaller than stride, got output_padding \(2, 2\)"):
        nn.ConvTranspose2d(3, 2, 3, stride=2, output_padding=2)
    with pytest.raises(TypeError, match="ConvTranspose2d: dtype must be float32 or float64"):
        nn.ConvTranspose2d(3, 2, 3, dtype=np.int32)


# --- against PyTorch, where installed (not in CI) -----------------------------------------------
@pytest.mark.parametrize("xs, ws, stride, padding, opad", CASES)
def test_matches_torch(xp, rng, xs, ws, stride, padding, opad):
    torch = pytest.importorskip("torch")
    x, w, b = _data(rng, xs, ws)
    ts = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    ty = torch.nn.functional.conv_transpose2d(*ts, _pair(stride), _pair(padding), _pair(opad))
    g = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(g))
    ours = [Tensor(on(xp, a), requires_grad=True) for a in (x, w, b)]
    y = F.conv_transpose2d(*ours, stride, padding, opad)
    y.backward(on(xp, g))
    check_forward(y, ty.detach().numpy(), np.float64)
    for mine, theirs in zip(ours, ts):
        check_forward(mine.grad, theirs.grad.numpy(), np.float64)
