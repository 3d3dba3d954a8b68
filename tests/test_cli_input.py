"""Every number on the command line is range-checked by the parser (issue 15).

A bad value is one argparse error naming the flag, exit status 2, before anything is read or
written: no run folder, no ``runs/``, no traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from reslab.cli import build_parser, main
from reslab.commands import options

BIG_SEED = str(2**70)  # 1180591620717411303424; torch.manual_seed overflows past 2**64 - 1
FROM = ["--from", "missing.pth", "--data", "digits"]  # never read: the parser stops first

# (argv, the flag the error must name). Commands that train get a short run so that, on code
# without the checks, a case ends in seconds instead of training a whole recipe.
CASES: list[tuple[list[str], str]] = [
    (["summary", "resnet18", "--input-size", "0"], "--input-size"),
    (["summary", "resnet18", "--input-size", "-3"], "--input-size"),
    (["summary", "resnet18", "--num-classes", "0"], "--num-classes"),
    (["summary", "resnet18", "--in-channels", "0"], "--in-channels"),
    (["analyze", "degradation", "--out", "run", "--seed", BIG_SEED], "--seed"),
    (["analyze", "degradation", "--out", "run", "--seed", "-1"], "--seed"),
    (["analyze", "lesion", "--out", "run", "--lr", "-1"], "--lr"),
    (["analyze", "lesion", "--out", "run", "--lr", "nan"], "--lr"),
    (["analyze", "orderings", "--out", "run", "--train-fraction", "1.5"], "--train-fraction"),
    (["analyze", "orderings", "--out", "run", "--train-fraction", "0"], "--train-fraction"),
    (["analyze", "responses", "--out", "run", "--val-size", "-1"], "--val-size"),
    (["analyze", "ode", "--out", "run", "--iters", "0"], "--iters"),
    (["analyze", "gradflow", "--out", "run", "--batch-size", "0"], "--batch-size"),
    (["analyze", "toy", "--out", "run", "--threads", "0"], "--threads"),
    (["train", "--threads", "0", "--out", "run"], "--threads"),
    (["train", "--epochs", "inf", "--out", "run"], "--epochs"),
    (["train", "--epochs", "nan", "--out", "run"], "--epochs"),
    (["train", "--epochs", "0", "--out", "run"], "--epochs"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--iters", "0"], "--iters"),
    (["train", "--iters", "2", "--eval-every", "-5", "--out", "run"], "--eval-every"),
    (["train", "--iters", "2", "--seed", BIG_SEED, "--out", "run"], "--seed"),
    (["train", "--iters", "2", "--seed", "-1", "--out", "run"], "--seed"),
    (["train", "--iters", "2", "--batch-size", "0", "--out", "run"], "--batch-size"),
    (["train", "--iters", "2", "--lr", "-1", "--out", "run"], "--lr"),
    (["train", "--iters", "2", "--lr", "inf", "--out", "run"], "--lr"),
    (["train", "--iters", "2", "--val-size", "-1", "--out", "run"], "--val-size"),
    (["train", "--iters", "2", "--threads", "two"], "--threads"),
    (["finetune", *FROM, "--classes", "1,1", "--out", "run"], "--classes"),
    (["finetune", *FROM, "--classes", "1,,2", "--out", "run"], "--classes"),
    (["finetune", *FROM, "--classes", "", "--out", "run"], "--classes"),
    (["finetune", *FROM, "--train-fraction", "1.5", "--out", "run"], "--train-fraction"),
    (["finetune", *FROM, "--train-fraction", "nan", "--out", "run"], "--train-fraction"),
    (["finetune", *FROM, "--val-size", "-1", "--out", "run"], "--val-size"),
    (["finetune", *FROM, "--in-channels", "0", "--out", "run"], "--in-channels"),
    (["finetune", *FROM, "--unfreeze-every", "0", "--out", "run"], "--unfreeze-every"),
    (["finetune", *FROM, "--pretrained-lr-scale", "-1", "--out", "run"], "--pretrained-lr-scale"),
    (["finetune", *FROM, "--pretrained-lr-scale", "nan"], "--pretrained-lr-scale"),
    (["finetune", *FROM, "--epochs", "inf", "--out", "run"], "--epochs"),
    (["finetune", *FROM, "--threads", "0", "--out", "run"], "--threads"),
    (["finetune", *FROM, "--seed", BIG_SEED, "--out", "run"], "--seed"),
    (["finetune", *FROM, "--iters", "2", "--eval-every", "-5", "--out", "run"], "--eval-every"),
    (["predict", "missing.pt", "x.png", "--topk", "0"], "--topk"),
    (["predict", "missing.pt", "x.png", "--image-size", "0"], "--image-size"),
    (["data", "pack", "src", "dest", "--max-side", "4"], "--max-side"),  # PackConfig's minimum
]


def _exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own exit, whichever way main passes it on
        return int(exc.code or 0)


@pytest.mark.parametrize(("argv", "flag"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_numbers_are_parser_errors(
    argv: list[str],
    flag: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # a default run folder would appear as tmp_path/runs
    assert _exit_status(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"reslab {argv[0]}") and f"error: argument {flag}" in last, err
    assert list(tmp_path.iterdir()) == []  # no run folder, no runs/, nothing else


def _all_actions() -> list[tuple[str, argparse.Action]]:
    """(command path, action) for every option of every subcommand, nested ones included."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}".strip())
            else:
                found.append((path, action))

    walk(build_parser(), "")
    return found


def test_no_number_reaches_a_command_unchecked() -> None:
    """Every int/float option uses a range-checked type from reslab.commands.options, so a new
    flag cannot bring back a bare ``type=int`` (which takes 0, -5 and 2**70)."""
    bare = [
        f"reslab {path} {'/'.join(action.option_strings) or action.dest}"
        for path, action in _all_actions()
        if action.type in (int, float)
    ]
    assert not bare, f"use a validator from reslab.commands.options: {bare}"
    commands = {path.split()[0] for path, _ in _all_actions() if path}
    assert commands >= {"summary", "list", "analyze", "train", "eval", "finetune", "predict"}


def _numeric_flags() -> list[tuple[str, argparse.Action]]:
    """(command path, option) for every option whose value is a number (a range-checked type)."""
    text_types = (None, str, Path, options.class_names)
    return [
        (path, a) for path, a in _all_actions() if a.option_strings and a.type not in text_types
    ]


# the validators whose range starts at 0 (a seed, a count of held-out images or workers, ...)
ZERO_OK = {options.nonnegative_int, options.nonnegative_float, options.seed, options.worker_count}
# the validators with an upper end: image sides (memory) and threads/processes (a fork bomb)
BOUNDED = {
    options.image_side,
    options.pack_side,
    options.process_count,
    options.worker_count,
    options.resize_side,
}
NUMERIC = _numeric_flags()


def _flag_id(case: tuple[str, argparse.Action]) -> str:
    return f"{case[0]} {case[1].option_strings[-1]}"


@pytest.fixture
def refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[[str, str, str], str]:
    """``refused(PATH, FLAG, VALUE)``: the one-line parser error for ``reslab PATH FLAG VALUE``,
    checked to be exit status 2 naming the flag, with nothing written."""
    monkeypatch.chdir(tmp_path)

    def check(path: str, flag: str, value: str) -> str:
        assert _exit_status([*path.split(), flag, value]) == 2, f"{path} {flag} {value} accepted"
        err = capsys.readouterr().err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"reslab {path}: error: argument {flag}") and value in last, err
        assert list(tmp_path.iterdir()) == []
        return last

    return check


@pytest.mark.parametrize("case", NUMERIC, ids=[_flag_id(c) for c in NUMERIC])
def test_every_numeric_flag_refuses_zero_negative_and_non_finite_values(
    case: tuple[str, argparse.Action], refused: Callable[[str, str, str], str]
) -> None:
    """0 (where the flag has no use for it), -1, nan and inf given to any numeric flag of any
    subcommand: exit status 2 and one line naming the flag and the value, nothing written."""
    path, action = case
    flag = action.option_strings[-1]
    for value in ("-1", "nan", "inf"):
        refused(path, flag, value)
    if action.type in ZERO_OK:
        assert action.type("0") == 0  # type: ignore[misc]
    else:
        refused(path, flag, "0")


BOUNDED_FLAGS = [c for c in NUMERIC if c[1].type in BOUNDED]


@pytest.mark.parametrize("case", BOUNDED_FLAGS, ids=[_flag_id(c) for c in BOUNDED_FLAGS])
def test_image_sides_and_process_counts_have_an_upper_end(
    case: tuple[str, argparse.Action], refused: Callable[[str, str, str], str]
) -> None:
    """`--image-size 100000` on the digits asked the allocator for 13 TB (a traceback);
    `--workers 100000` would fork 100000 copies of the process. Both are parser errors now, and
    the largest value allowed still passes."""
    path, action = case
    flag = action.option_strings[-1]
    last = refused(path, flag, "100000")
    top = (
        options.MAX_PROCESSES
        if action.type in (options.process_count, options.worker_count)
        else options.MAX_IMAGE_SIDE
    )
    assert last.endswith(f"must be <= {top}, got 100000")
    assert action.type(str(top)) == top  # type: ignore[misc]
    assert len(BOUNDED_FLAGS) >= 15  # every --image-size/--input-size/--resize/--threads/--workers
