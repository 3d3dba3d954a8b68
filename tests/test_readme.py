"""The README's examples run, so a renamed function or flag breaks a test, not a reader.

- ``python`` blocks run in order in one namespace, in an empty folder that holds the weight files
  the README tells the reader to save (same formats and architectures, random weights: nothing
  downloads).
- ``bash`` blocks: ``reslab ...`` lines run (``main(argv) == 0``); ``make``, ``pip install`` and
  ``python benchmarks/...`` lines are checked against the Makefile, pyproject.toml and the files.
- ``console`` blocks: each ``$ reslab ...`` line runs and prints exactly the lines below it.
- A block preceded by ``<!-- readme-test: skip: REASON -->`` (training runs, downloads) is only
  checked: Python compiles, every ``reslab`` line parses with the real argument parser (every
  flag exists, every value passes its range check).

The ``reslab`` command lines of docs/*.md are parsed the same way.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from reslab.cli import DEFAULT_COMMAND, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
SKIP = re.compile(r"<!-- readme-test: skip: (.+?) -->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the first line inside the fence
    lang: str
    text: str
    skip: str | None  # the stated reason, for a block that is only checked

    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def code_blocks(path: Path, text: str | None = None) -> list[Block]:
    text = path.read_text() if text is None else text
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        line = text[: m.start()].count("\n") + 2
        blocks.append(Block(path, line, m.group(1), m.group(2), skip and skip.group(1)))
    return blocks


def command_lines(text: str) -> Iterator[list[str]]:
    """Each shell command of a block as argv: continuations joined, comments dropped."""
    for line in text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            yield argv


def reslab_argv(argv: list[str]) -> list[str] | None:
    """The arguments of a reslab invocation (``reslab``, ``.venv/bin/reslab``, ``python -m
    reslab``, ``torchrun ... -m reslab``, after ``/usr/bin/time -v``), else None."""
    for i, word in enumerate(argv):
        if word == "reslab" or word.endswith("/bin/reslab"):
            return argv[i + 1 :]
        if word == "-m" and argv[i + 1 : i + 2] == ["reslab"]:
            return argv[i + 2 :]
    return None


def parses(args: list[str]) -> None:
    """The real parser accepts the command line (it raises SystemExit otherwise)."""
    build_parser().parse_args(args or DEFAULT_COMMAND)


def _extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project.get("optional-dependencies", {}))


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def check_other_command(argv: list[str], block: Block) -> None:
    """A README shell line that is not reslab: what it names must exist."""
    if argv[0] == "make":
        assert set(argv[1:]) <= _make_targets(), f"{block.where()}: no make target {argv[1:]}"
    elif argv[:2] == ["pip", "install"]:
        for spec in argv[2:]:
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
            assert m, f"{block.where()}: pip install {spec!r}: not an install from the checkout"
            assert set((m.group(1) or "").split(",")) - {""} <= _extras(), block.where()
    elif any(a.startswith("benchmarks/") for a in argv):
        script = next(a for a in argv if a.startswith("benchmarks/"))
        assert (ROOT / script).is_file(), f"{block.where()}: no {script}"
    else:
        raise AssertionError(f"{block.where()}: no rule to check {shlex.join(argv)!r}")


def run_shell_block(block: Block) -> None:
    for argv in command_lines(block.text):
        args = reslab_argv(argv)
        if args is None:
            check_other_command(argv, block)
        elif block.skip:
            parses(args)
        else:
            assert main(args) == 0, f"{block.where()}: {shlex.join(argv)}"


def run_console_block(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    """``$ reslab ...`` lines, each followed by the output it prints."""
    parts = re.split(r"^\$ (.*)\n", block.text, flags=re.M)
    assert parts[0] == "", f"{block.where()}: a console block starts with a $ line"
    for command, expected in zip(parts[1::2], parts[2::2], strict=True):
        args = reslab_argv(shlex.split(command))
        assert args is not None, f"{block.where()}: {command}"
        capsys.readouterr()
        assert main(args) == 0, f"{block.where()}: {command}"
        out = capsys.readouterr().out
        assert [line.rstrip() for line in out.splitlines()] == [
            line.rstrip() for line in expected.splitlines()
        ], f"{block.where()}: `{command}` prints something else now:\n{out}"


def run_python_blocks(blocks: list[Block]) -> None:
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for block in blocks:
        # padded so that a traceback names the README's own line
        code = compile("\n" * (block.line - 1) + block.text, str(block.path), "exec")
        if not block.skip:
            exec(code, namespace)


def _weight_files(folder: Path) -> None:
    """The files the README's download block saves, with random weights (nothing downloads)."""
    import safetensors.torch
    import torchvision

    timm = pytest.importorskip("timm", reason="timm (in reslab[dev]) makes the ResNetV2 file")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), folder / "resnet18.pth")
    resnetv2 = timm.create_model("resnetv2_50", pretrained=False)
    safetensors.torch.save_file(resnetv2.state_dict(), folder / "resnetv2_50.safetensors")


# -- the README ----------------------------------------------------------------------------------


def test_every_skipped_block_says_why() -> None:
    text = README.read_text()
    markers = re.findall(r"<!-- readme-test:.*?-->", text)
    assert len(markers) == sum(b.skip is not None for b in code_blocks(README))  # all attached
    reasons = [SKIP.search(marker) for marker in markers]
    assert all(r is not None and len(r.group(1)) > 10 for r in reasons), markers  # a real reason


def test_the_readme_starts_with_make_demo_and_make_test() -> None:
    first = code_blocks(README)[0]
    assert [argv[:2] for argv in command_lines(first.text)] == [
        ["make", "demo"],
        ["make", "test"],
    ]


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in code_blocks(README) if b.lang == "python"]
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    _weight_files(tmp_path)
    run_python_blocks(blocks)


def test_readme_shell_blocks_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in code_blocks(README) if b.lang in ("bash", "sh", "console")]
    assert any(b.lang == "console" for b in blocks) and any(not b.skip for b in blocks)
    for block in blocks:
        if block.lang == "console":
            run_console_block(block, capsys)
        else:
            run_shell_block(block)
    assert not (tmp_path / "runs").exists()  # only cheap commands ran


def test_readme_has_no_untested_block() -> None:
    langs = {b.lang for b in code_blocks(README)}
    assert langs <= {"python", "bash", "sh", "console"}, langs


# -- docs/*.md: every reslab command line parses -----------------------------------------------


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_command_lines_parse(path: Path) -> None:
    seen = 0
    for block in code_blocks(path):
        if block.lang == "python":
            compile(block.text, str(path), "exec")
            continue
        lines = block.text
        if block.lang in ("console", "text", ""):  # transcripts: only the `$ ...` lines
            lines = "\n".join(m for m in re.findall(r"^\$ (.*)$", block.text, re.M))
        for argv in command_lines(lines):
            args = reslab_argv(argv)
            if args is not None:
                parses(args)
                seen += 1
    if "reslab " in path.read_text():
        assert seen, f"no reslab command line found in {path.name}'s code blocks"


# -- the checks themselves fail on a broken example ---------------------------------------------


def test_a_renamed_function_or_flag_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "README.md"
    text = (
        "```python\nimport reslab\nreslab.make_model('resnet18')\n```\n"
        "<!-- readme-test: skip: would train for hours -->\n"
        "```bash\nreslab train --data digits --iterations 3\n```\n"
        "```bash\nreslab lst\n```\n"
        "```console\n$ reslab list 'resnet1*'\nresnet101\nresnet18\n```\n"
    )
    python, skipped, bash, console = code_blocks(fake, text)
    with pytest.raises(AttributeError, match="make_model"):
        run_python_blocks([python])
    assert skipped.skip == "would train for hours"
    with pytest.raises(SystemExit):  # --iterations: not a flag (--iters is)
        run_shell_block(skipped)
    with pytest.raises(AssertionError, match="reslab lst"):
        run_shell_block(bash)
    with pytest.raises(AssertionError, match="prints something else"):
        run_console_block(console, capsys)  # resnet152 is missing from the transcript
