"""The trainer's parts on their own: run state, training batches, the step, evaluation, formats."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from reslab import create_model
from reslab.cli import main
from reslab.data import DataSplits, Split
from reslab.data.feed import InMemoryBatches, TrainingBatches
from reslab.data.training import MemoryData
from reslab.train import RunState, TrainConfig, evaluate
from reslab.train.captured import TrainStep, lr_table
from reslab.train.checkpoint import FORMAT_VERSION, load_checkpoint, model_record, save_checkpoint
from reslab.train.distributed import DistInfo
from reslab.train.evaluation import evaluate_point, format_record, summarize
from reslab.train.members import MemberState
from reslab.train.schedule import learning_rate
from reslab.train.setup import Placement, place, prepare_model
from reslab.train.step import build_optimizer

CPU = Placement(torch.device("cpu"), DistInfo())


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.preset("digits", **{"iters": 30, "eval_every": 10, "device": "cpu", **kw})


def _state(splits: DataSplits, cfg: TrainConfig, *, init_seed: int = 0):
    """A run at step 0 built from the parts, as ``fit`` builds it."""
    assert place(cfg) == CPU  # and one thread, as the digits recipe asks
    torch.manual_seed(init_seed)
    model = create_model("cifar_resnet20", in_channels=1, num_classes=10)
    data = MemoryData(splits)
    norm = prepare_model(model, cfg, CPU, data.input.with_normalization(data.normalization(
        cfg.normalize)))  # fmt: skip
    batches = data.train_batches(
        cfg.batch_size, seed=cfg.seed, device=CPU.device, pad=cfg.pad, flip=cfg.flip
    )
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return RunState(model, optimizer, scaler, batches), norm


def _train(state: RunState, norm, cfg: TrainConfig, steps: int) -> list[float]:
    """``steps`` of the trainer's step from where ``state`` is, then its numbers back in it."""
    total = 100
    members = MemberState.create(1, warmup=state.warming)
    members.set_warmup_record(0, state.step, warming=state.warming,
                              recent_errors=state.recent_errors)  # fmt: skip
    step = TrainStep(
        state.model, state.optimizer, members=1,
        rates=lr_table(lambda s: learning_rate(s, total, cfg), total), state=members,
        norm=norm, capacity=steps, warmup_lr=cfg.warmup_lr, warmup_error=cfg.warmup_error,
        label_smoothing=cfg.label_smoothing, step=state.step,
    )  # fmt: skip
    stream = iter(())
    for _ in range(steps):
        images_labels = next(stream, None)
        if images_labels is None:  # the end of an epoch: the next one from the position on
            stream = iter(state.batches)
            images_labels = next(stream)
        step(*images_labels)
    state.absorb(step.read(), 0.0)
    state.step += steps
    state.warming, state.recent_errors = members.warmup_record(0, state.step)
    return state.losses


def _through_a_file(state_dict: dict) -> dict:
    """What a checkpoint file gives back (plain data, read with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_run_state_round_trip_continues_identically(digits) -> None:
    """state_dict at step 17 (mid-epoch: 20 steps each), load_state_dict into a run built from
    another initialisation: the next 8 steps (across the epoch boundary) are the same, bit for
    bit, and the state reads back equal."""
    cfg = _cfg()
    a, norm = _state(digits, cfg)
    assert isinstance(a.batches, TrainingBatches)
    _train(a, norm, cfg, 17)
    saved = _through_a_file(a.state_dict())
    straight = _train(a, norm, cfg, 8)[17:]

    b, norm_b = _state(digits, cfg, init_seed=1)
    b.load_state_dict(saved)
    again = _through_a_file(b.state_dict())
    for key, value in saved.items():
        if key not in ("model", "optimizer", "rng", "batches"):
            assert (
                again[key] == value
                if not torch.is_tensor(value)
                else torch.equal(again[key], value)
            )
    assert (
        again["batches"]
        == saved["batches"]
        == {"epoch": 0, "batch": 17, "seed": 0, "num_samples": 1295, "world_size": 1}
    )
    assert all(torch.equal(again["model"][k], v) for k, v in saved["model"].items())
    resumed = _train(b, norm_b, cfg, 8)[17:]
    assert resumed == straight
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_state_without_the_data_position_diverges(digits) -> None:
    """The round trip above is not exact by accident: a wrong position changes the steps."""
    cfg = _cfg()
    a, norm = _state(digits, cfg)
    _train(a, norm, cfg, 5)
    saved = _through_a_file(a.state_dict())
    straight = _train(a, norm, cfg, 3)[5:]
    saved["batches"]["batch"] = 9
    b, norm_b = _state(digits, cfg)
    b.load_state_dict(saved)
    assert _train(b, norm_b, cfg, 3)[5:] != straight


def _epochs(batches: TrainingBatches, epochs: int):
    """The batches of ``epochs`` epochs in a row."""
    for _ in range(epochs):
        yield from batches


def _small(digits, n: int) -> DataSplits:
    return dataclasses.replace(
        digits, train=Split(digits.train.images[:n], digits.train.labels[:n])
    )


def test_batches_shard_the_real_batch_evenly_over_ranks(digits) -> None:
    """Every rank's share is equal and the shares together are the one-process batch (images,
    augmentation and labels), for full batches and for a data set smaller than one batch (40
    images, batch 64: 2 x 20), across epochs."""
    for n, batch, sizes in ((40, 64, [20, 20]), (200, 64, [32, 32])):
        data = MemoryData(_small(digits, n))

        def source(rank: int, world: int, data=data, batch=batch) -> TrainingBatches:
            return data.train_batches(batch, seed=3, device=CPU.device, pad=1, flip=True,
                                      rank=rank, world_size=world)  # fmt: skip

        one, ranks = source(0, 1), [source(r, 2) for r in (0, 1)]
        assert len(one) == len(ranks[0]) == len(ranks[1]) == max(1, n // batch)
        streams = [_epochs(b, 5) for b in ranks]
        whole = _epochs(one, 5)
        for _ in range(5):  # across epochs (3 steps each for 200 images)
            x, y = next(whole)
            shares = [next(s) for s in streams]
            assert [len(s[1]) for s in shares] == sizes
            # the ranks take strided shares of the global batch: compare (image, label) pairs
            pairs = [(bytes(a.flatten().numpy()), int(b)) for a, b in zip(x, y, strict=True)]
            assert sorted(pairs) == sorted(
                (bytes(a.flatten().numpy()), int(b))
                for xs, ys in shares
                for a, b in zip(xs, ys, strict=True)
            )
    with pytest.raises(ValueError, match=r"41 training images.*evenly over 2 ranks"):
        MemoryData(_small(digits, 41)).train_batches(64, seed=0, device=CPU.device, world_size=2)


def test_batches_refuse_a_position_of_other_data(digits) -> None:
    src = InMemoryBatches(digits.train.images, digits.train.labels, batch_size=64)
    with pytest.raises(ValueError, match="num_samples=40, this loader 1295"):
        src.load_state_dict({"epoch": 0, "batch": 3, "num_samples": 40})


# -- evaluation --
def test_evaluation_point_and_summary(digits) -> None:
    cfg = _cfg(eval_flip=True)
    state, norm = _state(digits, cfg)
    _train(state, norm, cfg, 3)
    model = state.model
    record = state.close_window(lr=0.1, steps_per_epoch=20)
    assert record["step"] == 3 and record["epoch"] == 3 / 20
    assert record["loss"] == pytest.approx(sum(state.losses) / 3)
    evaluate_point(model, MemoryData(digits), cfg, CPU.device, record)
    assert record["val_error"] == evaluate(model, digits.val)["error"]  # single view
    assert record["test_error"] == evaluate(model, digits.test)["error"]
    no_test = {}
    no_eval_test = dataclasses.replace(cfg, eval_test=False)
    evaluate_point(model, MemoryData(digits), no_eval_test, CPU.device, no_test)
    assert no_test["test_error"] is None
    line = format_record(record, 30)
    assert line.startswith("step 3/30") and f"val err {100 * record['val_error']:.2f}%" in line

    assert state.improves(record["val_error"]) and not state.improves(record["val_error"])
    state.train_seconds, state.images = 2.0, 192
    s = summarize(model, MemoryData(digits), cfg, CPU.device, state, total=30, steps_per_epoch=20)
    flipped = evaluate(model, digits.test, flip=True)
    assert s["test_accuracy"] == flipped["accuracy"]
    assert s["test_accuracy_single_view"] == flipped["single_view_accuracy"]
    assert s["val_accuracy"] == evaluate(model, digits.val, flip=True)["accuracy"]
    assert s["best_val_accuracy"] == 1.0 - record["val_error"]
    assert (s["images_per_second"], s["steps"], s["epochs"]) == (96.0, 30, 1.5)
    assert s["final_train_loss"] == state.losses[-1]
    empty = dataclasses.replace(digits, val=Split(digits.val.images[:0], digits.val.labels[:0]))
    s = summarize(model, MemoryData(empty), cfg, CPU.device, state, total=30, steps_per_epoch=20)
    assert s["val_accuracy"] is None
    assert math.isnan(evaluate(model, empty.val)["accuracy"])


# -- checkpoint format --
def test_checkpoints_carry_a_format_version_and_refuse_newer_ones(tmp_path, capsys) -> None:
    model = create_model("cifar_resnet20", in_channels=1, num_classes=10)
    path = tmp_path / "checkpoint_best.pt"
    save_checkpoint(model_record(model), path)
    assert torch.load(path, weights_only=True)["format_version"] == FORMAT_VERSION
    assert load_checkpoint(path)["format_version"] == FORMAT_VERSION
    for version in (FORMAT_VERSION + 1, "2"):
        save_checkpoint({**model_record(model), "format_version": version}, path)
        with pytest.raises(ValueError, match=r"checkpoint format version .*reads versions 1 to"):
            load_checkpoint(path)
    assert main(["eval", str(path), "--data", "digits"]) == 2  # a clear CLI error
    assert "newer reslab" in capsys.readouterr().err


def test_checkpoints_from_before_the_format_version_still_load(tmp_path) -> None:
    """Version 1 (no field): the data order at the top level, as the trainer wrote it before."""
    model = create_model("cifar_resnet20", in_channels=1, num_classes=10)
    record = model_record(model)
    del record["format_version"]
    perm = torch.randperm(10)
    save_checkpoint({**record, "perm": perm, "step": 3}, tmp_path / "v1.pt")
    ckpt = load_checkpoint(tmp_path / "v1.pt")
    assert "perm" not in ckpt and torch.equal(ckpt["batches"]["perm"], perm)
    assert ckpt["format_version"] == FORMAT_VERSION
