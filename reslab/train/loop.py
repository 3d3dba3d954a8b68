"""``fit``: the training loop, with exact resume, fault handling and DDP.

The loop itself is short; its parts live beside it: set-up (:mod:`reslab.train.setup`), the data
(:mod:`reslab.train.batches`), one optimiser step (:mod:`reslab.train.step`), the run state
(:mod:`reslab.train.state`), evaluation (:mod:`reslab.train.evaluation`) and the run folder
(:mod:`reslab.train.outputs`).
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
from reslab.data import DataSplits
from reslab.record import run_record
from reslab.train.batches import InMemoryBatches
from reslab.train.checkpoint import model_config, model_record
from reslab.train.config import TrainConfig
from reslab.train.evaluation import evaluate_point, format_record, summarize
from reslab.train.outputs import RunFolder
from reslab.train.schedule import learning_rate, train_resolution, wants_warmup
from reslab.train.setup import (
    Placement,
    data_identity,
    own_run_folder,
    place,
    prepare_model,
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
    splits: DataSplits,
    cfg: TrainConfig,
    out_dir: Path | None = None,
    *,
    param_groups: list[dict] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    resume: bool = False,
    allow_nonempty: bool = False,
    run_info: dict[str, Any] | None = None,
    verbose: bool | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Train ``model`` on ``splits.train`` with ``cfg``; evaluate on val (and test, for the curves).

    With ``out_dir`` the run folder gets config.json, metrics.jsonl, checkpoints (latest and best
    on validation), TensorBoard events, summary.json and curves.png; ``resume=True`` continues
    from ``out_dir/checkpoint_latest.pt`` bit-exactly, after checking the model, optimiser groups,
    data and config against it. The folder is this process's while it runs (another ``fit`` there
    raises :class:`reslab._io.FolderLockedError`); a fresh run refuses a folder with files it
    would replace, and one with other files unless ``allow_nonempty``
    (:func:`~reslab.train.setup.refuse_occupied`). ``on_step(step, model)`` runs at the start
    of every step, before the forward pass. ``verbose`` prints a line per evaluation; ``progress``
    draws bars for the steps and evaluations (default: with ``verbose``, on a terminal). Under
    torchrun every rank calls ``fit``; rank 0 evaluates and writes.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    verbose = out_dir is not None if verbose is None else verbose
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    where = place(cfg)
    main = where.dist.is_main
    show = main and wants_progress(False if progress is None and not verbose else progress)
    norm = prepare_model(model, cfg, where, splits.train.images)
    state = _new_state(model, splits, cfg, where, param_groups)
    spe, total = state.batches.steps_per_epoch, cfg.total_steps(len(splits.train))
    eval_every = cfg.eval_every or spe
    torch.manual_seed(cfg.seed)  # global RNG: anything stochastic inside the model
    data = data_identity(splits)
    lock = None
    if out_dir is not None:  # this process's folder, and may a fresh run start in it
        lock = own_run_folder(out_dir, where, resume=resume, allow_nonempty=allow_nonempty)
    try:  # everything checked before the first write, and the folder let go if a check fails
        if resume:
            assert out_dir is not None
            ckpt = resume_checkpoint(out_dir, cfg, total, model=model, optimizer=state.optimizer,
                                     data=data)  # fmt: skip
            state.load_state_dict(ckpt)
        folder = None
        if out_dir is not None and main:
            folder = RunFolder(out_dir, cfg, splits.classes, lock=lock, data=data)
            folder.start(_config(model, data, cfg, where, run_info), state)
        train_model = wrap_model(model, cfg, where)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    options = StepOptions.of(cfg, where.dist.world_size)
    bar = progress_bar(total=total, initial=state.step, desc="train", unit="step", enabled=show)
    model.train()

    closing = contextlib.closing(folder) if folder else contextlib.nullcontext()
    with closing, _catch_signals() as caught, bar:
        while state.step < total:
            t0 = time.perf_counter()
            images, labels = state.batches.batch(state.step)
            side = train_resolution(state.step, total, cfg)
            x = model_inputs(images, norm, side=side, channels_last=cfg.channels_last)
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
                record = _evaluation_point(state, splits, cfg, where, folder, lr=lr, show=show)
                if verbose and main:
                    write_line(format_record(record, total))
            if stats.stop and state.step < total:  # a signal during the last step: just finish
                latest = folder.save(state) if folder else None
                signum = caught[0] if caught else signal.SIGTERM
                raise TrainingInterrupted(signum, state.step, latest)
        bar.close()
        # still under the signal handlers: a SIGTERM or Ctrl-C now lets the summary be written
        # (the final checkpoint is saved already; a resume of it would only write the summary)
        summary = {}
        if main:
            summary = summarize(model, splits, cfg, where.device, state, total=total,
                                steps_per_epoch=spe, progress=show)  # fmt: skip
        if folder is not None:
            folder.finish(summary, state.history, title=_title(model, splits, cfg, run_info))
    return FitResult(model, state.history, summary, state.losses)


def _new_state(
    model: nn.Module,
    splits: DataSplits,
    cfg: TrainConfig,
    where: Placement,
    param_groups: list[dict] | None,
) -> RunState:
    """A run at step 0: the optimiser, the gradient scaler (fp16 only), the data source and the
    generator of data order and augmentation (seeded by ``cfg.seed``)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = InMemoryBatches(
        splits.train,
        batch_size=cfg.batch_size,
        generator=generator,
        device=where.device,
        augment=cfg.augment,
        pad=cfg.pad,
        flip=cfg.flip,
        rank=where.dist.rank,
        world_size=where.dist.world_size,
    )
    return RunState(
        model,
        build_optimizer(model, cfg, param_groups),
        torch.amp.GradScaler(where.device.type, enabled=cfg.precision == "fp16"),
        batches,
        generator,
        warming=wants_warmup(cfg, getattr(model_config(model), "depth", None)),
    )


def _evaluation_point(
    state: RunState,
    splits: DataSplits,
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
    record = state.close_window(lr=lr, steps_per_epoch=state.batches.steps_per_epoch)
    if where.dist.is_main:
        evaluate_point(state.model, splits, cfg, where.device, record, progress=show)
        state.history.append(record)
    improved = state.improves(record.get("val_error"))  # before the latest checkpoint knows it
    if folder is not None:
        folder.log(record)
        folder.save(state, best=improved)
    return record


def _config(
    model: nn.Module,
    data: dict[str, Any],
    cfg: TrainConfig,
    where: Placement,
    run_info: dict[str, Any] | None,
) -> dict[str, Any]:
    """config.json: the recipe, the model, the data (:func:`~reslab.train.setup.data_identity`),
    where it ran, and the caller's ``run_info``."""
    return {
        "train_config": cfg.to_dict(),
        "model_config": model_config(model).to_dict(),
        "model_kind": model_record(model)["model_kind"],
        "data": data,
        "world_size": where.dist.world_size,
        **run_record(where.device),
        **(run_info or {}),
    }


def _title(
    model: nn.Module, splits: DataSplits, cfg: TrainConfig, run_info: dict[str, Any] | None
) -> str:
    """curves.png's title: the model (its registered name if the caller gave it), data, recipe."""
    name = (run_info or {}).get("model_name")
    if not name:
        depth = getattr(model_config(model), "depth", None)
        name = type(model).__name__ + (f"-{depth}" if depth else "")
    return f"{name} on {splits.name}, {cfg.recipe} recipe"


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
