"""`python -m bench step`: one training step of the seed net (forward, cross-entropy, backward,
SGD update), minires vs the same net in PyTorch with the same weights, side by side.

Imports numpy, minires and bench.common; torch when installed.
"""
import json
import time

import numpy as np

import minires
import minires.ops as F
from minires import models, optim
from bench import common

# Seed net forward, multiply-adds per image (PERF.md): a training step is about 3 forwards.
FORWARD_MACS = 3_952_800
STEP_FLOP = 3 * 2 * FORWARD_MACS  # 23.7 MFLOP per image
COLUMNS = ["implementation", "batch", "ms/step", "GFLOP/s", "% sgemm peak", "vs torch x"]


def _seed_params(rng, c=16):
    """Seed-net weights as float32 arrays in PyTorch layout: [(w, b)] for 5 convs and the
    linear layer, Kaiming-normal (fan in), zero biases."""
    shapes = [(c, 1, 3, 3), (c, c, 3, 3), (c, c, 3, 3), (c, c, 3, 3), (c, c, 3, 3), (10, 9 * c)]
    params = []
    for s in shapes:
        fan_in = int(np.prod(s[1:]))
        w = (rng.standard_normal(s) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        params.append((w, np.zeros(s[0], np.float32)))
    return params


def minires_net(params, device):
    """minires.models.seed_net with `params` (from _seed_params) copied in, on `device`."""
    net = models.seed_net(16)
    ours = net.parameters()
    flat = [a for pair in params for a in pair]
    if [tuple(p.shape) for p in ours] != [a.shape for a in flat]:
        # the two nets must stay the same computation, or the comparison means nothing
        raise RuntimeError(f"bench step: seed_net parameter shapes "
                           f"{[tuple(p.shape) for p in ours]} differ from the benchmark's "
                           f"{[a.shape for a in flat]}; update _seed_params and torch_net")
    for p, a in zip(ours, flat):
        p.data[...] = a
    return net.to(device)


def torch_net(torch, params, dev):
    """The same net in PyTorch, same weights."""
    nn = torch.nn
    c = 16
    convs = [nn.Conv2d(1, c, 3, padding=1)] + [nn.Conv2d(c, c, 3, padding=1) for _ in range(4)]
    linear = nn.Linear(9 * c, 10)
    for m, (w, b) in zip(convs + [linear], params):
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(w))
            m.bias.copy_(torch.from_numpy(b))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(convs[3], nn.ReLU(), convs[4], nn.ReLU())

        def forward(self, x):
            return self.body(x) + x

    net = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2], nn.ReLU(),
                        nn.MaxPool2d(4), Block(), nn.MaxPool2d(2), nn.Flatten(), linear)
    return net.to(dev)


def _batch(n, rng):
    x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    return x, rng.integers(0, 10, n)


def minires_step(params, x, labels, device, lr=0.01):
    """A closure running one minires training step; returns the loss as a float."""
    net = minires_net(params, device)
    opt = optim.SGD(list(net.parameters()), lr=lr)
    xt = minires.tensor(x, device=device)
    lab = minires.backend.to_device(labels, device)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(net(xt), lab)
        loss.backward()
        opt.step()
        return loss
    return step


def torch_step(torch, params, x, labels, dev, lr=0.01):
    net = torch_net(torch, params, dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    xt = torch.from_numpy(x).to(dev)
    lab = torch.from_numpy(labels).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(xt), lab)
        loss.backward()
        opt.step()
        return loss
    return step


def sgemm_peak(xp, sync, n=1024):
    """Measured float32 matmul GFLOP/s (n x n x n, the fastest of 5 medians of 5 runs) with
    the BLAS and thread settings of this run."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    ms = min(common.timed(lambda: a @ a, 5, warmup=1, sync=sync) for _ in range(5))
    return 2 * n ** 3 / ms / 1e6


def first_losses(params, n, device, torch, tdev):
    """Loss of one step in each implementation from the same weights and batch (a check
    that both run the same computation)."""
    x, labels = _batch(n, np.random.default_rng(1))
    ours = float(minires_step(params, x, labels, device)().item())
    theirs = None
    if tdev is not None:
        theirs = float(torch_step(torch, params, x, labels, tdev)().item())
    return ours, theirs


def run(args, xp, torch, tdev, sync):
    """Time the training step at each batch size; print the table (or JSON rows)."""
    params = _seed_params(np.random.default_rng(0))
    peak = sgemm_peak(xp, sync)
    t0 = time.perf_counter()
    ours, theirs = first_losses(params, 8, args.device, torch, tdev)
    setup_s = time.perf_counter() - t0
    info = {"sgemm peak GFLOP/s": round(peak, 1), "first-step loss minires": round(ours, 6),
            "first-step loss torch": None if theirs is None else round(theirs, 6),
            "first step incl. JIT load s": round(setup_s, 2)}
    common.print_header(list(info.items()), args.json)
    rows = []
    for n in args.batch:
        x, labels = _batch(n, np.random.default_rng(2))
        impls = {"minires": minires_step(params, x, labels, args.device)}
        impls["torch"] = (torch_step(torch, params, x, labels, tdev) if tdev is not None
                          else None)
        ms = common.compare(impls, args.reps, args.rounds, sync)
        for name in impls:
            if ms[name] is None:
                continue
            gflops = STEP_FLOP * n / ms[name] / 1e6
            rows.append({"implementation": name, "batch": str(n), "ms/step": ms[name],
                         "GFLOP/s": gflops, "% sgemm peak": 100 * gflops / peak,
                         "vs torch x": common.ratio(ms[name], ms["torch"])})
    if args.json:
        for r in rows:
            print(json.dumps({"table": "step", **r}))
    else:
        print(f"seed net training step (float32, SGD), median ms; {STEP_FLOP / 1e6:.1f} "
              f"MFLOP per image")
        common.print_table(COLUMNS, rows, False)
