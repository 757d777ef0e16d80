"""Numerical gradient checkers (PyTorch's gradcheck and gradgradcheck semantics; tolerances
in tests/conftest.py) and input helpers for non-smooth ops.

Imports minires.tensor, minires.autograd, minires.ops, minires.backend and numpy.
"""
import numpy as np

from minires import autograd, backend
from minires import ops as F
from minires.tensor import Tensor, enable_grad, no_grad

_FULL_FALLBACK_MAX = 4096  # fast-mode failures at most this big are rerun in full mode


class GradcheckError(AssertionError):
    """Analytical and numerical gradients disagree, or backward misbehaves."""


def gradcheck(fn, inputs, *, grad_output=None, eps=1e-6, atol=1e-5, rtol=1e-3, nondet_tol=0.0,
              fast=False, seed=0, check=None):
    """Compare fn's backward with central differences of L(x) = <g, fn(x)> in float64.

    Args:
        fn: callable, fn(*tensors) -> Tensor. Gets float64 copies of the floating inputs (as
            Tensors that require grad), other inputs as constant Tensors, None as None. The
            numerical passes call it under no_grad with constant inputs: a fn that calls
            minires.grad itself must re-wrap them (requires_grad) inside enable_grad().
        inputs: sequence of Tensors, arrays (NumPy or CuPy) or None. Never modified.
        grad_output: upstream gradient g, shape of fn's output; default standard normal
            drawn from `seed` (not ones, which cannot see a backward that permutes gy).
        eps, atol, rtol: step and tolerances; passes where |num - ana| <= atol + rtol * |num|.
        nondet_tol: largest allowed difference between two identical backward passes.
        fast: check one random unit direction per input instead of every element.
        seed: seeds g and the fast-mode directions (drawn on the host, same on every device).
        check: optional tuple of bools, one per input; default: every floating input.
    Returns:
        {"max_abs": ..., "max_rel": ...}: the largest errors seen over the checked inputs.
    Raises:
        GradcheckError on any mismatch; TypeError/ValueError on bad arguments.
    """
    name = _name(fn)
    arrays, check = _prepare(inputs, check, name)
    # spawn_key: a stream other than default_rng(seed), which tests often use for their data
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    tensors = [_wrap(a, c) for a, c in zip(arrays, check)]
    out = fn(*tensors)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck({name}): fn must return a Tensor, got {type(out).__name__}")
    if out.dtype != np.float64:
        raise GradcheckError(f"gradcheck({name}): output dtype is {out.dtype} for float64 "
                             f"inputs; the op must keep float64")
    if out.creator is not None:  # a lambda's name says little; the last op's class helps
        name = f"{name} (output of {type(out.creator).__name__})"
    g = _upstream(grad_output, out, rng, name)
    ctx = dict(name=name, eps=eps, atol=atol, rtol=rtol, seed=seed)
    grads = _analytical(out, tensors, check, g, nondet_tol, ctx)

    def loss():
        with no_grad():
            y = fn(*[_wrap(a, False) for a in arrays])
        return float((g * y.data).sum())

    errors = [(_check_direction(loss, arrays, i, grads[i], rng, ctx) if fast else
               _check_full(loss, arrays, i, grads[i], ctx))
              for i in (i for i, c in enumerate(check) if c)]
    return {"max_abs": max((e[0] for e in errors), default=0.0),
            "max_rel": max((e[1] for e in errors), default=0.0)}


def gradgradcheck(fn, inputs, *, grad_output=None, eps=1e-6, atol=1e-5, rtol=1e-3,
                  nondet_tol=0.0, fast=False, seed=0, check=None):
    """Check fn's second derivatives numerically, in float64 (torch.autograd.gradgradcheck).

    Runs `gradcheck` on the function (inputs..., gy) -> the first derivatives of <gy, fn> with
    respect to the checked inputs, computed by minires.grad(create_graph=True) and flattened
    into one vector. So backward_graph of every op on the way is checked against central
    differences of its own backward: in the errors, inputs 0..n-1 are fn's inputs and input n
    is gy (the gradient of fn's output).

    Args, Returns, Raises: as gradcheck; grad_output is gy (default standard normal from seed).
    """
    name = _name(fn)
    arrays, check = _prepare(inputs, check, name)
    with no_grad():
        out = fn(*[_wrap(a, False) for a in arrays])
    if not isinstance(out, Tensor):
        raise TypeError(f"gradgradcheck({name}): fn must return a Tensor, got "
                        f"{type(out).__name__}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    gy = _upstream(grad_output, out, rng, name)
    checked = [i for i, c in enumerate(check) if c]
    ctx = dict(name=name, eps=eps, atol=atol, rtol=rtol, seed=seed)
    _same_first_derivatives(fn, arrays, checked, gy, ctx)

    def first_derivatives(*args):
        *xs, g = args
        # gradcheck evaluates without grad and with constant inputs: switch both back on
        xs = [Tensor(x.data, requires_grad=True) if i in checked and not x.requires_grad
              else x for i, x in enumerate(xs)]
        with enable_grad():
            grads = autograd.grad(fn(*xs), [xs[i] for i in checked], g, create_graph=True,
                                  allow_unused=True)
            return F.concat([F.reshape(xs[i].data * 0 if gx is None else gx, -1)
                             for i, gx in zip(checked, grads)])

    first_derivatives.__qualname__ = f"first derivatives of {name}"
    return gradcheck(first_derivatives, arrays + [gy], eps=eps, atol=atol, rtol=rtol,
                     nondet_tol=nondet_tol, fast=fast, seed=seed,
                     check=tuple(check) + (True,))


def _same_first_derivatives(fn, arrays, checked, gy, ctx):
    """backward_graph must give what backward gives (gradgradcheck differentiates the former
    and gradcheck checks the latter): compare them at the inputs, within atol + rtol."""
    runs = []
    for create_graph in (False, True):
        xs = [_wrap(a, i in checked) for i, a in enumerate(arrays)]
        with enable_grad():
            runs.append(autograd.grad(fn(*xs), [xs[i] for i in checked], gy,
                                      create_graph=create_graph, allow_unused=True))
    for i, fast, graph in zip(checked, *runs):
        zero = np.zeros(np.shape(arrays[i]))
        a = zero if fast is None else fast.numpy().astype(np.float64)
        b = zero if graph is None else graph.numpy().astype(np.float64)
        err, bound = np.abs(a - b), ctx["atol"] + ctx["rtol"] * np.abs(a)
        if np.all(err <= bound):
            continue
        k = np.unravel_index(int(np.argmax(err / bound)), a.shape)
        raise GradcheckError(
            f"gradgradcheck failed for {ctx['name']}: input {i} (shape {a.shape}): "
            f"backward_graph and backward disagree on the first derivative: max abs "
            f"difference {err.max():.3e}; at index {tuple(int(j) for j in k)} backward gives "
            f"{a[k]:.8e}, backward_graph {b[k]:.8e}\n  {_settings(ctx)}")


def _name(fn):
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _is_float(a):
    return a is not None and np.issubdtype(a.dtype, np.floating)


def _prepare(inputs, check, name):
    """Copies of the inputs (float64 for floating ones) on their own devices, and the mask."""
    arrays = []
    for x in inputs:
        a = x.data if isinstance(x, Tensor) else x
        if a is None:
            arrays.append(None)
            continue
        xp = backend.array_module(a)
        a = xp.asarray(a)
        # order='C': a Fortran-ordered input (e.g. b.T) must still reshape to a view below
        arrays.append(xp.array(a, dtype=xp.float64, order="C") if _is_float(a) else a.copy())
    floating = tuple(_is_float(a) for a in arrays)
    if not any(floating):
        raise TypeError(f"gradcheck({name}): no floating-point input to check")
    if check is None:
        return arrays, floating
    check = tuple(bool(c) for c in check)
    if len(check) != len(arrays):
        raise ValueError(f"gradcheck({name}): check has {len(check)} entries for "
                         f"{len(arrays)} inputs")
    for i, (c, f) in enumerate(zip(check, floating)):
        if c and not f:
            kind = "None" if arrays[i] is None else arrays[i].dtype
            raise TypeError(f"gradcheck({name}): check[{i}] is set but input {i} is not "
                            f"floating-point ({kind})")
    return arrays, check


def _wrap(a, requires_grad):
    return None if a is None else Tensor(a, requires_grad=requires_grad)


def _upstream(grad_output, out, rng, name):
    """A float64 copy of grad_output on the output's device, or a seeded standard normal."""
    if grad_output is None:
        g = rng.standard_normal(out.shape)  # drawn on the host: the same g on every device
    else:
        g = grad_output.data if isinstance(grad_output, Tensor) else grad_output
        g = g if backend.is_cupy_array(g) else np.asarray(g)
        if g.shape != out.shape:
            raise ValueError(f"gradcheck({name}): grad_output shape {g.shape} != "
                             f"output shape {out.shape}")
    return backend.to_device(g, out.device).astype(np.float64)  # astype copies


def _analytical(out, tensors, check, g, nondet_tol, ctx):
    """Gradients from backward(g); checks two runs agree and that backward(0) gives 0."""
    xp = backend.array_module(out.data)
    runs = [_backward(out, tensors, check, gy) for gy in (g, g, xp.zeros_like(g))]
    for i in (i for i, c in enumerate(check) if c):
        diff = xp.abs(runs[0][i] - runs[1][i])
        if diff.size and float(diff.max()) > nondet_tol:
            k = _unravel(int(diff.argmax()), diff.shape)
            raise GradcheckError(
                f"{_head(ctx, i, tensors[i])}: backward is not deterministic: two identical "
                f"backward passes differ by up to {float(diff.max()):.3e} (at index {k}) > "
                f"nondet_tol={nondet_tol}\n  {_settings(ctx)}")
        zero = xp.abs(runs[2][i])
        if zero.size and float(zero.max()) != 0.0:
            k = _unravel(int(zero.argmax()), zero.shape)
            raise GradcheckError(
                f"{_head(ctx, i, tensors[i])}: backward with a zero grad_output gave a nonzero "
                f"gradient, max abs {float(zero.max()):.3e} at index {k} (does backward ignore "
                f"gy?)\n  {_settings(ctx)}")
    return runs[0]


def _backward(out, tensors, check, gy):
    """One backward pass over the retained graph; gradient per checked input (zeros if None)."""
    for t in tensors:
        if t is not None:
            t.grad = None
    out.backward(gy, retain_graph=True)
    grads = []
    for t, c in zip(tensors, check):
        if not c:
            grads.append(None)
            continue
        xp = backend.array_module(t.data)
        grads.append(xp.zeros_like(t.data) if t.grad is None else t.grad.copy())
    return grads


def _check_full(loss, arrays, i, ana, ctx):
    """Central difference of the loss for every element of input i."""
    x = arrays[i]
    flat = x.reshape(-1)  # a view: x is a fresh contiguous copy
    num = np.empty(x.size)
    for k in range(x.size):
        orig = flat[k].copy()
        flat[k] = orig + ctx["eps"]
        up = loss()
        flat[k] = orig - ctx["eps"]
        down = loss()
        flat[k] = orig  # restore exactly, not by adding eps back
        num[k] = (up - down) / (2 * ctx["eps"])
    ana = backend.to_device(ana, "cpu").reshape(-1)
    err = np.abs(num - ana)
    bound = ctx["atol"] + ctx["rtol"] * np.abs(num)
    rel = err / np.maximum(np.abs(num), np.finfo(np.float64).tiny)
    if np.all(err <= bound):
        return float(err.max(initial=0.0)), float(rel.max(initial=0.0))
    worst = int(np.argmax(err / bound))
    raise GradcheckError(
        f"{_head(ctx, i, x)}: numerical and analytical gradients differ\n"
        f"  max abs error {err.max():.3e}, max rel error {rel.max():.3e}; worst element at "
        f"index {_unravel(worst, x.shape)}\n"
        f"{_neighbours(num, ana, worst, x.shape)}\n  {_settings(ctx)}")


def _check_direction(loss, arrays, i, ana, rng, ctx):
    """Fast mode: directional derivative along one random unit vector u for input i."""
    x = arrays[i]
    xp = backend.array_module(x)
    u = rng.standard_normal(x.shape)
    u /= max(np.linalg.norm(u), np.finfo(np.float64).tiny)
    u = backend.to_device(u, backend.device_of(x))
    orig = x.copy()
    x[...] = orig + ctx["eps"] * u
    up = loss()
    x[...] = orig - ctx["eps"] * u
    down = loss()
    x[...] = orig
    num = (up - down) / (2 * ctx["eps"])
    dot = float(xp.sum(ana * u))
    err = abs(num - dot)
    if err <= ctx["atol"] + ctx["rtol"] * abs(num):
        return err, err / max(abs(num), np.finfo(np.float64).tiny)
    if x.size <= _FULL_FALLBACK_MAX:  # rerun in full mode to name the worst element
        try:
            _check_full(loss, arrays, i, ana, ctx)
        except GradcheckError as e:
            raise GradcheckError(f"{e}\n  (fast mode failed: directional derivative "
                                 f"numerical {num:.6e}, analytical {dot:.6e}; the full-mode "
                                 f"rerun above locates the element)") from None
    raise GradcheckError(
        f"{_head(ctx, i, x)}: fast mode: directional derivatives differ along a random unit "
        f"direction: numerical {num:.6e}, analytical {dot:.6e}, abs error {err:.3e}, rel error "
        f"{err / max(abs(num), np.finfo(np.float64).tiny):.3e} (input too large to locate the "
        f"element; rerun with fast=False on a smaller shape)\n  {_settings(ctx)}")


def _head(ctx, i, x):
    return f"gradcheck failed for {ctx['name']}: input {i} (shape {tuple(x.shape)})"


def _settings(ctx):
    return f"eps={ctx['eps']:g} atol={ctx['atol']:g} rtol={ctx['rtol']:g} seed={ctx['seed']}"


def _unravel(k, shape):
    return tuple(int(j) for j in np.unravel_index(k, shape)) if shape else ()


def _neighbours(num, ana, worst, shape, radius=2):
    """A small table: the worst element and up to `radius` flat neighbours on each side."""
    rows = ["  index            numerical       analytical"]
    for k in range(max(worst - radius, 0), min(worst + radius + 1, num.size)):
        mark = " <- worst" if k == worst else ""
        rows.append(f"  {str(_unravel(k, shape)):<16} {num[k]: .8e} {ana[k]: .8e}{mark}")
    return "\n".join(rows)


def away_from_kinks(x, margin=1e-2):
    """Shift values away from 0 so |y| >= margin (sign and order kept), e.g. for ReLU.

    x: array or Tensor; returns the same kind, a new object of x's dtype and device.
    """
    a = x.data if isinstance(x, Tensor) else x
    xp = backend.array_module(a)
    y = xp.where(a >= 0, a + margin, a - margin).astype(a.dtype)
    return Tensor(y) if isinstance(x, Tensor) else y


def distinct(x, gap=1e-3):
    """Break ties (e.g. for max pooling): the k-th smallest value moves up by k * gap.

    Order is kept and any two values end at least `gap` apart, far more than gradcheck's eps.
    x: array or Tensor; returns the same kind, a new object of x's dtype and device.
    """
    a = x.data if isinstance(x, Tensor) else x
    xp = backend.array_module(a)
    flat = a.reshape(-1)
    order = xp.argsort(flat)  # any tie order works
    y = xp.empty_like(flat)
    y[order] = flat[order] + gap * xp.arange(flat.size, dtype=flat.dtype)
    y = y.reshape(a.shape)
    return Tensor(y) if isinstance(x, Tensor) else y
