"""Seed-packed training through ``fit`` and the CLI: K members as K separate runs would be.

The members are compared with separate ``fit`` runs in float32, where the packed network's
grouped convolutions and the separate runs' plain ones sum in different orders; the tolerance is
the one tests/test_packed.py measured for a few SGD steps at lr 0.1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from reslab.cli import main
from reslab.data import DataSplits
from reslab.models import ResNetConfig, build_model, get_config
from reslab.models.packed import PackedNet, build_packed
from reslab.train import NonFiniteLossError, TrainConfig, TrainingInterrupted, fit
from reslab.train.checkpoint import BEST, LATEST, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = [0, 1, 2]
NETS = {  # post-activation with option A shortcuts; pre-activation with B projections
    "post": ("cifar_resnet20", {}),
    "preact": ("cifar_preact_resnet110", {"layers": (1, 1, 1), "shortcut": "B"}),
}


@pytest.fixture(scope="module")
def splits(class_shifted: DataSplits) -> DataSplits:
    return class_shifted


def _config(net: str = "post") -> ResNetConfig:
    name, overrides = NETS[net]
    cfg = get_config(name, num_classes=10, **overrides)
    assert isinstance(cfg, ResNetConfig)
    return cfg


def _cfg(**kw: object) -> TrainConfig:
    """The paper's SGD in a short run: 6 steps of 16 images (an epoch is 8), evaluations at 3
    and 6."""
    base = {"iters": 6, "batch_size": 16, "pad": 1, "eval_every": 3, "warmup": "none",
            "device": "cpu", "tensorboard": False}  # fmt: skip
    return TrainConfig.preset("paper", **{**base, **kw})


def _separate(splits: DataSplits, cfg: TrainConfig, net: str) -> list:
    runs = []
    for seed in SEEDS:
        torch.manual_seed(seed)  # as reslab train --seed S initialises one model
        runs.append(fit(build_model(_config(net)), splits, dataclasses.replace(cfg, seed=seed),
                        verbose=False))  # fmt: skip
    return runs


@pytest.mark.parametrize("net", list(NETS))
def test_packed_fit_equals_separate_fits(splits, net: str, tmp_path: Path) -> None:
    """K = 3 members through ``fit`` against three ``fit`` runs of the same seeds: every step's
    loss, every parameter and BatchNorm statistic (running mean and variance) after 6 steps, and
    the evaluation records' training loss."""
    cfg = _cfg(nesterov=net == "preact", decay_all=net == "post")
    runs = _separate(splits, cfg, net)
    result = fit(build_packed(_config(net), SEEDS), splits, cfg, tmp_path, verbose=False)
    assert len(result.members) == 3
    for member, run in zip(result.members, runs, strict=True):
        torch.testing.assert_close(torch.tensor(member.losses), torch.tensor(run.losses),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        mine, ref = member.model.state_dict(), run.model.state_dict()
        assert mine.keys() == ref.keys()
        for key, t in ref.items():
            torch.testing.assert_close(mine[key], t, rtol=1e-3, atol=1e-3, msg=key)
        assert any("running_var" in key for key in ref)
        assert [r["step"] for r in member.history] == [r["step"] for r in run.history] == [3, 6]
        for a, b in zip(member.history, run.history, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.fixture(scope="module")
def packed_run(splits, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("packed")
    return out, fit(build_packed(_config(), SEEDS), splits, _cfg(), out, verbose=False)


def test_members_are_ordinary_runs(packed_run, splits) -> None:
    """Each seed-S folder is a run folder: its checkpoints load as ordinary models computing
    what the member computes, its config.json has seed S, its summary is the trainer's; the
    parent summary has the members' mean ± std and the member folders."""
    out, result = packed_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["members"] == ["seed-0", "seed-1", "seed-2"] and not summary["failed_members"]
    errors = [1 - json.loads((out / f"seed-{s}" / "summary.json").read_text())["test_accuracy"]
              for s in SEEDS]  # fmt: skip
    assert summary["test_errors"] == pytest.approx(errors)
    mean = sum(errors) / 3
    assert summary["test_error_mean"] == pytest.approx(mean)
    assert summary["test_error_std"] == pytest.approx(
        math.sqrt(sum((e - mean) ** 2 for e in errors) / 2)
    )
    x = torch.randn(4, 3, 8, 8)
    for seed, member in zip(SEEDS, result.members, strict=True):
        folder = out / f"seed-{seed}"
        assert json.loads((folder / "config.json").read_text())["train_config"]["seed"] == seed
        for name in (LATEST, BEST):
            loaded = load_model(folder / name)
            assert isinstance(loaded, type(build_model(_config())))
        loaded = load_model(folder / LATEST)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), member.model.eval()(x))
        ckpt = torch.load(folder / LATEST, weights_only=True)
        assert ckpt["step"] == 6 and len(ckpt["losses"]) == 6
        assert ckpt["optimizer"]["state"][0]["momentum_buffer"].shape == (16, 3, 3, 3)
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [3, 6]
    with pytest.raises(ValueError, match=r"state of a seed-packed run.*seed-0, seed-1, seed-2"):
        load_model(out)


def test_a_member_resumes_alone(packed_run, splits, tmp_path: Path) -> None:
    """``reslab train --resume OUT/seed-S`` continues a member as an ordinary run: from step 6,
    with its optimiser state, to step 9."""
    out, _ = packed_run
    folder = tmp_path / "seed-1"
    folder.mkdir()
    for f in (out / "seed-1").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    model = load_model(folder / LATEST).train()
    result = fit(model, splits, _cfg(iters=9, seed=1), folder, resume=True, verbose=False)
    assert len(result.losses) == 9 and result.history[-1]["step"] == 9
    assert all(math.isfinite(v) for v in result.losses)


def _interrupt_at(k: int):
    def on_step(step: int, model: nn.Module) -> None:
        if step == k:
            signal.raise_signal(signal.SIGTERM)  # the real handler: finish the step, checkpoint

    return on_step


def test_packed_resume_is_bit_identical(splits, tmp_path: Path) -> None:
    """8 steps straight against 4 + (SIGTERM, packed checkpoint, resume) 4, across an epoch
    boundary and an evaluation: every member's losses and weights equal bit for bit."""
    cfg = _cfg(iters=10, eval_every=5)
    straight = fit(build_packed(_config(), SEEDS), splits, cfg, tmp_path / "a", verbose=False)
    with pytest.raises(TrainingInterrupted) as info:
        fit(build_packed(_config(), SEEDS), splits, cfg, tmp_path / "b", verbose=False,
            on_step=_interrupt_at(3))  # fmt: skip
    assert info.value.step == 4 and info.value.checkpoint == tmp_path / "b" / LATEST
    other = build_packed(_config(), [0, 1, 2])  # weights, state: all from the checkpoint
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    resumed = fit(other, splits, cfg, tmp_path / "b", resume=True, verbose=False)
    for a, b in zip(straight.members, resumed.members, strict=True):
        assert a.losses == b.losses
        for (key, t), u in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                               strict=True):  # fmt: skip
            assert torch.equal(t, u), key
        assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert (tmp_path / "b" / "summary.json").read_text() != ""
    with pytest.raises(ValueError, match="not a packed run of seeds \\[0, 1, 3\\]"):
        fit(build_packed(_config(), [0, 1, 3]), splits, cfg, tmp_path / "b", resume=True)


class _PoisonMember:
    """A forward hook on the packed classifier that makes one member's logits NaN at one step."""

    def __init__(self, member: int, step: int, classes: int = 10) -> None:
        self.member, self.step, self.classes, self.seen = member, step, classes, 0

    def __call__(self, module: nn.Module, args: object, out: Tensor) -> Tensor | None:
        if not module.training:
            return None
        self.seen += 1
        if self.seen - 1 != self.step:
            return None
        out = out.clone()
        m, c = self.member, self.classes
        out[:, m * c : (m + 1) * c] = math.nan
        return out


def test_a_non_finite_member_fails_alone(splits, tmp_path: Path) -> None:
    """Member 1's loss is NaN at step 4: it keeps its step-3 checkpoint and gets no summary, the
    parent summary lists it as failed with the step, and members 0 and 2 train on exactly as in
    a run where nothing failed."""
    clean = fit(build_packed(_config(), SEEDS), splits, _cfg(), tmp_path / "clean", verbose=False)
    packed = build_packed(_config(), SEEDS)
    packed.body.fc.register_forward_hook(_PoisonMember(1, 4))
    result = fit(packed, splits, _cfg(), tmp_path / "run", verbose=False)
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["members"] == ["seed-0", "seed-2"]
    assert list(summary["failed_members"]) == ["seed-1"]
    assert "non-finite training loss (nan) at step 4" in summary["failed_members"]["seed-1"]
    assert not (out / "seed-1" / "summary.json").exists()
    ckpt = torch.load(out / "seed-1" / LATEST, weights_only=True)
    assert ckpt["step"] == 3  # the last good one
    assert result.members[1].losses == clean.members[1].losses[:4]
    for m in (0, 2):
        assert result.members[m].losses == clean.members[m].losses
        for key, t in clean.members[m].model.state_dict().items():
            assert torch.equal(result.members[m].model.state_dict()[key], t), (m, key)


def test_every_member_failing_stops_the_run(splits, tmp_path: Path) -> None:
    packed = build_packed(_config(), [0, 1])
    for m in (0, 1):
        packed.body.fc.register_forward_hook(_PoisonMember(m, 1))
    with pytest.raises(NonFiniteLossError, match=r"every member failed: seed 0: .*step 1"):
        fit(packed, splits, _cfg(), tmp_path, verbose=False)


def test_packing_refuses_what_it_cannot_do(splits, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"runs in one process.*--sync-bn"):
        fit(build_packed(_config(), SEEDS), splits, _cfg(sync_bn=True), tmp_path)
    with pytest.raises(ValueError, match=r"optimiser groups"):
        fit(build_packed(_config(), SEEDS), splits, _cfg(), tmp_path, param_groups=[])
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_trains_and_resumes_seeds(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", "cifar_resnet20", "--seeds", "3", "5", "--iters", "4", "--eval-every", "2",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "seeds 3 5 packed" in printed and "over 2 member(s)" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["seeds"] == [3, 5] and config["members"] == ["seed-3", "seed-5"]
    assert json.loads((out / "seed-5" / "config.json").read_text())["train_config"]["seed"] == 5
    assert main(["train", "--resume", str(out), "--iters", "6"]) == 0
    ckpt = torch.load(out / "seed-3" / LATEST, weights_only=True)
    assert ckpt["step"] == 6
    assert main(["eval", str(out / "seed-3"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 6
    for bad, message in (
        (["--seed", "1", "--seeds", "0", "1"], "--seed and --seeds exclude each other"),
        (["--seeds", "0", "0"], "more than once"),
        (["dense_resnet10", "--seeds", "0", "1"], "packs convolutional ResNets"),
    ):
        assert main(["train", *bad, "--iters", "1", "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert isinstance(build_packed(_config(), [0]), PackedNet)
