"""Anomaly detection: `detect_anomaly()` names the first op whose forward output or backward
gradient holds a NaN or an infinity. Imports minires.tensor (the observer hook) and backend.
"""
import contextlib

from minires import backend
from minires.tensor import set_observer


class AnomalyError(FloatingPointError):
    """An op produced a non-finite value; `.op` (Function class name), `.phase` ('forward' |
    'backward') and `.shapes` (the op's input shapes, or (gy shape,) in backward) say where."""

    def __init__(self, message, op, phase, shapes):
        super().__init__(message)
        self.op, self.phase, self.shapes = op, phase, shapes


def _floats(arrays):
    """(index, array) of the floating-point arrays among `arrays` (None entries skipped)."""
    return [(i, a) for i, a in enumerate(arrays)
            if a is not None and getattr(a, "dtype", None) is not None and a.dtype.kind in "fc"]


def _non_finite(array):
    """The count of NaNs and of infinities in array, as (nans, infs), host ints."""
    xp = backend.array_module(array)
    return int(xp.isnan(array).sum()), int(xp.isinf(array).sum())


def _first_bad(arrays):
    """(index, nans, infs) of the first array holding a non-finite value, else None."""
    for i, a in _floats(arrays):
        if not bool(backend.array_module(a).isfinite(a).all()):
            return (i,) + _non_finite(a)
    return None


def _describe(arrays):
    return ", ".join(f"{tuple(a.shape)} {a.dtype}" if hasattr(a, "shape") else "None"
                     for a in arrays)


class _Detector:
    """The op observer: runs each forward/backward (through any outer observer, e.g. the
    profiler) and checks what it returned."""

    def __init__(self):
        self.previous = None

    def forward(self, f, arrays):
        prev = self.previous
        y = f.forward(*arrays) if prev is None else prev.forward(f, arrays)
        outputs = y if isinstance(y, tuple) else (y,)
        bad = _first_bad(outputs)
        if bad is not None:
            name = type(f).__name__
            _, nans, infs = bad
            entered = _first_bad(arrays)
            cause = (f"its input {entered[0]} was already non-finite (a leaf: a parameter or "
                     f"the data)" if entered is not None else "from finite inputs")
            raise AnomalyError(f"anomaly: {name} forward produced {nans} NaN and {infs} inf "
                               f"values {cause}; inputs {_describe(arrays)}", name, "forward",
                               tuple(tuple(a.shape) for a in arrays))
        return y

    def backward(self, f, gy):
        prev = self.previous
        gxs = f.backward(gy) if prev is None else prev.backward(f, gy)
        bad = _first_bad(gxs if isinstance(gxs, tuple) else (gxs,))
        if bad is not None:
            name = type(f).__name__
            i, nans, infs = bad
            cause = ("the incoming gradient was already non-finite" if _first_bad((gy,))
                     else "from a finite incoming gradient")
            raise AnomalyError(f"anomaly: {name} backward produced {nans} NaN and {infs} inf "
                               f"values in the gradient of input {i}, {cause}; gy "
                               f"{_describe((gy,))}", name, "backward", (tuple(gy.shape),))
        return gxs


@contextlib.contextmanager
def detect_anomaly():
    """Inside the block, every op's forward output and backward gradients are checked; the
    first NaN or infinity raises AnomalyError naming the Function class, the phase and the
    input shapes. Costs one pass over every array an op returns (a debugging aid, off by
    default). On exit the observer installed before (None, or a profiler) is restored."""
    detector = _Detector()
    detector.previous = set_observer(detector)
    try:
        yield detector
    finally:
        set_observer(detector.previous)
