"""The package's layers, enforced: models <- data <- train <- transfer/analysis <- commands.

Every ``import`` in ``reslab/`` is read from the source (AST), including lazy imports inside
functions and ``importlib.import_module("reslab....")`` calls, so a cycle cannot hide in a function
body. A module may import its own package and packages of a lower rank, never a higher one or a
sibling of the same rank.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "reslab"

# Longest prefix wins. The package root is the public facade over the model zoo.
RANKS: dict[str, int] = {
    "reslab._io": 0,  # atomic writes: imports nothing of reslab
    "reslab.models": 1,
    "reslab": 2,  # reslab/__init__.py re-exports the zoo
    "reslab.summary": 2,  # per-stage tables of a built model
    "reslab.data": 2,
    "reslab.train": 3,
    "reslab.deploy": 4,  # export, int8 and predict of trained checkpoints
    "reslab.transfer": 5,  # re-exports deploy's predict for its old import path
    "reslab.analysis": 5,
    "reslab.commands": 6,
    "reslab.cli": 7,
    "reslab.__main__": 8,
}


def _owner(module: str) -> str:
    """The RANKS key a dotted module name belongs to."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    raise KeyError(module)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _package(path: Path) -> str:
    """The package relative imports in ``path`` start from."""
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(path: Path, package: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base, [a.name for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
        ):
            arg = node.args[0]
            if isinstance(arg, ast.JoinedStr) and arg.values:  # f"reslab.analysis.{name}"
                arg = arg.values[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield node.lineno, arg.value.rstrip("."), []


def _sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for path in _sources():
        try:
            _owner(_module_name(path))
        except KeyError:
            unplaced.append(_module_name(path))
    assert not unplaced, f"add these modules to RANKS in {__file__}: {unplaced}"


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in _sources():
        here = _owner(_module_name(path))
        for line, module, _ in _imports(path, _package(path)):
            if module != "reslab" and not module.startswith("reslab."):
                continue
            there = _owner(module)
            if there != here and RANKS[there] >= RANKS[here]:
                rel = path.relative_to(ROOT.parent)
                wrong.append(f"{rel}:{line} ({here}, rank {RANKS[here]}) imports {module} "
                             f"(rank {RANKS[there]})")  # fmt: skip
    assert not wrong, "layering broken:\n" + "\n".join(wrong)


def test_commands_do_not_import_each_other() -> None:
    """A helper two subcommands need lives in a shared module (``reslab.commands.options``)
    under a public name: no subcommand module imports another, nor anyone's private names."""
    from reslab.cli import SUBCOMMANDS

    subcommand_modules = {module for _, module in SUBCOMMANDS}
    wrong = []
    for path in sorted((ROOT / "commands").glob("*.py")):
        me = _module_name(path)
        for line, module, names in _imports(path, _package(path)):
            if not module.startswith("reslab.") or module == me:
                continue
            private = [n for n in names if n.startswith("_")]
            if private:
                wrong.append(f"{path.name}:{line} takes {private} from {module}")
            elif me in subcommand_modules and module in subcommand_modules:
                wrong.append(f"{path.name}:{line} imports the subcommand module {module}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n    from reslab.transfer import x\n", "reslab.transfer"),
        ("import importlib\nimportlib.import_module(f'reslab.analysis.{n}')\n", "reslab.analysis"),
        ("from ..train import loop\n", "reslab.train"),
        ("from . import zoo\n", "reslab.models"),
    ],
)
def test_the_scan_sees_lazy_dynamic_and_relative_imports(
    source: str, expected: str, tmp_path: Path
) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    found = [module for _, module, _ in _imports(fake, "reslab.models")]
    assert expected in found
