"""The cases `minires gradcheck` runs: every op and layer on tiny float64 inputs, checked to
the first (gradcheck) and second (gradgradcheck) order.

Imports minires.ops, nn, models, gradcheck and backend (the train/cli layer).
"""
import time

import numpy as np

import minires.ops as F
from minires import backend, models, nn
from minires.gradcheck import (GradcheckError, away_from_kinks, distinct, gradcheck,
                               gradgradcheck)

F64 = np.float64


def _op_cases(r):
    """(name, fn, inputs) for every functional op; inputs are float64 host arrays."""
    a, b = r.standard_normal((3, 4)), r.standard_normal((3, 4))
    pos = r.uniform(0.5, 2.0, (3, 4))
    img, w = r.standard_normal((2, 3, 5, 5)), r.standard_normal((4, 3, 3, 3))
    big = np.where(img >= 0, img + 1, img - 1)  # |x| >= 1: x + 0.5 * fx stays off ReLU's kink
    return [
        ("add", F.add, [a, r.standard_normal(4)]),  # with broadcasting
        ("sub", F.sub, [a, b]),
        ("mul", F.mul, [a, r.standard_normal((3, 1))]),
        ("div", F.div, [a, pos]),
        ("neg", F.neg, [a]),
        ("pow", F.pow, [pos, b]),
        ("exp", F.exp, [a]),
        ("log", F.log, [pos]),
        ("sum", lambda x: F.sum(x, axis=1), [a]),
        ("mean", lambda x: F.mean(x, axis=0, keepdims=True), [a]),
        ("max", lambda x: F.max(x, axis=1), [distinct(a)]),
        ("min", lambda x: F.min(x, axis=0), [distinct(a)]),
        ("clip", lambda x: F.clip(x, -0.5, 0.5), [_off(a, (-0.5, 0.5))]),
        ("reshape", lambda x: F.reshape(x, 4, 3), [a]),
        ("transpose", F.transpose, [img]),
        ("flatten", F.flatten, [img]),
        ("broadcast_to", lambda x: F.broadcast_to(x, (2, 3, 4)), [a]),
        ("sum_to", lambda x: F.sum_to(x, (3, 1)), [a]),
        ("getitem", lambda x: F.getitem(x, (slice(1, 3), None, 2)), [a]),
        ("concat", lambda x, y: F.concat([x, y], axis=1), [a, b]),
        ("gather", lambda x: F.gather(x, 1, np.array([[0, 3, 3], [1, 1, 2], [2, 0, 0]])), [a]),
        ("matmul", F.matmul, [a, b.T]),
        ("linear", F.linear, [a, r.standard_normal((5, 4)), r.standard_normal(5)]),
        ("relu", F.relu, [away_from_kinks(img)]),
        ("leaky_relu", lambda x: F.leaky_relu(x, 0.1), [away_from_kinks(img)]),
        ("sigmoid", F.sigmoid, [a]),
        ("tanh", F.tanh, [a]),
        ("log_softmax", F.log_softmax, [a]),
        ("softmax", lambda x: F.softmax(x, axis=0), [a]),
        ("cross_entropy", lambda x: F.cross_entropy(x, np.array([0, 3, 1])), [a]),
        ("mse_loss", F.mse_loss, [a, b]),
        ("dropout", lambda x: F.dropout(x, 0.5, rng=0), [a]),  # same mask on every call
        ("conv2d", lambda x, w, b: F.conv2d(x, w, b, 1, 1), [img, w, r.standard_normal(4)]),
        ("conv2d stride 2", lambda x, w: F.conv2d(x, w, None, 2, 0), [img, w]),
        ("conv_transpose2d", lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1),
         [r.standard_normal((2, 4, 3, 3)), w, r.standard_normal(3)]),  # w as (C_in=4, 3, 3, 3)
        ("max_pool2d", lambda x: F.max_pool2d(x, 2), [distinct(img)]),
        ("max_pool2d padding", lambda x: F.max_pool2d(x, 3, 2, 1), [distinct(img)]),
        ("avg_pool2d", lambda x: F.avg_pool2d(x, 2), [img]),
        ("avg_pool2d padding", lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
         [img]),
        ("global_avg_pool2d", F.global_avg_pool2d, [img]),
        ("batch_norm", F.batch_norm, [img, r.uniform(0.5, 1.5, 3), r.standard_normal(3)]),
        ("residual_add", F.residual_add, [img, r.standard_normal(img.shape)]),
        ("residual_add alpha relu", lambda x, fx, al: F.residual_add(x, fx, al, relu=True),
         [big, r.uniform(-0.5, 0.5, img.shape), np.array(0.5)]),
    ]


def _off(x, kinks, margin=1e-2):
    """x with every value at least `margin` away from each of the `kinks`."""
    for k in kinks:
        x = k + away_from_kinks(x - k, margin)
    return x


def _layers(r):
    """(name, module, input) for every layer, float64, seeded."""
    kw = dict(dtype=F64)

    def conv(c_in, c_out):
        return nn.Conv2d(c_in, c_out, 3, padding=1, rng=r, **kw)

    rezero = nn.ReZero(nn.Sequential(conv(2, 2), nn.ReLU()), **kw)
    rezero.alpha.data[...] = 0.5  # at its initial 0 the block's gradients would all be zero
    img = r.standard_normal((2, 2, 6, 6))
    return [
        ("nn.Linear", nn.Linear(4, 3, rng=r, **kw), r.standard_normal((2, 4))),
        ("nn.Conv2d", nn.Conv2d(2, 3, 3, stride=2, padding=1, rng=r, **kw), img),
        ("nn.ConvTranspose2d", nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1,
                                                  output_padding=1, rng=r, **kw), img),
        ("nn.ReLU", nn.ReLU(), away_from_kinks(img)),
        ("nn.MaxPool2d", nn.MaxPool2d(2), distinct(img)),
        ("nn.AvgPool2d", nn.AvgPool2d(3), img),
        ("nn.GlobalAvgPool2d", nn.GlobalAvgPool2d(), img),
        ("nn.Flatten", nn.Flatten(), img),
        ("nn.Embedding", nn.Embedding(5, 3, rng=r, **kw), np.array([[0, 4, 4], [2, 1, 0]])),
        ("nn.BatchNorm2d", nn.BatchNorm2d(2, **kw), img),
        ("nn.Dropout", nn.Dropout(0.5, rng=0), img),
        ("nn.Residual", nn.Residual(nn.Sequential(conv(2, 2), nn.ReLU(), conv(2, 2)),
                                    relu=True), img),
        ("nn.ReZero", rezero, img),
        ("nn.BasicBlock", nn.BasicBlock(2, 3, stride=2, rng=r, **kw), img),
        ("nn.Highway", nn.Highway(nn.Linear(4, 4, rng=r, **kw), nn.Linear(4, 4, rng=r, **kw)),
         r.standard_normal((3, 4))),
        ("nn.DenseSkip", nn.DenseSkip(conv(2, 3)), img),
        ("models.seed_net", models.seed_net(channels=2, rng=r, **kw),
         r.standard_normal((2, 1, 28, 28))),
    ]


def _resolve(module, dotted):
    """(owner, attribute) of a dotted parameter name such as '0.block.weight'."""
    *path, attr = dotted.split(".")
    for part in path:
        module = module[int(part)] if isinstance(module, (list, tuple)) else getattr(module,
                                                                                     part)
    return module, attr


def _layer_case(name, layer, x):
    """A gradcheck case over the layer's input and every parameter of the layer."""
    names = [n for n, _ in layer.named_parameters()]
    arrays = [p.data for _, p in layer.named_parameters()]

    def fn(x, *params):
        for dotted, p in zip(names, params):  # route the checker's tensors into the layer
            setattr(*_resolve(layer, dotted), p)
        if isinstance(layer, nn.Dropout):
            layer.rng = np.random.default_rng(0)  # one fixed mask for every evaluation
        return layer(x)

    fn.__qualname__ = name
    return name, fn, [x] + arrays


def cases(seed=0):
    """Every (name, fn, inputs) case, ops first, then layers."""
    r = np.random.default_rng(seed)
    return _op_cases(r) + [_layer_case(*c) for c in _layers(r)]


def run(device="cpu", seed=0, names=None, orders=(1, 2)):
    """Check every case on `device`, yielding one row {name, order, ok, fast, seconds,
    max_abs, max_rel, error} per case and order as it finishes: order 1 is gradcheck (first
    derivatives), order 2 gradgradcheck (second derivatives, through create_graph=True).

    Large cases (over 1,000 checked elements) run in fast mode (one random direction per
    input), the rest element by element. `names` restricts the run to those case names.
    """
    checkers = {1: gradcheck, 2: gradgradcheck}
    for name, fn, inputs in cases(seed):
        if names is not None and name not in names:
            continue
        inputs = [np.asarray(a) for a in inputs]  # floating ones in float64, indices as is
        inputs = [backend.to_device(a.astype(F64) if a.dtype.kind == "f" else a, device)
                  for a in inputs]
        fast = sum(int(np.prod(a.shape)) for a in inputs) > 1000
        for order in orders:
            start = time.perf_counter()
            try:
                report = checkers[order](fn, inputs, fast=fast, seed=seed)
                row = dict(ok=True, error="")
            except (GradcheckError, NotImplementedError) as err:  # no backward_graph: a FAIL
                report, row = dict(max_abs=None, max_rel=None), dict(ok=False, error=str(err))
            yield dict(name=name, order=order, seconds=time.perf_counter() - start,
                       fast=fast, max_abs=report["max_abs"], max_rel=report["max_rel"], **row)
