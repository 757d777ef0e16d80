"""Matrix products: matmul (NumPy semantics, batched and broadcast) and linear.

Imports minires.tensor, minires.ops._args (for unbroadcast), minires.ops.shape and
minires.ops.reduce (backward_graph).
"""
from minires.ops._args import unbroadcast
from minires.ops.reduce import sum as sum_
from minires.ops.shape import reshape, sum_to, transpose
from minires.tensor import Function


def _swap_last(t):
    """t with its last two axes swapped (a Tensor op)."""
    axes = list(range(t.ndim))
    axes[-2:] = axes[-1], axes[-2]
    return transpose(t, axes)


class MatMul(Function):
    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: operands must have at least 1 dimension, got shapes "
                             f"{a.shape} and {b.shape}")
        k_a, k_b = a.shape[-1], b.shape[-2] if b.ndim > 1 else b.shape[0]
        if k_a != k_b:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align "
                             f"({k_a} != {k_b})")
        self.save_for_backward(a, b)
        return a @ b

    def backward(self, gy):
        a, b = self.saved
        xp = self.xp
        # Promote 1-D operands to matrices so one formula covers every case.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        gy2 = gy.reshape(gy.shape + (1,)) if b.ndim == 1 else gy
        gy2 = xp.expand_dims(gy2, -2) if a.ndim == 1 else gy2
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(gy2 @ xp.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            gb = unbroadcast(xp.swapaxes(a2, -1, -2) @ gy2, b2.shape).reshape(b.shape)
        return ga, gb

    def backward_graph(self, gy):
        a, b = self.inputs
        a2 = reshape(a, (1,) + a.shape) if a.ndim == 1 else a
        b2 = reshape(b, b.shape + (1,)) if b.ndim == 1 else b
        gy2 = reshape(gy, gy.shape + (1,)) if b.ndim == 1 else gy
        gy2 = reshape(gy2, gy2.shape[:-1] + (1,) + gy2.shape[-1:]) if a.ndim == 1 else gy2
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = reshape(sum_to(gy2 @ _swap_last(b2), a2.shape), a.shape)
        if self.needs_input_grad[1]:
            gb = reshape(sum_to(_swap_last(a2) @ gy2, b2.shape), b.shape)
        return ga, gb


def matmul(a, b):
    """Matrix product with NumPy semantics (1-D promotion, batched broadcast)."""
    return MatMul()(a, b)


class Linear(Function):
    def forward(self, x, w, b=None):
        if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: expected x (..., in) and w (out, in), got x {x.shape} "
                             f"and w {w.shape}")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"linear: bias shape {b.shape}, expected ({w.shape[0]},)")
        self.save_for_backward(x, w)
        y = x @ w.T
        return y if b is None else y + b

    def backward(self, gy):
        x, w = self.saved
        need = self.needs_input_grad
        gx = gy @ w if need[0] else None
        gy2 = gy.reshape(-1, gy.shape[-1])
        gw = gy2.T @ x.reshape(-1, x.shape[-1]) if need[1] else None
        gb = gy2.sum(axis=0) if len(need) > 2 and need[2] else None
        return (gx, gw, gb)[:len(need)]

    def backward_graph(self, gy):
        x, w = self.inputs[:2]
        need = self.needs_input_grad
        gy2 = reshape(gy, (-1, gy.shape[-1]))
        gx = gy @ w if need[0] else None
        gw = transpose(gy2) @ reshape(x, (-1, x.shape[-1])) if need[1] else None
        gb = sum_(gy2, axis=0) if len(need) > 2 and need[2] else None
        return (gx, gw, gb)[:len(need)]


def linear(x, w, b=None):
    """x @ w.T + b, with x (..., in), w (out, in), b (out,) or None -> (..., out)."""
    return Linear()(x, w) if b is None else Linear()(x, w, b)
