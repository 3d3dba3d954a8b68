"""``fit``: the training loop, with exact resume, fault handling and DDP.

The loop itself is short; its parts live beside it: set-up (:mod:`reslab.train.setup`), the data
(:class:`reslab.data.training.TrainingData` and its training batches), one optimiser step
(:mod:`reslab.train.step`), the run state (:mod:`reslab.train.state`), evaluation
(:mod:`reslab.train.evaluation`) and the run folder (:mod:`reslab.train.outputs`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab._progress import progress_bar, wants_progress, write_line
from reslab.data import DataSplits, InputConfig, Normalize
from reslab.data.feed import TrainingBatches, endless
from reslab.data.training import TrainingData, as_training_data
from reslab.record import run_record
from reslab.train.checkpoint import model_config, model_record
from reslab.train.config import TrainConfig
from reslab.train.evaluation import evaluate_point, format_record, summarize
from reslab.train.outputs import RunFolder
from reslab.train.schedule import learning_rate, train_size, wants_warmup
from reslab.train.setup import (
    Placement,
    place,
    prepare_model,
    refuse_occupied,
    resume_checkpoint,
    wrap_model,
)
from reslab.train.state import RunState
from reslab.train.step import (
    NonFiniteLossError,
    StepOptions,
    build_optimizer,
    model_inputs,
    non_finite_weights,
    set_learning_rate,
    train_step,
)

__all__ = ["FitResult", "TrainingInterrupted", "fit"]


class TrainingInterrupted(Exception):
    """SIGTERM or Ctrl-C: the latest checkpoint was written and the run stopped."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        where = f"; resume from {checkpoint.parent}" if checkpoint else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}{where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]  # one record per evaluation point
    summary: dict[str, Any]
    losses: list[float] = field(default_factory=list)  # training loss of every optimiser step


def fit(
    model: nn.Module,
    data: DataSplits | TrainingData,
    cfg: TrainConfig,
    out_dir: Path | None = None,
    *,
    param_groups: list[dict] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    resume: bool = False,
    run_info: dict[str, Any] | None = None,
    verbose: bool | None = None,
    progress: bool | None = None,
    normalization: Normalize | None = None,
) -> FitResult:
    """Train ``model`` on ``data``'s training split with ``cfg``; evaluate on val (and test, for
    the curves).

    ``data``: :class:`~reslab.data.DataSplits` in memory, or any
    :class:`~reslab.data.training.TrainingData` (:func:`reslab.data.training.open_data`: image
    folders, zips, lists and shards, in memory or streamed). The model is normalised by
    ``normalization`` (a pretrained network's statistics) or else by the training images'
    (``cfg.normalize``); it carries the result with the data's input config
    (``model.input_config``), which every checkpoint stores.

    With ``out_dir`` the run folder gets config.json, metrics.jsonl, checkpoints (latest and best
    on validation), TensorBoard events, summary.json and curves.png; ``resume=True`` continues
    from ``out_dir/checkpoint_latest.pt`` bit-exactly. ``on_step(step, model)`` runs at the start
    of every step, before the forward pass. ``verbose`` prints a line per evaluation; ``progress``
    draws bars for the steps and evaluations (default: with ``verbose``, on a terminal). Under
    torchrun every rank calls ``fit``; rank 0 evaluates and writes.
    """
    data = as_training_data(data)
    out_dir = Path(out_dir) if out_dir is not None else None
    verbose = out_dir is not None if verbose is None else verbose
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    where = place(cfg)
    main = where.dist.is_main
    show = main and wants_progress(False if progress is None and not verbose else progress)
    batches = _training_batches(data, cfg, where)
    spe = len(batches)
    total = cfg.run_steps(spe)
    saved = resume_checkpoint(out_dir, cfg, total) if resume and out_dir is not None else None
    input_cfg = _input_config(data, cfg, normalization, saved)
    norm = prepare_model(model, cfg, where, input_cfg)
    state = _new_state(model, batches, cfg, where, param_groups)
    eval_every = cfg.eval_every or spe
    torch.manual_seed(cfg.seed)  # global RNG: anything stochastic inside the model
    if saved is not None:
        state.load_state_dict(saved)
    elif out_dir is not None:
        refuse_occupied(out_dir)
    folder = RunFolder(out_dir, cfg, data.classes) if out_dir is not None and main else None
    if folder is not None:
        folder.start(_config(model, data, cfg, where, run_info), state)
    if verbose and main and cfg.resolutions:
        sizes = [train_size(round(f * total), total, cfg, data.image_size) or data.image_size
                 for f, _ in cfg.resolutions]  # fmt: skip
        write_line("progressive resizing, relative to the data's "
                   f"{data.image_size[0]}x{data.image_size[1]}: "
                   + ", ".join(f"{h}x{w}" for h, w in sizes))  # fmt: skip
    train_model = wrap_model(model, cfg, where)
    options = StepOptions.of(cfg, where.dist.world_size)
    bar = progress_bar(total=total, initial=state.step, desc="train", unit="step", enabled=show)
    model.train()

    closing = contextlib.closing(folder) if folder else contextlib.nullcontext()
    stream = endless(state.batches)  # from the position the state was taken at
    with closing, _catch_signals() as caught, bar:
        while state.step < total:
            t0 = time.perf_counter()
            images, labels = next(stream)
            size = train_size(state.step, total, cfg, data.image_size)
            x = model_inputs(images, norm, side=size, channels_last=cfg.channels_last)
            if on_step is not None:
                on_step(state.step, model)
            lr = learning_rate(state.step, total, cfg, warming_up=state.warming)
            set_learning_rate(state.optimizer, lr)
            try:
                stats = train_step(
                    train_model, state.optimizer, state.scaler, x, labels,
                    options=options, stop=bool(caught),
                )  # fmt: skip
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"{exc} at step {state.step} (lr {lr:g}); stopped before the optimiser step"
                    f"{folder.last_good() if folder else ''}"
                ) from None
            state.record_step(stats, time.perf_counter() - t0, warmup_error=cfg.warmup_error)
            bar.set_postfix(loss=f"{stats.loss:.3f}", err=f"{100 * stats.error:.1f}%",
                            lr=f"{lr:.3g}", refresh=False)  # fmt: skip
            bar.update()

            if state.step % eval_every == 0 or state.step == total:
                record = _evaluation_point(state, data, cfg, where, folder, lr=lr, show=show)
                if verbose and main:
                    write_line(format_record(record, total))
            if stats.stop and state.step < total:  # a signal during the last step: just finish
                latest = folder.save(state) if folder else None
                signum = caught[0] if caught else signal.SIGTERM
                raise TrainingInterrupted(signum, state.step, latest)

    summary = {}
    for bad in getattr(state.batches, "skipped", []):  # streamed images skip_bad left out
        if bad not in data.skipped:
            data.skipped.append(bad)
    if main:
        summary = summarize(model, data, cfg, where.device, state, total=total,
                            steps_per_epoch=spe, progress=show)  # fmt: skip
    if folder is not None:
        folder.finish(summary, state.history, title=_title(model, data, cfg, run_info))
    return FitResult(model, state.history, summary, state.losses)


def _training_batches(data: TrainingData, cfg: TrainConfig, where: Placement) -> TrainingBatches:
    """This rank's training batches, augmented as ``cfg`` says, seeded by ``cfg.seed``."""
    return data.train_batches(
        cfg.batch_size,
        seed=cfg.seed,
        device=where.device,
        augment=cfg.augmentation if cfg.augment else "none",
        pad=cfg.pad,
        flip=cfg.flip,
        rank=where.dist.rank,
        world_size=where.dist.world_size,
    )


def _input_config(
    data: TrainingData,
    cfg: TrainConfig,
    normalization: Normalize | None,
    saved: dict[str, Any] | None,
) -> InputConfig:
    """The input the model takes: a resumed run's own (its normalisation as first computed),
    else the data's with ``normalization`` or the training images' statistics."""
    if saved is not None and saved.get("input_config") is not None:
        return InputConfig.from_dict(saved["input_config"])
    return data.input.with_normalization(normalization or data.normalization(cfg.normalize))


def _new_state(
    model: nn.Module,
    batches: TrainingBatches,
    cfg: TrainConfig,
    where: Placement,
    param_groups: list[dict] | None,
) -> RunState:
    """A run at step 0: the optimiser, the gradient scaler (fp16 only) and the data source."""
    return RunState(
        model,
        build_optimizer(model, cfg, param_groups),
        torch.amp.GradScaler(where.device.type, enabled=cfg.precision == "fp16"),
        batches,
        warming=wants_warmup(cfg, getattr(model_config(model), "depth", None)),
    )


def _evaluation_point(
    state: RunState,
    data: TrainingData,
    cfg: TrainConfig,
    where: Placement,
    folder: RunFolder | None,
    *,
    lr: float,
    show: bool,
) -> dict[str, Any]:
    """Close the training window, evaluate (rank 0), log and checkpoint; returns the record."""
    # a finite loss can still have non-finite gradients; the next loss would catch the broken
    # weights, but this step's checkpoint must not keep them as "good"
    bad = non_finite_weights(state.model)
    if bad:
        raise NonFiniteLossError(
            f"non-finite weights after step {state.step} ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): the loss was finite but not its gradients; "
            f"stopped before checkpointing them{folder.last_good() if folder else ''}"
        )
    record = state.close_window(lr=lr, steps_per_epoch=len(state.batches))
    if where.dist.is_main:
        evaluate_point(state.model, data, cfg, where.device, record, progress=show)
        state.history.append(record)
    improved = state.improves(record.get("val_error"))  # before the latest checkpoint knows it
    if folder is not None:
        folder.log(record)
        folder.save(state, best=improved)
    return record


def _config(
    model: nn.Module,
    data: TrainingData,
    cfg: TrainConfig,
    where: Placement,
    run_info: dict[str, Any] | None,
) -> dict[str, Any]:
    """config.json: the recipe, the model, the data (how it is fed, the input the model takes,
    where val/test came from), where it ran, and the caller's ``run_info``."""
    input_cfg: InputConfig = model.input_config  # type: ignore[assignment]  # prepare_model's
    augment = data.augmentation(cfg.augmentation) if cfg.augment else "none"
    return {
        "train_config": cfg.to_dict(),
        "model_config": model_config(model).to_dict(),
        "model_kind": model_record(model)["model_kind"],
        "data": {**data.record(), "input": input_cfg.describe(), "augmentation": augment},
        "world_size": where.dist.world_size,
        **run_record(where.device),
        **(run_info or {}),
    }


def _title(
    model: nn.Module, data: TrainingData, cfg: TrainConfig, run_info: dict[str, Any] | None
) -> str:
    """curves.png's title: the model (its registered name if the caller gave it), data, recipe."""
    name = (run_info or {}).get("model_name")
    if not name:
        depth = getattr(model_config(model), "depth", None)
        name = type(model).__name__ + (f"-{depth}" if depth else "")
    return f"{name} on {data.name}, {cfg.recipe} recipe"


@contextlib.contextmanager
def _catch_signals() -> Iterator[list[int]]:
    """Turn SIGTERM/SIGINT into a flag the loop checks after each step (main thread only)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: object) -> None:
        caught.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)
