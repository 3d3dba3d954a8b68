"""The CLI is a thin layer: check it parses, calls the library and reports bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reslab.cli import main
from reslab.models import create_model
from reslab.summary import summarize


def test_summary_json(capsys) -> None:
    assert main(["summary", "cifar_resnet20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"params", "macs", "stages"} <= set(out)
    assert round(out["params"] / 1e6, 2) == 0.27
    assert [s["output_size"][-1] for s in out["stages"][:4]] == [32, 32, 16, 8]
    assert all({"name", "output_size", "params", "macs"} <= set(s) for s in out["stages"])


def test_summary_table_resnet34(capsys) -> None:
    assert main(["summary", "resnet34"]) == 0
    text = capsys.readouterr().out
    for size in ("112x112", "56x56", "28x28", "14x14", "7x7"):
        assert size in text
    assert "21,797,672" in text


def test_unknown_model_is_a_clear_error(capsys) -> None:
    assert main(["summary", "resnet51"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet51'" in err and "resnet50" in err


def test_python_dash_m() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "reslab", "list", "resnet1*"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["resnet101", "resnet152", "resnet18"]


def test_summary_refuses_input_sizes_the_model_cannot_take(capsys) -> None:
    assert main(["summary", "dense_resnet10", "--input-size", "16"]) == 2  # 256 values, not 64
    assert "reads 64 values" in capsys.readouterr().err
    assert main(["summary", "resnet18", "--input-size", "0"]) == 2  # now the parser's check
    assert "argument --input-size: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be positive"):  # the library's own, kept
        summarize(create_model("resnet18"), (3, 0, 0))


def test_analyze_refuses_empty_batches_and_depths(tmp_path, capsys) -> None:
    for argv in (
        ["gradflow", "cifar_resnet20", "--batch-size", "0"],  # was a ZeroDivisionError
        ["orderings", "--depth", "0"],  # was silently the default depth
    ):
        assert main(["analyze", *argv, "--out", str(tmp_path)]) == 2  # argparse's usage error
        assert "must be >= 1, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_parser_errors_and_help_are_exit_statuses(capsys) -> None:
    """main() returns argparse's status instead of raising SystemExit (callers and tests)."""
    assert main(["train", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert main(["list", "--help"]) == 0
    assert "--details" in capsys.readouterr().out


def _reslab_into_a_closed_pipe(*argv: str) -> tuple[int, str]:
    """Run ``python -m reslab ARGV`` with stdout a pipe whose reader is already gone, as after
    ``| head -3`` has read its lines (deterministic: the reader closes before the first write)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "reslab", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(), err


@pytest.mark.parametrize(
    "argv",
    [["list", "cifar_*"], ["summary", "cifar_resnet20", "--json"]],
    ids=" ".join,
)
def test_a_closed_pipe_ends_the_output_quietly(argv: list[str]) -> None:
    """`reslab list 'cifar_*' | head -3` ended with 'error: [Errno 32] Broken pipe' (exit 2)."""
    status, err = _reslab_into_a_closed_pipe(*argv)
    assert err == ""  # no "Broken pipe", no "Exception ignored" at interpreter exit
    assert status == 141  # 128 + SIGPIPE, the status of a program a closed pipe stops


def test_head_gets_its_lines_and_nothing_is_reported() -> None:
    """The reported command line itself, through a shell and a real ``head``."""
    done = subprocess.run(
        ["sh", "-c", f"{sys.executable} -m reslab list 'cifar_*' | head -3"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["cifar_plain110", "cifar_plain20", "cifar_plain32"]
    assert done.stderr == ""


def _trainer_actions(command: str) -> dict[str, tuple]:
    from reslab.cli import build_parser
    from reslab.commands.options import TRAINER_FLAGS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {
        a.dest: (tuple(a.option_strings), a.type, a.choices, a.default, a.nargs)
        for a in sub._actions
        if a.dest in TRAINER_FLAGS
    }


def test_train_and_finetune_take_the_same_trainer_flags() -> None:
    """One definition: same names, types, choices and defaults (they had drifted apart:
    finetune lacked --no-compile and --no-sync-bn)."""
    from reslab.commands.options import TRAINER_FLAGS

    train, finetune = _trainer_actions("train"), _trainer_actions("finetune")
    assert set(train) == set(TRAINER_FLAGS)
    assert train == finetune
    assert train["compile"][0] == ("--compile", "--no-compile")


def test_default_recipe_per_command_and_data() -> None:
    from reslab.cli import build_parser
    from reslab.commands.options import train_config

    def recipe(argv: list[str], command: str, data: str) -> str:
        return train_config(build_parser().parse_args(argv), command=command, data=data).recipe

    assert recipe(["train"], "train", "digits") == "digits"
    assert recipe(["train", "--data", "x.zip"], "train", "x.zip") == "paper"
    assert recipe(["finetune", "--data", "x.zip"], "finetune", "x.zip") == "fast"
    assert recipe(["train", "--recipe", "fast", "--data", "digits"], "train", "digits") == "fast"


def test_seed_range_is_what_torch_takes_without_wrapping() -> None:
    import argparse

    import torch

    from reslab.commands.options import MAX_SEED, seed

    assert seed(str(MAX_SEED)) == 2**63 - 1
    torch.Generator().manual_seed(seed(str(MAX_SEED)))  # accepted by torch
    for bad in (str(2**63), "-1", "1.5", "2**70"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 2\*\*63 - 1\]"):
            seed(bad)
