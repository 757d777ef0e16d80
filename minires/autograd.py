"""The backward engine: the reverse sweep behind Tensor.backward, and `grad`, which returns
gradients as Tensors and, with create_graph=True, records the backward pass itself so its
results can be differentiated again (Hessian-vector products, Newton steps, penalties).

Two paths through one sweep: Tensor.backward and grad(create_graph=False) call each op's
`backward` on raw arrays under no_grad (the fast path training uses); create_graph=True calls
each op's `backward_graph`, written with minires ops on Tensors.

Imports minires.tensor and minires.backend.
"""
from minires import backend
from minires import tensor as _tensor
from minires.tensor import Tensor, enable_grad, no_grad, _as_array

_FREED = ("backward: the graph through {op} was already freed by an earlier backward; pass "
          "retain_graph=True to the first backward to keep it")


def graph_order(roots, freed_message=_FREED):
    """Yield every Tensor of the graph that made `roots` (a Tensor or a list of them; leaves
    and constants too), each after its creator's inputs, the roots last. Iterative post-order
    DFS over inputs in input order: the same order on every run, no recursion limit. Shared
    by the backward engine and minires.viz; a Function freed by backward raises
    RuntimeError(freed_message.format(op=its class name))."""
    roots = [roots] if isinstance(roots, Tensor) else list(roots)
    visited, stack = set(), [(r, False) for r in reversed(roots)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            yield t
            continue
        if id(t) in visited:
            continue
        visited.add(id(t))
        stack.append((t, True))
        f = t.creator
        if f is not None:
            if f.freed:
                raise RuntimeError(freed_message.format(op=type(f).__name__))
            stack.extend((x, False) for x in reversed(f.inputs) if id(x) not in visited)


def initial_grad(t, gy, op, arg, keep_tensor=False):
    """The gradient that starts a sweep from t: ones for a one-element t when gy is None, else
    gy (array, Tensor or nested list) checked against t's shape and device, as a raw array of
    t's dtype; with keep_tensor, a Tensor gy stays a Tensor (its graph is differentiated too).
    Errors name `op` and the argument `arg` that gy came from."""
    xp = backend.array_module(t.data)
    if gy is None:
        if t.size != 1:
            raise RuntimeError(f"{op}: gradient can be implied only for a one-element output, "
                               f"got shape {t.shape}; pass {arg}")
        return xp.ones_like(t.data)
    tensor_kept = keep_tensor and isinstance(gy, Tensor)
    array = gy.data if tensor_kept else _as_array(gy, t.dtype)
    if backend.device_of(array) != t.device:
        raise ValueError(f"{op}: {arg} is on {backend.device_of(array)}, tensor on "
                         f"{t.device}")
    if array.shape != t.shape:
        raise ValueError(f"{op}: {arg} shape {array.shape} != tensor shape {t.shape}")
    if tensor_kept:
        return gy if gy.dtype == t.dtype else gy.astype(t.dtype)
    return array


def run_backward(roots, root_grads, retain_graph, targets=None, create_graph=False,
                 order=None):
    """The reverse sweep shared by Tensor.backward and minires.grad.

    roots: output Tensors; root_grads: one gradient each (raw arrays; Tensors when
    create_graph). targets None: every leaf reached accumulates its gradient into `.grad`.
    targets a set of tensor ids: no `.grad` is touched, only the part of the graph that leads
    to a target runs, and {id: gradient} of the targets reached is returned. create_graph:
    each op runs `backward_graph`, so the gradients are Tensors with a graph of their own.
    order: list(graph_order(roots)) when the caller has it already.
    """
    grads = {}
    for r, g in zip(roots, root_grads):
        _add_pending(grads, r, g)
    # inputs first: popping from the end starts at a root
    order = list(graph_order(roots)) if order is None else order
    runs = None if targets is None else _through_to(order, targets)
    found = {}
    while order:
        t = order.pop()  # popping drops our reference, so processed tensors can be freed
        g = grads.pop(id(t), None)
        if g is None:  # a constant, or a tensor no gradient reached
            continue
        g = _run_hooks(t, g, create_graph)
        if targets is not None and id(t) in targets:
            found[id(t)] = g
        if t.creator is None:
            if targets is None:
                _accumulate_leaf(t, g)
        elif runs is None or id(t) in runs:
            _backward_one(t.creator, g, grads, retain_graph, create_graph)
    return found


def _through_to(order, targets):
    """Ids of the tensors in `order` (inputs first) whose creator's backward must run for a
    gradient to reach some target: those with an input that is a target or leads to one."""
    leads, runs = set(targets), set()
    for t in order:
        if t.creator is not None and any(id(x) in leads for x in t.creator.inputs):
            leads.add(id(t))
            runs.add(id(t))
    return runs


def _run_hooks(t, g, create_graph):
    for hook in t._hooks:
        replaced = hook(g.data if create_graph else g)
        if replaced is not None and create_graph:
            raise RuntimeError("register_hook: a hook that replaces the gradient cannot be "
                               "used with create_graph=True (the new array has no graph)")
        g = g if replaced is None else replaced
    return g


def _accumulate_leaf(t, g):
    if t.grad is None:
        t.grad = g.copy()  # copy: g may alias another tensor's gradient or the caller's array
    else:
        t.grad += g


def _add_pending(grads, x, g):
    """Add g to the pending gradient of x (a new array or Tensor: never in place)."""
    pending = grads.get(id(x))
    grads[id(x)] = g if pending is None else pending + g


def _backward_one(f, gy, grads, retain_graph, create_graph):
    """Run f's backward on gy, check each gradient, add it to the pending gradient of its input.

    create_graph: f.backward_graph(gy) with grad mode on (its gradients are Tensors built by
    differentiable ops), else f.backward(gy) on raw arrays under no_grad.
    """
    name = type(f).__name__
    if create_graph:
        with enable_grad():
            gxs = f.backward_graph(gy)
    else:
        observer = _tensor._observer  # the profiler or anomaly detection, if installed
        with no_grad():
            gxs = f.backward(gy) if observer is None else observer.backward(f, gy)
    gxs = gxs if isinstance(gxs, tuple) else (gxs,)
    if len(gxs) != len(f.inputs):
        raise RuntimeError(f"{name}.backward returned {len(gxs)} gradients for "
                           f"{len(f.inputs)} inputs")
    for i, (x, gx) in enumerate(zip(f.inputs, gxs)):
        if gx is None or not x.requires_grad:
            continue
        if gx.shape != x.shape:
            raise RuntimeError(f"{name}.backward: gradient for input {i} has shape {gx.shape}, "
                               f"expected {x.shape}")
        if gx.dtype != x.dtype:
            gx = gx.astype(x.dtype)  # Tensor.astype is differentiable
        _add_pending(grads, x, gx)
    if not retain_graph:
        f.release()



def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
         allow_unused=False):
    """The gradients of `outputs` with respect to `inputs`, as torch.autograd.grad.

    Args:
        outputs: a Tensor or a sequence of Tensors to differentiate.
        inputs: a Tensor or a sequence of Tensors (leaves or intermediate results).
        grad_outputs: the gradient of each output (arrays or Tensors, None for ones on a
            one-element output); a Tensor that requires grad is differentiated through too.
        retain_graph: keep the graph for another backward; defaults to create_graph.
        create_graph: record the backward pass, so the gradients can be differentiated again.
        allow_unused: an input that no output depends on gets None instead of an error.
    Returns:
        A tuple with one Tensor (or None) per input, of the input's shape and dtype. Nothing's
        `.grad` changes. Without create_graph the Tensors are constants (no graph).
    """
    outputs = _as_list(outputs, "outputs")
    inputs = _as_list(inputs, "inputs")
    grad_outputs = _as_list(grad_outputs, "grad_outputs", len(outputs))
    if len(grad_outputs) != len(outputs):
        raise ValueError(f"grad: got {len(grad_outputs)} grad_outputs for {len(outputs)} "
                         f"outputs")
    for i, y in enumerate(outputs):
        if not y.requires_grad:
            raise RuntimeError(f"grad: output {i} (shape {y.shape}) does not require grad and "
                               f"has no graph")
    for i, x in enumerate(inputs):
        if not x.requires_grad:
            raise RuntimeError(f"grad: input {i} (shape {x.shape}) does not require grad")
    order = list(graph_order(outputs))
    if not allow_unused:  # before the sweep, which may free the graph
        reached = {id(t) for t in order}
        for i, x in enumerate(inputs):
            if id(x) not in reached:
                _unused(i, x)
    starts = [initial_grad(y, g, "grad", f"grad_outputs[{i}]", keep_tensor=create_graph)
              for i, (y, g) in enumerate(zip(outputs, grad_outputs))]
    if create_graph:
        starts = [g if isinstance(g, Tensor) else Tensor(g) for g in starts]
    retain = create_graph if retain_graph is None else retain_graph
    found = run_backward(outputs, starts, retain, {id(x) for x in inputs}, create_graph,
                         order)
    return tuple(_result(found.get(id(x)), x, i, create_graph, allow_unused)
                 for i, x in enumerate(inputs))


def _as_list(items, name, count=None):
    if items is None and count is not None:
        return [None] * count
    items = [items] if isinstance(items, Tensor) or items is None or hasattr(items, "shape") \
        else list(items)
    if name != "grad_outputs":
        for i, t in enumerate(items):
            if not isinstance(t, Tensor):
                raise TypeError(f"grad: {name}[{i}] must be a Tensor, got {type(t).__name__}")
    return items


def _unused(i, x):
    raise RuntimeError(f"grad: input {i} (shape {x.shape}) was not used to compute the "
                       f"outputs; pass allow_unused=True to get None for it")


def _result(g, x, i, create_graph, allow_unused):
    """The gradient of input i as a Tensor of x's dtype, None if unused (when allowed)."""
    if g is None:
        if not allow_unused:
            _unused(i, x)
        return None
    if create_graph:  # x's dtype already: initial_grad and _backward_one cast, hooks can't
        return g
    return Tensor(g.astype(x.dtype, copy=True))  # a copy: g may be the caller's own array
