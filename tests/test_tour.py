"""docs/tour.md stays true: its python blocks run in order in one namespace, its sections
are there in order, and every relative link (and every function it names) exists.

Blocks fenced ```python gpu / numba-cuda / mnist are skipped when that requirement is missing.
"""
import re

import pytest

from conftest import REPO
from minires import backend

TOUR = REPO / "docs" / "tour.md"
SECTIONS = ("A Tensor and a Function", "Backward", "Writing a new op", "Convolution",
            "The fused residual add", "CPU versus GPU", "Training end to end",
            "Gradients of gradients")
TAGS = ("gpu", "numba-cuda", "mnist")
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
NAMED = re.compile(r"^`([A-Za-z_][\w.]*)(?:\(\))?`$")  # link text `name`, `Class.name`, `f()`


def read_tour():
    return TOUR.read_text(encoding="utf-8")


def code_blocks(text):
    """[(first code line number, language, tags, code)] for every fenced block, in order."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if current is None and line.startswith("```"):
            words = line[3:].split()
            current = (number + 1, words[0] if words else "", frozenset(words[1:]), [])
        elif current is not None and line.rstrip() == "```":
            blocks.append(current[:3] + ("\n".join(current[3]) + "\n",))
            current = None
        elif current is not None:
            current[3].append(line)
    assert current is None, f"docs/tour.md: the code block at line {current[0] - 1} never ends"
    return blocks


def python_blocks(text):
    return [b for b in code_blocks(text) if b[1] == "python"]


def _probe(a):
    a[0] = 0


def _can_compile_ptx():
    """numba.cuda imports (not simulated) and compiles a trivial kernel: NVVM is present."""
    try:
        from numba import cuda
        cuda.compile_ptx(_probe, "void(float32[::1])", cc=(8, 0))
    except Exception:  # ImportError, NvvmSupportError, simulator mode, ...: not available
        return False
    return True


def _mnist_root(request):
    try:
        return request.getfixturevalue("mnist_dir")
    except pytest.skip.Exception:
        return None


def _available(request, monkeypatch):
    """The set of block tags whose requirement this machine meets."""
    found = set()
    if backend.cupy_available():
        found.add("gpu")
    if _can_compile_ptx():
        found.add("numba-cuda")
    root = _mnist_root(request)
    if root is not None:
        monkeypatch.setenv("MINIRES_DATA", str(root))
        found.add("mnist")
    return found


def _failure(index, start, error):
    """Block number, its first line and the tour line where the error was raised."""
    line, tb = start, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(TOUR):
            line = tb.tb_lineno
        tb = tb.tb_next
    return (f"docs/tour.md python block {index} (starting at line {start}) failed at line "
            f"{line}: {type(error).__name__}: {error}")


def test_tour_blocks_run_in_order(request, monkeypatch):
    monkeypatch.chdir(REPO)  # the tour's snippets run from the repository root
    available = _available(request, monkeypatch)
    blocks = python_blocks(read_tour())
    namespace = {"__name__": "__tour__"}
    ran, skipped = 0, []
    for index, (start, _, tags, code) in enumerate(blocks, start=1):
        unknown = tags - set(TAGS)
        assert not unknown, f"python block {index} (line {start}): unknown tags {unknown}"
        if not tags <= available:
            skipped.append((index, sorted(tags - available)))
            continue
        # padding keeps tracebacks pointing at the tour's own line numbers
        compiled = compile("\n" * (start - 1) + code, str(TOUR), "exec")
        try:
            exec(compiled, namespace)
        except Exception as error:
            pytest.fail(_failure(index, start, error))
        ran += 1
    untagged = sum(1 for b in blocks if not b[2])
    assert ran >= untagged >= 15, f"ran {ran} blocks, {untagged} untagged (skipped {skipped})"


def test_block_failure_names_block_and_line():
    code = "x = 1\n\nraise ValueError('boom')\n"
    try:
        exec(compile("\n" * 9 + code, str(TOUR), "exec"), {})
    except ValueError as error:
        message = _failure(4, 10, error)
    assert message.startswith("docs/tour.md python block 4 (starting at line 10) failed at "
                              "line 12: ValueError: boom")


def test_tour_has_its_sections_in_order():
    headings = re.findall(r"^## (\d+)\. (.+?)\s*$", read_tour(), flags=re.M)
    assert headings == [(str(i), title) for i, title in enumerate(SECTIONS, start=1)]


def test_every_section_has_a_runnable_block():
    sections = re.split(r"^## \d+\. ", read_tour(), flags=re.M)[1:]
    for title, body in zip(SECTIONS, sections):
        assert any(not tags for _, _, tags, _ in python_blocks(body)), \
            f"section {title!r} has no python block that runs everywhere"


def relative_links(text):
    """(text, target) of every Markdown link that is not a web address or a bare anchor."""
    return [(label, target) for label, target in LINK.findall(text)
            if not re.match(r"^[a-z]+:|^#", target)]


def test_relative_links_point_to_existing_files():
    links = relative_links(read_tour())
    assert len(links) >= 40, f"only {len(links)} relative links"
    missing = sorted({t for _, t in links if not (TOUR.parent / t.split("#")[0]).exists()})
    assert not missing, f"docs/tour.md links to missing files: {missing}"


def test_linked_names_are_defined_in_the_linked_file():
    """[`name`](file.py) promises that file defines name (def, class or assignment)."""
    wrong = []
    for label, target in relative_links(read_tour()):
        found = NAMED.match(label)
        path = TOUR.parent / target.split("#")[0]
        if not found or path.suffix != ".py" or not path.exists():
            continue
        name = found.group(1).split(".")[-1]
        pattern = rf"^\s*(def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*="
        if not re.search(pattern, path.read_text(encoding="utf-8"), flags=re.M):
            wrong.append(f"{label} -> {target}")
    assert not wrong, f"docs/tour.md names functions its links' files do not define: {wrong}"


def test_link_checker_sees_a_missing_file_and_name():
    text = "[a](../no/such/file.py) [`f`](https://example.com) [b](#anchor)"
    assert relative_links(text) == [("a", "../no/such/file.py")]
    assert NAMED.match("`Tensor.backward`") and NAMED.match("`f()`")
    assert not NAMED.match("minires/tensor.py")
