"""The built wheel installs one top-level import name, minires (kernels/ goes in as
minires.kernels: a top-level `kernels` would clash with Hugging Face's package of that name)."""
import importlib.util
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


def _build_wheel(out):
    """Build minires's wheel into `out` from a copy of the sources (a build in the checkout
    would leave build/ and .egg-info there); without build isolation when setuptools is
    here (no download then)."""
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "minires", "kernels"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree \
            else {}
        copy(REPO / name, src / name, **kwargs)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out)]
    if importlib.util.find_spec("setuptools") and importlib.util.find_spec("wheel"):
        cmd.append("--no-build-isolation")
    proc = subprocess.run(cmd + [str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("minires-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    with zipfile.ZipFile(_build_wheel(tmp_path_factory.mktemp("wheel"))) as z:
        return z.namelist()


def test_wheel_has_one_top_level_import_name(wheel_names):
    tops = {n.split("/")[0] for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"minires"}


def test_wheel_carries_every_module_under_minires(wheel_names):
    """Every .py file of minires/ and kernels/ is in the wheel (kernels/ as minires/kernels/):
    a subpackage missing from pyproject's package list would be left out silently."""
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "minires").rglob("*.py")}
    expected |= {"minires/" + p.relative_to(REPO).as_posix()
                 for p in (REPO / "kernels").rglob("*.py")}
    missing = sorted(expected - set(wheel_names))
    assert not missing, f"not in the wheel: {missing}"
    assert not any(n.startswith("kernels/") for n in wheel_names)
