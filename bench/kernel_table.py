"""`python -m bench` (kernels): every row of kernels/registry.py's BENCH (the seed net's
kernels at its shapes), forward and forward+backward, minires (through the kernels dispatch)
vs kernels.reference vs PyTorch.

Imports numpy, kernels (its registry and reference) and bench.common; torch when installed.
"""
import json

import numpy as np

from minires import kernels
from minires.kernels import reference, registry
from bench import common

COLUMNS = ["kernel", "shape", "fwd", "fwd ref", "fwd torch", "f+b", "f+b ref", "f+b torch",
           "f+b/torch x"]


def cases(xp, n, rng):
    """[(label, shape, ours, theirs)] for every bench row at batch n: ours(k) gives (fwd, both)
    over arrays on xp's device for k = kernels or kernels.reference; theirs(torch, dev) the
    same for PyTorch tensors on dev."""
    out = []
    for row in registry.BENCH:
        host = row.arrays(rng, n)
        arrays = {name: xp.asarray(a) for name, a in host.items()}

        def ours(k, row=row, arrays=arrays):
            return row.ours(k, arrays)

        def theirs(torch, dev, row=row, host=host):
            return row.torch(torch, {name: torch.as_tensor(a, device=dev)
                                     for name, a in host.items()})
        out.append((row.label, next(iter(host.values())).shape, ours, theirs))
    return out


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
