"""Helpers shared by the op and layer tests: forward against a reference, gradcheck wrappers
and a direct-loop conv oracle. Tolerances come from the one table in conftest.py."""
import numpy as np

from conftest import fwd_tol, to_numpy, tol
import minires
from minires.gradcheck import gradcheck, gradgradcheck
from minires.tensor import Tensor, enable_grad


def check_forward(actual, expected, dtype, reduce=False):
    """`actual` (Tensor or array, any device) has dtype `dtype`, the shape of the reference
    `expected` (any device, usually float64) and its values within fwd_tol(dtype, reduce)."""
    assert actual.dtype == dtype, (actual.dtype, np.dtype(dtype))
    expected = to_numpy(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(to_numpy(actual), expected, **fwd_tol(dtype, reduce))


def check_grad(fn, inputs, **kwargs):
    """gradcheck(fn, inputs, **kwargs) at the grad_f64 tolerances; returns its report
    {"max_abs": ..., "max_rel": ...} and raises GradcheckError on a mismatch."""
    return gradcheck(fn, inputs, **tol("grad_f64"), **kwargs)


def check_gradgrad(fn, inputs, **kwargs):
    """gradgradcheck(fn, inputs, **kwargs) at the grad_f64 tolerances (second derivatives
    through minires.grad(create_graph=True)); returns its report, raises GradcheckError."""
    return gradgradcheck(fn, inputs, **tol("grad_f64"), **kwargs)


def adjoint(fn, x):
    """g -> d<g, fn(x)>/dx, built with create_graph=True: fn's backward_graph as a function of
    g, so check_grad checks the backward of the op it records and check_gradgrad that op's
    own backward_graph (gradients of order three)."""
    def first(g):
        with enable_grad():  # gradcheck evaluates fn under no_grad
            t = Tensor(x, requires_grad=True)
            return minires.grad(fn(t), [t], g, create_graph=True)[0]

    first.__qualname__ = f"adjoint of {getattr(fn, '__qualname__', fn)}"
    return first


def _set_by_name(module, name, value):
    *path, last = name.split(".")
    for part in path:
        module = module[int(part)] if isinstance(module, (list, tuple)) else getattr(module, part)
    setattr(module, last, value)


def param_fn(module):
    """(fn, arrays): fn(x, *params) installs the given tensors as the module's parameters
    (so gradcheck differentiates through them) and returns module(x); arrays are the
    parameters' current values, in named_parameters() order."""
    names = [n for n, _ in module.named_parameters()]
    arrays = [p.data for _, p in module.named_parameters()]

    def fn(x, *params):
        for name, p in zip(names, params):
            _set_by_name(module, name, p)
        return module(x)

    fn.__qualname__ = type(module).__name__
    return fn, arrays


def check_module_grad(module, x, **kwargs):
    """check_grad of module(x) with respect to x and every parameter of the module."""
    fn, params = param_fn(module)
    return check_grad(fn, [x] + params, **kwargs)


def naive_conv(x, w, b, stride, padding):
    """Direct loops: y[n,o,i,j] = sum_{c,p,q} w[o,c,p,q] * xpad[n,c,i*s+p,j*s+q] + b[o].

    x (N, C, H, W), w (O, C, KH, KW), b (O,); int stride and padding -> (N, O, OH, OW).
    """
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            y[:, :, i, j] = np.einsum("ncpq,ocpq->no", win, w)
    return y + b[None, :, None, None]


def fail_on(monkeypatch, target, attr, exc, after=0):
    """Make target.attr raise exc on its (after+1)-th call (calls before it go through)."""
    real, calls = getattr(target, attr), []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, fake)


def same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b


def sgd_setup(train_set, n=128, batch_size=16):
    """(seed net, DataLoader over the first n images of train_set (x, y), SGD 0.01 momentum
    0.9): the small run the fault tests poison."""
    from minires import data, models, optim
    x, y = train_set
    loader = data.DataLoader(x[:n], y[:n], batch_size=batch_size, seed=0)
    model = models.seed_net(rng=0)
    return model, loader, optim.SGD(model.parameters(), 0.01, momentum=0.9)


def param_copies(model):
    """{name: a copy of the parameter's array}."""
    return {n: p.data.copy() for n, p in model.named_parameters()}
