"""`python -m bench` (kernels): each hot kernel at the seed net's shapes, forward and
forward+backward, minires (through the kernels dispatch) vs kernels.reference vs PyTorch.

Imports numpy, kernels, minires.backend and bench.common; torch when installed.
"""
import json

import numpy as np

from minires import kernels
from minires.kernels import reference
from minires import backend
from bench import common

COLUMNS = ["kernel", "shape", "fwd", "fwd ref", "fwd torch", "f+b", "f+b ref", "f+b torch",
           "f+b/torch x"]


def _conv_case(xp, n, c, o, hw, rng):
    x = xp.asarray(rng.standard_normal((n, c, hw, hw), dtype=np.float32))
    w = xp.asarray(rng.standard_normal((o, c, 3, 3), dtype=np.float32) * 0.1)
    b = xp.asarray(rng.standard_normal(o, dtype=np.float32))
    gy = xp.asarray(rng.standard_normal((n, o, hw, hw), dtype=np.float32))
    s = p = (1, 1)

    def ours(mod):
        def fwd():
            return mod.conv2d_forward(x, w, b, s, p)

        def both():
            fwd()
            mod.conv2d_backward_input(gy, w, x.shape, s, p)
            mod.conv2d_backward_weight(gy, x, w.shape, s, p, True)
        return fwd, both

    def theirs(torch, dev):
        tx, tw, tb, tg = (torch.as_tensor(_host(a), device=dev) for a in (x, w, b, gy))
        conv = torch.nn.functional.conv2d
        back = torch.ops.aten.convolution_backward

        def both():
            conv(tx, tw, tb, 1, 1)
            back(tg, tx, tw, [o], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True])
        return (lambda: conv(tx, tw, tb, 1, 1)), both
    return f"conv3x3 {c}->{o}", (n, c, hw, hw), ours, theirs


def _relu_case(xp, n, hw, rng):
    x = xp.asarray(rng.standard_normal((n, 16, hw, hw), dtype=np.float32))
    gy = xp.asarray(rng.standard_normal(x.shape, dtype=np.float32))

    def ours(mod):
        def both():
            mod.relu_backward(gy, mod.relu_forward(x))
        return (lambda: mod.relu_forward(x)), both

    def theirs(torch, dev):
        tx, tg = (torch.as_tensor(_host(a), device=dev) for a in (x, gy))

        def both():
            torch.ops.aten.threshold_backward(tg, torch.relu(tx), 0)
        return (lambda: torch.relu(tx)), both
    return "relu", x.shape, ours, theirs


def _residual_case(xp, n, hw, relu, rng):
    x = xp.asarray(rng.standard_normal((n, 16, hw, hw), dtype=np.float32))
    fx = xp.asarray(rng.standard_normal(x.shape, dtype=np.float32))
    gy = xp.asarray(rng.standard_normal(x.shape, dtype=np.float32))

    def ours(mod):
        def both():
            mod.residual_add_backward(gy, mod.residual_add_forward(x, fx, None, relu), None,
                                      None, relu)
        return (lambda: mod.residual_add_forward(x, fx, None, relu)), both

    def theirs(torch, dev):
        tx, tf, tg = (torch.as_tensor(_host(a), device=dev) for a in (x, fx, gy))

        def fwd():
            return torch.relu(tx + tf) if relu else tx + tf

        def both():  # autograd passes gy through an add unchanged: only the ReLU costs
            y = fwd()
            if relu:
                torch.ops.aten.threshold_backward(tg, y, 0)
        return fwd, both
    return "residual_add" + (" relu" if relu else ""), x.shape, ours, theirs


def _pool_case(xp, n, hw, k, rng):
    x = xp.asarray(rng.standard_normal((n, 16, hw, hw), dtype=np.float32))
    oh = hw // k
    gy = xp.asarray(rng.standard_normal((n, 16, oh, oh), dtype=np.float32))

    def ours(mod):
        def both():
            _, am = mod.max_pool2d_forward(x, (k, k), (k, k))
            mod.max_pool2d_backward(gy, am, x.shape, (k, k), (k, k))
        return (lambda: mod.max_pool2d_forward(x, (k, k), (k, k))), both

    def theirs(torch, dev):
        tx, tg = (torch.as_tensor(_host(a), device=dev) for a in (x, gy))
        pool = torch.nn.functional.max_pool2d

        def both():
            _, idx = pool(tx, k, k, return_indices=True)
            torch.ops.aten.max_pool2d_with_indices_backward(tg, tx, [k, k], [k, k], [0, 0],
                                                            [1, 1], False, idx)
        return (lambda: pool(tx, k, k, return_indices=True)), both
    return f"max_pool2d {k}", x.shape, ours, theirs


def _host(a):
    return backend.to_device(a, "cpu")


def cases(xp, n, rng):
    """The kernels of the seed net at batch n (minires.models.seed_net)."""
    return [_conv_case(xp, n, 1, 16, 28, rng), _conv_case(xp, n, 16, 16, 28, rng),
            _conv_case(xp, n, 16, 16, 7, rng),
            _relu_case(xp, n, 28, rng), _relu_case(xp, n, 7, rng),
            _residual_case(xp, n, 28, False, rng), _residual_case(xp, n, 7, False, rng),
            _residual_case(xp, n, 7, True, rng),
            _pool_case(xp, n, 28, 4, rng), _pool_case(xp, n, 7, 2, rng)]


def run(args, xp, torch, tdev, sync):
    """Print (or emit as JSON) the kernel table for every batch size in args.batch."""
    rng = np.random.default_rng(0)
    rows = []
    for n in args.batch:
        for name, shape, ours, theirs in cases(xp, n, rng):
            mine, ref = ours(kernels), ours(reference)
            th = theirs(torch, tdev) if tdev is not None else (None, None)
            reps = args.reps
            fwd = common.compare({"ours": mine[0], "ref": ref[0], "torch": th[0]}, reps,
                                 args.rounds, sync)
            both = common.compare({"ours": mine[1], "ref": ref[1], "torch": th[1]}, reps,
                                  args.rounds, sync)
            rows.append({"kernel": name, "shape": "x".join(map(str, shape)),
                         "fwd": fwd["ours"], "fwd ref": fwd["ref"], "fwd torch": fwd["torch"],
                         "f+b": both["ours"], "f+b ref": both["ref"],
                         "f+b torch": both["torch"],
                         "f+b/torch x": common.ratio(both["ours"], both["torch"])})
            if args.json:
                print(json.dumps({"table": "kernels", "batch": n, **rows[-1]}))
                rows.pop()
        if not args.json:
            print(f"batch {n}: median ms, float32")
            common.print_table(COLUMNS, rows, False)
            rows = []
