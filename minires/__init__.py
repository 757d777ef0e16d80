"""minires: a small, readable, fast deep-learning engine for residual networks.

Autograd over NumPy (CPU) and CuPy (GPU) arrays with hand-written Numba kernels.
"""
import importlib.util as _importlib_util
import pathlib as _pathlib
import sys as _sys


def _kernels_from_source_checkout():
    """Make `minires.kernels` importable when running from a source checkout.

    The kernels live in the top-level kernels/ folder of the repository (a leaf package that
    never imports minires); pyproject.toml installs that folder as `minires.kernels`, so an
    installed or editable minires finds it by itself. A checkout used without installing
    (`python -m pytest`, `python -m bench` from the repo root) has no minires/kernels/
    folder: there, load ../kernels under the same name.
    """
    if "minires.kernels" in _sys.modules or _importlib_util.find_spec("minires.kernels"):
        return
    folder = _pathlib.Path(__file__).resolve().parent.parent / "kernels"
    spec = _importlib_util.spec_from_file_location(
        "minires.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)])
    if spec is None:
        raise ImportError(f"minires: the kernels package is missing (looked in {folder})")
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["minires.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules["minires.kernels"]
        raise


_kernels_from_source_checkout()

from minires.tensor import Tensor, Parameter, Function, no_grad, enable_grad, is_grad_enabled
from minires.autograd import grad
from minires.tensor import tensor, zeros, ones, randn
from minires import ops, nn, optim, models
from minires.checkpoint import save, load
from minires.profile import profile
from minires.anomaly import detect_anomaly

__version__ = "0.1.0"
