"""Import layering (docs/design.md section 2), enforced by parsing every .py file
under minires/ and kernels/ with `ast`; plus the 600-line hard cap per file."""
import ast

import pytest

from conftest import REPO

PACKAGES = ("minires",)
FOLDERS = {"minires.kernels": "kernels", "minires": "minires"}  # package -> folder (pyproject)

# Internal layering: module (or package prefix) -> internal modules it may import at module level.
# A rule for "a.b" covers a.b and a.b.*; the longest matching key wins. Every module may also
# import its own package (the same key's subtree) and itself. Modules that do not exist yet are
# simply skipped. Extend this table when a module is added (e.g. a new minires.foo).
BELOW_TRAIN = ("minires.backend", "minires.tensor", "minires.autograd", "minires.ops",
               "minires.gradcheck",
               "minires.nn", "minires.models", "minires.optim", "minires.data",
               "minires.checkpoint", "minires.viz", "minires.profile", "minires.anomaly")
LAYERS = {
    "minires.kernels": (),
    "minires.backend": (),
    "minires.tensor": ("minires.backend",),
    "minires.autograd": ("minires.tensor", "minires.backend"),  # the backward engine, grad()
    "minires.ops": ("minires.tensor", "minires.backend", "minires.kernels"),
    "minires.gradcheck": ("minires.tensor", "minires.autograd", "minires.ops",
                          "minires.backend"),
    "minires.nn": ("minires.ops", "minires.tensor", "minires.backend"),
    "minires.models": ("minires.nn", "minires.ops", "minires.tensor", "minires.backend"),
    "minires.optim": ("minires.tensor", "minires.backend", "minires.kernels"),  # sgd_update
    "minires.data": ("minires.backend",),
    "minires.checkpoint": ("minires.tensor", "minires.backend"),
    # graphs read duck-typed
    "minires.viz": ("minires.tensor", "minires.autograd", "minires.backend"),
    "minires.profile": ("minires.ops", "minires.tensor", "minires.backend"),  # observer hook
    "minires.anomaly": ("minires.tensor", "minires.backend"),  # observer hook: NaN/inf finder
    "minires.runtime": ("minires.backend",),  # threads, wait policy, BLAS, CPU, GPU facts
    "minires.train": BELOW_TRAIN,
    "minires.run": BELOW_TRAIN + ("minires.train",),  # fit, metrics CSV, checkpoints, resume
    "minires.checks": BELOW_TRAIN,  # the cases `minires gradcheck` runs
    # the top: cli may also read the facade (e.g. minires.__version__)
    "minires.cli": BELOW_TRAIN + ("minires.train", "minires.run", "minires.checks",
                                  "minires.runtime", "minires"),
    "minires.__main__": ("minires.cli",),
    "minires": BELOW_TRAIN + ("minires.train",),  # the package facade (minires/__init__.py)
}
FACADES = {"minires"}  # keys that cover only their own __init__.py, not the package subtree
# Extra internal imports allowed only inside a function body (documented upward imports).
LAZY = {
    # the operator dunders call the functional ops; Tensor.backward runs the engine
    "minires.tensor": ("minires.ops", "minires.autograd"),
}
# Third-party modules only some files may import (module name or prefix -> allowed files).
RESTRICTED = {
    "cupy": ("minires/backend.py", "kernels/_common.py"),
    "numba.cuda": ("kernels/cuda/*",),
    "numba": ("kernels/*", "minires/runtime.py"),  # runtime: thread pools, threading layer
    "torch": (),  # bench/ may compare against PyTorch; the engine never imports it
}
MAX_FILE_LINES = 600  # hard cap per file (400 is the soft one, docs/design.md)


def module_name(path):
    """Dotted module name of a file under the repo: minires/ops/__init__.py -> minires.ops,
    kernels/cpu.py -> minires.kernels.cpu (installed under minires, see pyproject.toml)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    name = ".".join(parts)
    return "minires." + name if parts[0] == "kernels" else name


def _folder(name):
    """The repo path (without suffix) of a dotted module name: the inverse of module_name."""
    for package, folder in FOLDERS.items():  # minires.kernels first: the longer prefix
        if name == package or name.startswith(package + "."):
            return REPO / folder / name[len(package) + 1:].replace(".", "/")


def source_files():
    return sorted(p for folder in set(FOLDERS.values()) for p in (REPO / folder).rglob("*.py"))


def _is_package(name):
    return (_folder(name) / "__init__.py").exists()


def _resolve_from(node, module, is_pkg):
    """Absolute module names imported by `from X import a, b` (a submodule counts as itself)."""
    if node.level:
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_pkg else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    if target.split(".")[0] not in PACKAGES:  # third party: `from numba import cuda`
        return [f"{target}.{alias.name}" for alias in node.names]
    names = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        exists = _is_package(sub) or _folder(sub).with_suffix(".py").exists()
        names.append(sub if exists else target)  # `from minires.tensor import Tensor`
    return names


def imports_of(path):
    """[(imported module, lineno, inside a function)] for every import statement in a file,
    including importlib.import_module("<constant>") calls."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module, is_pkg = module_name(path), path.name == "__init__.py"
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend((n, child.lineno, in_function)
                             for n in _resolve_from(child, module, is_pkg))
            elif (isinstance(child, ast.Call) and getattr(child.func, "attr", None)
                  == "import_module" and child.args and isinstance(child.args[0], ast.Constant)):
                found.append((child.args[0].value, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _within(name, key):
    """True if `key` covers module `name`: itself, or its subtree unless the key is a facade."""
    return name == key or (key not in FACADES and name.startswith(key + "."))


def layer_of(module):
    """The LAYERS key covering a module (the longest), or None."""
    keys = [k for k in LAYERS if _within(module, k)]
    return max(keys, key=len) if keys else None


def _file_matches(rel, pattern):
    return rel.startswith(pattern[:-1]) if pattern.endswith("*") else rel == pattern


def layering_violations(path):
    """Human-readable violations of LAYERS/LAZY/RESTRICTED in one file."""
    module, rel = module_name(path), path.relative_to(REPO).as_posix()
    layer = layer_of(module)
    problems = []
    for name, line, lazy in imports_of(path):
        where = f"{rel}:{line} imports {name}"
        if name.split(".")[0] in PACKAGES:
            target = layer_of(name) or name
            allowed = LAYERS.get(layer, ()) + (LAZY.get(layer, ()) if lazy else ())
            if layer is None:
                problems.append(f"{where}, but {module} has no row in LAYERS (add one)")
            elif not (_within(target, layer) or any(_within(target, a) for a in allowed)):
                hint = " (import from the defining module)" if name == "minires" else ""
                problems.append(f"{where}: layer {layer} may import only {allowed}{hint}")
            continue
        rules = [k for k in RESTRICTED if _within(name, k)]
        if rules:
            files = RESTRICTED[max(rules, key=len)]
            if not any(_file_matches(rel, f) for f in files):
                problems.append(f"{where}: only {files or 'no file'} may import it")
    return problems


# --- the checker itself ------------------------------------------------------------------------
def test_checker_finds_known_imports():
    found = {(n, lazy) for n, _, lazy in imports_of(REPO / "minires" / "tensor.py")}
    assert ("minires.backend", False) in found and ("minires.ops", True) in found
    assert ("minires.ops.arith", False) in {(n, z) for n, _, z in
                                            imports_of(REPO / "minires" / "ops" / "__init__.py")}
    assert layer_of("minires.ops.conv") == "minires.ops"
    assert layer_of("minires.kernels.cpu") == "minires.kernels"


def _fake_repo(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in ("kernels", "minires", "minires/ops", "minires/nn"):
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").touch()


def test_checker_flags_bad_imports(tmp_path, monkeypatch):
    _fake_repo(tmp_path, {
        "minires/tensor.py": "from minires import ops\nimport cupy\n\n"
                             "def f():\n    from minires import backend, ops\n",
        "minires/nn/layers.py": "from ..tensor import Tensor\nfrom minires import Parameter\n"
                                "from . import init\nfrom minires.optim import SGD\n",
        "minires/nn/init.py": "",
        "kernels/cpu.py": "from minires.ops import add\nimport torch\nfrom numba import njit\n"
                          "from numba import cuda\n",
        "minires/unlisted.py": "",
        "minires/backend.py": "",
    })
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    tensor = layering_violations(tmp_path / "minires" / "tensor.py")
    assert len(tensor) == 2  # module-level ops and cupy; the function-local imports are fine
    assert "minires/tensor.py:1 imports minires.ops" in tensor[0] and "cupy" in tensor[1]
    nn = layering_violations(tmp_path / "minires" / "nn" / "layers.py")
    assert len(nn) == 2  # ..tensor and .init resolve and are allowed
    assert "imports minires:" in nn[0] and "defining module" in nn[0]
    assert "minires.optim" in nn[1]
    kern = layering_violations(tmp_path / "kernels" / "cpu.py")
    assert len(kern) == 3 and "torch" in kern[1] and "numba.cuda" in kern[2]
    assert layer_of(module_name(tmp_path / "minires" / "unlisted.py")) is None


# --- the rules ---------------------------------------------------------------------------------
FILES = source_files()


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(REPO).as_posix() for p in FILES])
def test_import_layering(path):
    problems = layering_violations(path)
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in FILES if layer_of(module_name(p)) is None]
    assert not missing, f"modules without a LAYERS row: {missing}"


def test_file_length_hard_cap():
    long = {p.relative_to(REPO).as_posix(): n for p in FILES
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_torch_is_never_imported_by_the_engine():
    hits = [f"{p.relative_to(REPO).as_posix()}:{line}" for p in FILES
            for name, line, _ in imports_of(p) if _within(name, "torch")]
    assert not hits, f"torch imported at {hits}"
