"""Habits the code base keeps (issue 13): short functions, and a training loop that reads as one."""

from __future__ import annotations

import ast
from pathlib import Path

import reslab

ROOT = Path(reslab.__file__).resolve().parent
MAX_LINES = 60  # a longer function says why in its docstring ("over 60 lines ...")


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}", node))
    return found


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def test_no_function_over_60_lines_without_a_reason() -> None:
    long = [
        f"{where} ({_length(node)} lines)"
        for where, node in _functions()
        if _length(node) > MAX_LINES
        and "over 60 lines" not in (ast.get_docstring(node) or "").lower()
    ]
    assert not long, "functions over 60 lines whose docstring gives no reason:\n" + "\n".join(long)


def test_fit_is_the_loop_of_a_training_run() -> None:
    """fit was ~240 lines; its parts live in setup, runs, state, evaluation and outputs."""
    (fit,) = [node for where, node in _functions() if where.startswith("reslab/train/loop.py")
              and node.name == "fit"]  # fmt: skip
    assert _length(fit) <= 100
