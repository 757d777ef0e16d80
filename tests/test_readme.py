"""The README's set-up commands and example stay true: the example runs as written."""
import re

from conftest import REPO

README = (REPO / "README.md").read_text()


def python_blocks(text):
    """The fenced ```python blocks of a Markdown text, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_starts_with_the_two_setup_commands():
    setup = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert setup[0].startswith('pip install ".[plot]" && minires train')
    assert setup[1].startswith('pip install ".[test]" && pytest')


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert '\npip install ".[test]" && pytest\n' in ci


def test_readme_example_runs(capsys):
    blocks = python_blocks(README)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert "gradcheck passed" in capsys.readouterr().out
    assert namespace["x"].grad.shape == (1, 3) and namespace["w"].grad.shape == (2, 3)


def test_every_readme_python_block_runs(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for i, block in enumerate(python_blocks(README)[1:], start=2):
        exec(compile(block, f"README.md python block {i}", "exec"), {})
    assert "correct at lr" in capsys.readouterr().out
