"""The one list of minires's kernels: for each, its name, family, argument check (defined
beside its reference implementation in kernels/reference.py), test cases and bench rows.
kernels/__init__.py builds its dispatch functions from it, kernels.cpu and kernels.cuda
import each kernel from the family module it names, the tests and `python -m bench` iterate
over it. docs/kernels.md says how to add a kernel. Imports numpy and kernels.reference
(checks, test cases), never minires.

A check `check(*args, **kwargs)` takes the public call's arguments, raises TypeError or
ValueError naming the kernel, and returns the positional arguments the implementations take
(pairs as int tuples, flags as bools). The first argument picks the device.
"""
import collections
import dataclasses
from typing import Callable

import numpy as np

from . import reference
from .reference import (check_conv2d_forward, check_conv2d_backward_input,
                        check_conv2d_backward_weight, check_relu_forward, check_relu_backward,
                        check_residual_add_forward, check_residual_add_backward,
                        check_max_pool2d_forward, check_max_pool2d_backward,
                        check_batch_norm_forward, check_batch_norm_backward)


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str  # kernels.<name>, and the same name in reference and the family modules
    family: str  # kernels/cpu/<family>.py and kernels/cuda/<family>.py define it
    check: Callable  # check(*args, **kwargs) -> the implementations' positional args
    cases: Callable  # cases(rng, dtype) -> [Case]: tiny and threaded sizes
    # per output, how the CPU result compares with the reference: "exact" (bitwise, reference
    # at the same dtype), "elementwise" or "reduce" (tests/conftest.py's TOL, float64 oracle)
    compare: tuple = ("elementwise",)
    mutates: tuple = ()  # argument positions updated in place (compared like outputs)


Case = collections.namedtuple("Case", "args threaded")  # threaded: big enough to split


@dataclasses.dataclass(frozen=True)
class BenchRow:
    label: str
    kernels: tuple  # the registered kernels this row times
    arrays: Callable  # arrays(rng, n) -> {name: float32 host array} at batch n
    ours: Callable  # ours(k, a) -> (fwd, both) callables; k is kernels or kernels.reference
    torch: Callable  # torch(torch, t) -> (fwd, both) over torch tensors t (same names)


# --- test cases: tiny shapes, and shapes big enough for the threaded path ----------------
def _randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _many(rng, shape_threaded_pairs, make):
    return [Case(make(rng, shape), threaded) for shape, threaded in shape_threaded_pairs]


def _sizes(*tiny, threaded):
    return [(s, False) for s in tiny] + [(s, True) for s in threaded]


ELEMENTWISE = _sizes((3, 5, 7), (2, 3, 5, 7), threaded=[(64, 16, 28, 28)])
# x shape, w shape, stride, padding; the last is the seed net's 7x7 layer at batch 64
CONV = [((2, 3, 7, 9), (4, 3, 3, 5), (1, 1), (0, 2), False),
        ((2, 3, 7, 9), (5, 3, 3, 3), (2, 2), (1, 1), False),
        ((1, 2, 4, 5), (3, 2, 3, 2), (1, 1), (3, 2), False),  # padding wider than the kernel
        ((64, 16, 7, 7), (16, 16, 3, 3), (1, 1), (1, 1), True)]
# x shape, kernel, stride: overlapping, rectangular, floored, the seed net's pools (threaded)
POOL = [((2, 3, 9, 9), (3, 3), (2, 2), False), ((1, 2, 7, 8), (3, 2), (2, 1), False),
        ((2, 3, 7, 7), (2, 2), (2, 2), False), ((64, 16, 28, 28), (4, 4), (4, 4), True),
        ((64, 16, 7, 7), (2, 2), (2, 2), True)]
BATCH_NORM = _sizes((2, 3, 4, 5), (6, 3), threaded=[(16, 8, 24, 24)])


def _conv_cases(make):
    """make(rng, dtype, x shape, w shape, stride, padding, fused) for every CONV entry; every
    other one fused with a ReLU (relu=True forward, the ReLU output y given to backward)."""
    def cases(rng, dtype):
        return [Case(make(rng, dtype, *c[:4], i % 2 == 1), c[4]) for i, c in enumerate(CONV)]
    return cases


def _conv_gy_y(rng, dtype, xs, ws, s, p, fused):
    """(gy, y or None) of a conv of x xs with w ws: y a ReLU output (zeros where masked)."""
    shape = reference.conv_shapes("", xs, ws, s, p)[2]
    y = reference.relu_forward(_randn(rng, shape, dtype)) if fused else None
    return _randn(rng, shape, dtype), y


def _conv_forward_args(rng, dtype, xs, ws, s, p, fused):
    return (_randn(rng, xs, dtype), _randn(rng, ws, dtype), _randn(rng, ws[0], dtype), s, p,
            fused)


def _conv_input_args(rng, dtype, xs, ws, s, p, fused):
    gy, y = _conv_gy_y(rng, dtype, xs, ws, s, p, fused)
    return gy, _randn(rng, ws, dtype), xs, s, p, y


def _conv_weight_args(rng, dtype, xs, ws, s, p, fused):
    gy, y = _conv_gy_y(rng, dtype, xs, ws, s, p, fused)
    return gy, _randn(rng, xs, dtype), ws, s, p, True, y


def _pool_data(rng, shape, dtype):
    return rng.integers(-3, 4, shape).astype(dtype)  # many ties: the first maximum must win


def _pool_backward_args(rng, dtype, shape, kernel, stride):
    y, argmax = reference.max_pool2d_forward(_pool_data(rng, shape, dtype), kernel, stride)
    return _randn(rng, y.shape, dtype), argmax, shape, kernel, stride


# (alpha, relu) per size of ELEMENTWISE * 2: the threaded ones with and without alpha
RESIDUAL = [(None, True), (0.625, False), (None, False), (1.0, True), (-2.0, False),
            (0.625, True)]


def _alpha_array(alpha, dtype, ndim):
    return None if alpha is None else np.full((1,) * ndim, alpha, dtype)  # (), (1,), (1, 1)


def _residual_forward_cases(rng, dtype):
    return [Case((_randn(rng, s, dtype), _randn(rng, s, dtype),
                  _alpha_array(alpha, dtype, i % 3), relu), threaded)
            for i, ((s, threaded), (alpha, relu)) in enumerate(zip(ELEMENTWISE * 2, RESIDUAL))]


def _residual_backward_cases(rng, dtype):
    cases = []
    for i, ((shape, threaded), (alpha, relu)) in enumerate(zip(ELEMENTWISE * 2, RESIDUAL[::-1])):
        gy, x, fx = (_randn(rng, shape, dtype) for _ in range(3))
        a = _alpha_array(alpha, dtype, i % 3)
        cases.append(Case((gy, reference.residual_add_forward(x, fx, a, relu), fx, a, relu),
                          threaded))
    return cases


def _bn_arrays(rng, shape, dtype):
    c = shape[1]
    host = [2 * rng.standard_normal(shape) + 1, rng.standard_normal(c), rng.standard_normal(c),
            0.3 * rng.standard_normal(c), rng.random(c) + 0.5]
    return [a.astype(dtype) for a in host]


def _bn_forward_cases(rng, dtype):
    return [Case((*_bn_arrays(rng, s, dtype), training, 0.2, 1e-3, training), threaded)
            for (s, threaded), training in zip(BATCH_NORM + BATCH_NORM, [True] * 3 + [False] * 3)]


def _bn_backward_cases(rng, dtype):
    cases = []
    for (shape, threaded), training in zip(BATCH_NORM + BATCH_NORM, [True] * 3 + [False] * 3):
        x, gamma, beta, rm, rv = _bn_arrays(rng, shape, dtype)
        _, mean, inv_std = reference.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.1,
                                                        1e-5, False)
        # relu=False: the ReLU mask would be recomputed in float64 by the oracle
        # (tests/test_norm_kernels.py checks the fused mask against the forward's output)
        cases.append(Case((_randn(rng, shape, dtype), x, gamma, beta, mean, inv_std, training,
                           False), threaded))
    return cases


# --- bench rows: the seed net's shapes at batch n, float32 --------------------------------
def _torch_conv(torch, t, o):
    conv, back = torch.nn.functional.conv2d, torch.ops.aten.convolution_backward

    def both():
        conv(t["x"], t["w"], t["b"], 1, 1)
        back(t["gy"], t["x"], t["w"], [o], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
             [True, True, True])
    return (lambda: conv(t["x"], t["w"], t["b"], 1, 1)), both


def _conv_row(c, o, hw):
    def arrays(rng, n):
        return {"x": _randn(rng, (n, c, hw, hw), np.float32),
                "w": _randn(rng, (o, c, 3, 3), np.float32) * np.float32(0.1),
                "b": _randn(rng, o, np.float32), "gy": _randn(rng, (n, o, hw, hw), np.float32)}

    def ours(k, a):
        def fwd():
            return k.conv2d_forward(a["x"], a["w"], a["b"], (1, 1), (1, 1))

        def both():
            fwd()
            k.conv2d_backward_input(a["gy"], a["w"], a["x"].shape, (1, 1), (1, 1))
            k.conv2d_backward_weight(a["gy"], a["x"], a["w"].shape, (1, 1), (1, 1), True)
        return fwd, both
    return BenchRow(f"conv3x3 {c}->{o}", ("conv2d_forward", "conv2d_backward_input",
                                          "conv2d_backward_weight"),
                    arrays, ours, lambda torch, t: _torch_conv(torch, t, o))


def _activations(hw, *names):
    def arrays(rng, n):
        return {name: _randn(rng, (n, 16, hw, hw), np.float32) for name in names}
    return arrays


def _relu_row(hw):
    def ours(k, a):
        return (lambda: k.relu_forward(a["x"])), (
            lambda: k.relu_backward(a["gy"], k.relu_forward(a["x"])))

    def torch_(torch, t):
        return (lambda: torch.relu(t["x"])), (
            lambda: torch.ops.aten.threshold_backward(t["gy"], torch.relu(t["x"]), 0))
    return BenchRow("relu", ("relu_forward", "relu_backward"), _activations(hw, "x", "gy"),
                    ours, torch_)


def _residual_row(hw, alpha, relu):
    """What ops.residual_add runs. Without alpha its backward hands one gradient array to
    both inputs: no kernel (plain add) or one relu_backward; with alpha, the fused kernel.
    PyTorch: its add (and mul, relu) with autograd's backward of them."""
    def ours(k, a):
        al = np.array([0.5], np.float32) if alpha else None

        def fwd():
            return k.residual_add_forward(a["x"], a["fx"], al, relu)

        def both():
            y = fwd()
            if alpha:
                k.residual_add_backward(a["gy"], y, a["fx"], al, relu)
            elif relu:
                k.relu_backward(a["gy"], y)
        return fwd, both

    def torch_(torch, t):
        al = torch.tensor([0.5])

        def fwd():
            s = t["x"] + al * t["fx"] if alpha else t["x"] + t["fx"]
            return torch.relu(s) if relu else s

        def both():
            y = fwd()
            g = torch.ops.aten.threshold_backward(t["gy"], y, 0) if relu else t["gy"]
            if alpha:
                return g * al, (g * t["fx"]).sum()
            return g
        return fwd, both
    used = ("residual_add_forward",) + (("residual_add_backward",) if alpha else
                                        ("relu_backward",) if relu else ())
    label = "residual_add" + (" alpha" if alpha else "") + (" relu" if relu else "")
    return BenchRow(label, used, _activations(hw, "x", "fx", "gy"), ours, torch_)


def _pool_row(hw, k_):
    def arrays(rng, n):
        return {"x": _randn(rng, (n, 16, hw, hw), np.float32),
                "gy": _randn(rng, (n, 16, hw // k_, hw // k_), np.float32)}

    def ours(k, a):
        def both():
            _, am = k.max_pool2d_forward(a["x"], (k_, k_), (k_, k_))
            k.max_pool2d_backward(a["gy"], am, a["x"].shape, (k_, k_), (k_, k_))
        return (lambda: k.max_pool2d_forward(a["x"], (k_, k_), (k_, k_))), both

    def torch_(torch, t):
        pool = torch.nn.functional.max_pool2d

        def both():
            _, idx = pool(t["x"], k_, k_, return_indices=True)
            torch.ops.aten.max_pool2d_with_indices_backward(t["gy"], t["x"], [k_, k_],
                                                            [k_, k_], [0, 0], [1, 1], False, idx)
        return (lambda: pool(t["x"], k_, k_, return_indices=True)), both
    return BenchRow(f"max_pool2d {k_}", ("max_pool2d_forward", "max_pool2d_backward"), arrays,
                    ours, torch_)


def _batch_norm_row(hw):
    def arrays(rng, n):
        return {"x": _randn(rng, (n, 16, hw, hw), np.float32),
                "gy": _randn(rng, (n, 16, hw, hw), np.float32),
                "gamma": np.ones(16, np.float32), "beta": np.zeros(16, np.float32),
                "rm": np.zeros(16, np.float32), "rv": np.ones(16, np.float32)}

    def ours(k, a):
        def fwd():
            return k.batch_norm_forward(a["x"], a["gamma"], a["beta"], a["rm"], a["rv"], True,
                                        0.1, 1e-5, True)

        def both():
            _, mean, inv_std = fwd()
            k.batch_norm_backward(a["gy"], a["x"], a["gamma"], a["beta"], mean, inv_std, True,
                                  True)
        return fwd, both

    def torch_(torch, t):
        aten = torch.ops.aten

        def fwd():
            y, mean, inv_std = aten.native_batch_norm(t["x"], t["gamma"], t["beta"], t["rm"],
                                                      t["rv"], True, 0.1, 1e-5)
            return torch.relu(y), mean, inv_std

        def both():
            y, mean, inv_std = fwd()
            g = aten.threshold_backward(t["gy"], y, 0)
            aten.native_batch_norm_backward(g, t["x"], t["gamma"], t["rm"], t["rv"], mean,
                                            inv_std, True, 1e-5, [True, True, True])
        return fwd, both
    return BenchRow("batch_norm relu", ("batch_norm_forward", "batch_norm_backward"), arrays,
                    ours, torch_)


# --- the registry ---------------------------------------------------------------------------
def _cases(sizes, make):
    return lambda rng, dtype: _many(rng, sizes, lambda r, s: make(r, s, dtype))


KERNELS = (
    Kernel("conv2d_forward", "conv", check_conv2d_forward, _conv_cases(_conv_forward_args),
           ("reduce",)),
    Kernel("conv2d_backward_input", "conv", check_conv2d_backward_input,
           _conv_cases(_conv_input_args), ("reduce",)),
    Kernel("conv2d_backward_weight", "conv", check_conv2d_backward_weight,
           _conv_cases(_conv_weight_args), ("reduce", "reduce")),
    Kernel("relu_forward", "elementwise", check_relu_forward,
           _cases(ELEMENTWISE, lambda rng, s, dt: (_randn(rng, s, dt),)), ("exact",)),
    Kernel("relu_backward", "elementwise", check_relu_backward, _cases(
        ELEMENTWISE, lambda rng, s, dt: (_randn(rng, s, dt),
                                         reference.relu_forward(_randn(rng, s, dt)))),
        ("exact",)),
    Kernel("residual_add_forward", "elementwise", check_residual_add_forward,
           _residual_forward_cases),
    Kernel("residual_add_backward", "elementwise", check_residual_add_backward,
           _residual_backward_cases, ("elementwise", "elementwise", "reduce")),
    Kernel("max_pool2d_forward", "pooling", check_max_pool2d_forward, lambda rng, dt: [
        Case((_pool_data(rng, s, dt), k, st), t) for s, k, st, t in POOL], ("exact", "exact")),
    Kernel("max_pool2d_backward", "pooling", check_max_pool2d_backward, lambda rng, dt: [
        Case(_pool_backward_args(rng, dt, *c[:3]), c[3]) for c in POOL]),
    Kernel("batch_norm_forward", "norm", check_batch_norm_forward, _bn_forward_cases,
           ("reduce", "reduce", "reduce"), mutates=(3, 4)),
    Kernel("batch_norm_backward", "norm", check_batch_norm_backward, _bn_backward_cases,
           ("reduce", "reduce", "reduce")),
)
NAMES = tuple(k.name for k in KERNELS)
FAMILIES = tuple(dict.fromkeys(k.family for k in KERNELS))  # in registry order
BY_NAME = {k.name: k for k in KERNELS}

BENCH = (_conv_row(1, 16, 28), _conv_row(16, 16, 28), _conv_row(16, 16, 7),
         _relu_row(28), _relu_row(7),
         _residual_row(28, False, False), _residual_row(7, False, False),
         _residual_row(7, False, True), _residual_row(7, True, True),
         _pool_row(28, 4), _pool_row(7, 2),
         _batch_norm_row(28))
