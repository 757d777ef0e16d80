"""Look inside an autograd graph: Graphviz DOT text, a rendered picture, a terminal summary.

Imports minires.tensor, minires.autograd (graph_order) and minires.backend only (modules and
parameters are read duck-typed).
"""
import contextlib
import inspect
import pathlib
import shutil
import subprocess
import warnings
import weakref

from minires import backend
from minires.autograd import graph_order
from minires.tensor import Parameter, Tensor

_FUNCTION_STYLE = 'shape=box, style="rounded,filled", fillcolor="#dddddd"'
_TENSOR_STYLE = 'shape=box, style=filled, fillcolor="#ffffff"'
_PARAM_STYLE = 'shape=box3d, style=filled, fillcolor="#a8d8ff"'
_CONST_STYLE = 'shape=box, style="dashed,filled", fillcolor="#ffffff", fontcolor="#666666"'
_OUTPUT_STYLE = 'shape=box, style=filled, fillcolor="#ffd54f", penwidth=2'


# --- walking the graph --------------------------------------------------------------------
_FREED = ("viz: the graph through {op} was freed by backward; draw before backward or pass "
          "retain_graph=True")


def walk(root):
    """(functions, tensors, output) of the graph that produced `root`, in execution order.

    tensors: every Tensor (leaves included) in minires.autograd.graph_order, root last.
    functions: their creators in the same order, each after the Functions that produced its
    inputs. output: {id(function): the Tensor it produced}.
    """
    if not isinstance(root, Tensor):
        raise TypeError(f"viz: expected a Tensor whose graph to show, got {type(root).__name__}")
    tensors = list(graph_order(root, _FREED))
    made = [t for t in tensors if t.creator is not None]
    return [t.creator for t in made], tensors, {id(t.creator): t for t in made}


def _shape(t):
    return str(tuple(int(n) for n in t.shape))


def function_args(f):
    """The key arguments of Function f as 'name=value' strings, read from the attributes its
    __init__ stored (stride, padding, axis, ...); an object of simple fields shows its fields,
    arrays and other objects are left out."""
    try:
        names = inspect.signature(type(f).__init__).parameters
    except (TypeError, ValueError):
        return []
    args = []
    for name, p in names.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = getattr(f, name, None)
        text = _format_value(value)
        if text is not None:
            args.append(f"{name}={text}")
        else:  # a small record of simple fields (pooling's Windows): show the fields
            fields = {k: _format_value(v) for k, v in getattr(value, "__dict__", {}).items()}
            if fields and None not in fields.values():
                args += [f"{k}={t}" for k, t in fields.items()]
    return args


def _format_value(v):
    """Short text for a simple argument value, None for arrays and other objects."""
    if isinstance(v, (bool, int, float, str)):
        return repr(v) if isinstance(v, str) else str(v)
    if isinstance(v, slice):
        parts = ["" if p is None else str(p) for p in (v.start, v.stop, v.step)]
        return ":".join(parts[:2] if v.step is None else parts)
    if v is Ellipsis:
        return "..."
    if isinstance(v, (tuple, list)):
        items = [_format_value(x) if x is not None else "None" for x in v]
        if all(i is not None for i in items):
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    return None


# --- names and clusters ---------------------------------------------------------------------
@contextlib.contextmanager
def trace_modules(model):
    """Tag every Function created inside the block with the dotted name of the innermost
    sub-module of `model` whose forward created it; yields the tags ({Function: name}, weak)
    to pass as to_dot(..., trace=tags). Each module's forward is shadowed by a tagging wrapper
    for the duration of the block only (duck-typed: needs named_modules() and forward)."""
    tags = weakref.WeakKeyDictionary()
    patched = []
    try:
        for name, m in model.named_modules():
            if name:  # the root module's ops are top level anyway
                patched.append((m, vars(m).get("forward")))
                m.forward = _tagging(m.forward, name, tags)
        yield tags
    finally:
        for m, previous in reversed(patched):
            if previous is None:
                del m.forward
            else:
                m.forward = previous


def _tagging(forward, name, tags):
    def wrapper(*args, **kwargs):
        out = forward(*args, **kwargs)
        stop = {id(a) for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)}
        stack, seen = [out] if isinstance(out, Tensor) else [], set()
        while stack:  # walk back to this module's inputs; inner modules have tagged first
            f = stack.pop().creator
            if f is None or id(f) in seen:
                continue
            seen.add(id(f))
            tags.setdefault(f, name)
            stack.extend(x for x in f.inputs if id(x) not in stop)
        return out
    return wrapper


def _as_mapping(obj, method):
    """A {name: object} dict from a mapping, or from a Module via its `method` (duck-typed)."""
    if obj is None:
        return {}
    if hasattr(obj, method):
        return dict(getattr(obj, method)())
    return dict(obj)


def _param_names(params, modules):
    """{id(Parameter): dotted name} from a params mapping and/or a modules mapping."""
    names = {}
    for prefix, m in modules.items():
        for name, p in m.named_parameters():
            names.setdefault(id(p), f"{prefix}.{name}" if prefix else name)
    names.update((id(p), name) for name, p in params.items())
    return names


def _common_prefix(paths):
    """The longest shared leading part of several dotted-path tuples."""
    paths = list(paths)
    if not paths:
        return ()
    first = paths[0]
    n = min(len(p) for p in paths)
    while n and any(p[:n] != first[:n] for p in paths):
        n -= 1
    return first[:n]


def _guess_clusters(functions, names):
    """{id(Function): module path tuple} without a trace. A Function using named parameters
    belongs to their module ('block.0.weight' -> ('block', '0')). One without parameters
    joins the innermost module shared by the nearest parametrised ops before AND after it
    (a ReLU between block.0 and block.2 joins 'block'); ops before the first or after the last
    parametrised op stay on top. trace_modules gives exact placement instead."""
    own = {}
    for f in functions:
        paths = [tuple(names[id(x)].split("."))[:-1] for x in f.inputs if id(x) in names]
        if paths:
            own[id(f)] = _common_prefix(paths)
    before, after = {}, {}
    for f in functions:  # nearest parametrised producers, in execution order
        before[id(f)] = set()
        for x in f.inputs:
            g = x.creator
            if g is not None and id(g) in before:
                before[id(f)] |= {own[id(g)]} if id(g) in own else before[id(g)]
    for f in reversed(functions):  # nearest parametrised consumers, in reverse order
        found = {own[id(f)]} if id(f) in own else after.get(id(f), set())
        for x in f.inputs:
            if x.creator is not None:
                after.setdefault(id(x.creator), set()).update(found)
    place = {}
    for f in functions:
        k = id(f)
        if k in own:
            place[k] = own[k]
        elif before[k] and after.get(k):
            place[k] = _common_prefix(before[k] | after[k])
    return place


# --- DOT --------------------------------------------------------------------------------------
def _quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _grad_norm(t):
    xp = backend.array_module(t.grad)
    return float(xp.sqrt((t.grad.astype(xp.float64) ** 2).sum()))


def _tensor_node(t, node_id, name, is_output, grads):
    lines = [name] if name else []
    lines.append(f"{_shape(t)} {t.dtype} {t.device}")
    if grads and t.creator is None and t.grad is not None:
        lines.append(f"|grad| = {_grad_norm(t):.3g}")
    if is_output:
        style = _OUTPUT_STYLE
        lines.insert(0, "output")
    elif isinstance(t, Parameter) or name:
        style = _PARAM_STYLE
    elif t.creator is None and not t.requires_grad:
        style = _CONST_STYLE
    else:
        style = _TENSOR_STYLE
    label = "\n".join(lines)
    return f"{node_id} [label={_quote(label)}, {style}]"


def _function_node(f, node_id):
    args = function_args(f)
    label = type(f).__name__ + ("\n" + " ".join(args) if args else "")
    return f"{node_id} [label={_quote(label)}, {_FUNCTION_STYLE}]"


def to_dot(tensor, grads=False, params=None, modules=None, trace=None, clusters=True,
           rankdir="TB"):
    """Graphviz DOT text of the graph that produced `tensor`.

    One box per Tensor (shape, dtype, device; Parameters as blue 3-D boxes, constants dashed,
    the output yellow) and one grey rounded box per Function (class name and key arguments).
    Edges run input -> Function -> output in input order, labelled with the input index on
    multi-input Functions.

    Args:
        grads: add |grad| (L2 norm) to leaves holding a gradient (after backward with
            retain_graph=True).
        params: {name: Parameter} (or a Module) naming the parameters.
        modules: {name: Module} (e.g. dict(model.named_modules())) or a Module: names the
            parameters too and labels the clusters with module classes.
        trace: the tags yielded by trace_modules(model) around the forward: exact clusters.
        clusters: group Functions and parameters into nested boxes by module path (from
            `trace`, else guessed from the parameter names); a box holding no parameter
            is merged into its parent (a ReLU joins its Sequential).
    """
    functions, tensors, output = walk(tensor)
    modules = _as_mapping(modules, "named_modules")
    names = _param_names(_as_mapping(params, "named_parameters"), modules)
    if not clusters:
        place = {}
    elif trace is not None:
        place = {id(f): tuple(trace[f].split(".")) for f in functions if f in trace}
    else:
        place = _guess_clusters(functions, names)
    ids = {id(t): f"t{i}" for i, t in enumerate(tensors)}
    ids.update((id(f), f"f{i}") for i, f in enumerate(functions))
    nodes = []  # (DOT line, module path, is a parameter)
    for t in tensors:
        path = tuple(names[id(t)].split("."))[:-1] if clusters and id(t) in names else ()
        if t.creator is not None:
            path = place.get(id(t.creator), ())
        line = _tensor_node(t, ids[id(t)], names.get(id(t)), t is tensor, grads)
        nodes.append((line, path, id(t) in names))
    nodes += [(_function_node(f, ids[id(f)]), place.get(id(f), ()), False) for f in functions]
    lines = ["digraph minires {", f"  rankdir={rankdir};",
             '  graph [fontname="Helvetica", fontsize=11];',
             '  node [fontname="Helvetica", fontsize=10];', "  edge [fontsize=8];"]
    lines += _nested_clusters(nodes, {k: type(m).__name__ for k, m in modules.items()})
    for f in functions:
        multi = len(f.inputs) > 1
        for i, x in enumerate(f.inputs):
            label = f" [label={i}]" if multi else ""
            lines.append(f"  {ids[id(x)]} -> {ids[id(f)]}{label};")
        lines.append(f"  {ids[id(f)]} -> {ids[id(output[id(f)])]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nested_clusters(nodes, module_types):
    """DOT lines placing each node inside the subgraph cluster of its module path."""
    tree, has_param = {(): []}, set()  # path -> node lines directly inside it
    for line, path, is_param in nodes:
        for n in range(len(path) + 1):
            tree.setdefault(path[:n], [])
        tree[path].append(line)
        has_param.update(path[:n] for n in range(len(path) + 1) if is_param)
    for path in sorted(tree, key=len, reverse=True):  # merge parameter-free leaf boxes upward
        if path and path not in has_param:
            tree[path[:-1]] += tree.pop(path)
    counter = iter(range(len(tree)))

    def emit(path, depth):
        pad = "  " * depth
        out = [pad + line for line in tree[path]]
        for child in [p for p in tree if len(p) == len(path) + 1 and p[:-1] == path]:
            name = ".".join(child)
            label = f"{name}: {module_types[name]}" if name in module_types else name
            out.append(f"{pad}subgraph cluster_{next(counter)} {{")
            out.append(f'{pad}  label={_quote(label)}; style=rounded; color="#888888";')
            out += emit(child, depth + 1)
            out.append(pad + "}")
        return out

    return emit((), 1)


# --- rendering ----------------------------------------------------------------------------
def draw(tensor, path, **kw):
    """Write the graph of `tensor` to `path` (.svg, .png or .pdf; .dot for the text) and
    return the path written.

    Renders with the `graphviz` Python package or the `dot` program when either works;
    otherwise writes `path` with a .dot suffix and warns how to render it. `kw` goes to
    to_dot (grads, params, modules, clusters, rankdir).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dot = to_dot(tensor, **kw)
    fmt = path.suffix.lstrip(".").lower()
    if fmt == "dot":
        path.write_text(dot)
        return path
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"draw: unsupported file suffix {path.suffix!r} in {path}; "
                         f"use .svg, .png, .pdf or .dot")
    data = _render(dot, fmt)
    if data is None:
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(dot)
        warnings.warn(f"draw: Graphviz is not installed, so the graph was saved as {dot_path} "
                      f"instead of {path}. Install Graphviz (apt-get install graphviz, "
                      f"brew install graphviz or conda install graphviz) and run: "
                      f"dot -T{fmt} {dot_path} -o {path}", RuntimeWarning, stacklevel=2)
        return dot_path
    path.write_bytes(data)
    return path


def _render(dot, fmt):
    """Rendered bytes via the graphviz package, else the dot program; None if neither works."""
    try:
        import graphviz  # optional: a thin wrapper that itself needs the dot program
        return graphviz.Source(dot).pipe(format=fmt)
    except Exception:  # ImportError, or graphviz.ExecutableNotFound without the program
        pass
    exe = shutil.which("dot")
    if exe is None:
        return None
    done = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"draw: dot failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout


# --- text summary -------------------------------------------------------------------------
def _nbytes(arrays):
    return sum(int(a.nbytes) for a in arrays if hasattr(a, "nbytes"))


def _format_bytes(n):
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def summary(tensor):
    """A text listing of the graph of `tensor`, one line per Function in execution order:
    index, op name, input shapes -> output shape, bytes held in Function.saved; then totals.
    """
    functions, _, output = walk(tensor)
    rows = []
    for i, f in enumerate(functions):
        ins = " ".join(_shape(x) for x in f.inputs)
        rows.append((str(i), type(f).__name__, f"{ins} -> {_shape(output[id(f)])}",
                     _format_bytes(_nbytes(f.saved))))
    header = ("#", "op", "input shapes -> output shape", "saved")
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(4)]
    fmt = "{:>%d}  {:<%d}  {:<%d}  {:>%d}" % tuple(widths)
    lines = [fmt.format(*header)] + [fmt.format(*r) for r in rows]
    unique = {id(a): a for f in functions for a in f.saved if a is not None}
    total = _nbytes(unique.values())  # an array saved by two ops (ReLU out, conv in) once
    lines.append(f"{len(functions)} ops, {_format_bytes(total)} saved for backward")
    return "\n".join(lines)
