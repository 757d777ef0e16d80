"""Size budgets (docs/design.md, conventions): code lines of minires/ and kernels/, and
tensor.py's length."""
import ast
import io
import tokenize

from conftest import REPO

# Code lines (no blank lines, comments or docstrings). Raise only with a reason in the commit.
# kernels: 2000 + 250 for kernels/registry.py's test cases and bench rows of every kernel (~170
# code lines of test and bench data that lived in tests/ and bench/ before the one registry).
CODE_LINE_BUDGET = {"minires": 6000, "kernels": 2400}
TENSOR_PY_MAX_LINES = 400


def docstring_lines(source):
    """Line numbers covered by module, class and function docstrings."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(
                    body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def code_lines(source):
    """Count lines holding code tokens, excluding comments and docstrings."""
    skip = docstring_lines(source)
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                        tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        code.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in skip)
    return len(code)


def test_code_line_counter_ignores_docstrings_and_comments():
    source = '"""Doc."""\n# comment\n\ndef f(x):\n    """Doc\n    more."""\n    return x  # c\n'
    assert code_lines(source) == 2


def test_code_line_budgets():
    for package, budget in CODE_LINE_BUDGET.items():
        total = sum(code_lines(p.read_text()) for p in (REPO / package).rglob("*.py"))
        assert 0 < total <= budget, f"{package}/ has {total} code lines, budget {budget}"


def test_tensor_py_is_readable_in_one_sitting():
    n = len((REPO / "minires" / "tensor.py").read_text().splitlines())
    assert n <= TENSOR_PY_MAX_LINES, f"minires/tensor.py has {n} lines"
