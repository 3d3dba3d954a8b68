"""The CLI is a thin layer: check it parses, calls the library and reports bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reslab.cli import main


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
    assert main(["summary", "resnet18", "--input-size", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_analyze_refuses_empty_batches_and_depths(tmp_path, capsys) -> None:
    for argv in (
        ["gradflow", "cifar_resnet20", "--batch-size", "0"],  # was a ZeroDivisionError
        ["orderings", "--depth", "0"],  # was silently the default depth
    ):
        with pytest.raises(SystemExit) as info:
            main(["analyze", *argv, "--out", str(tmp_path)])
        assert info.value.code == 2
        assert "must be >= 1, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
