"""What :func:`reslab.train.fit`'s loop trains: a :class:`Run`, ordinary or seed-packed.

The loop (:mod:`reslab.train.loop`) asks a run for the next batch, hands it to the run's
:class:`~reslab.train.captured.TrainStep`, and at its read points gives the run what the device
recorded (:meth:`Run.absorb`), asks it to evaluate and checkpoint (:meth:`Run.evaluation_point`)
or to save on a signal (:meth:`Run.save`), and finally to summarise (:meth:`Run.finish`).
:class:`SingleRun` is one network in one run folder; :class:`reslab.train.packed_run.PackedRun`
is K seeds of one network trained as one packed network, written as K run folders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.data import InputConfig, Normalize
from reslab.data.feed import TrainingBatches, endless
from reslab.data.training import TrainingData
from reslab.record import run_record
from reslab.train.captured import StepReport, TrainStep, lr_table
from reslab.train.checkpoint import model_config, model_record
from reslab.train.config import GRAPH_COMPILE_MODES, TrainConfig
from reslab.train.evaluation import evaluate_point, format_record, summarize
from reslab.train.members import MemberState
from reslab.train.outputs import RunFolder
from reslab.train.schedule import learning_rate, wants_warmup
from reslab.train.setup import (
    Placement,
    check_optimizer,
    data_identity,
    own_run_folder,
    prepare_model,
    resume_checkpoint,
    wrap_model,
)
from reslab.train.state import RunState
from reslab.train.step import NonFiniteLossError, build_optimizer, non_finite_weights

__all__ = [
    "FitResult",
    "Run",
    "SingleRun",
    "input_config",
    "run_config",
    "run_title",
    "training_batches",
]


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]  # one record per evaluation point
    summary: dict[str, Any]
    losses: list[float] = field(default_factory=list)  # training loss of every optimiser step
    members: list[FitResult] = field(default_factory=list)  # a packed run's members, in order


class Run(ABC):
    """One run as the loop sees it. ``step`` counts the optimiser steps done (the loop advances
    it), ``total`` is the run's length, ``stepper`` the training step, ``model`` the network that
    ``on_step`` callbacks receive."""

    model: nn.Module
    stepper: TrainStep
    cfg: TrainConfig
    data: TrainingData
    where: Placement
    step: int
    total: int
    steps_per_epoch: int

    @abstractmethod
    def batch(self) -> tuple[Tensor, Tensor]:
        """The next training batch: uint8 images and labels on the device."""

    @abstractmethod
    def absorb(self, report: StepReport, seconds: float) -> dict[str, str]:
        """Take the steps the device recorded since the last read (and the ``seconds`` they
        took); raise :class:`~reslab.train.step.NonFiniteLossError` if the run cannot go on.
        Returns the progress bar's numbers."""

    @abstractmethod
    def evaluation_point(self, *, show: bool) -> str:
        """Evaluate, log and checkpoint at this step; returns the line to print."""

    @abstractmethod
    def save(self) -> Path | None:
        """Checkpoint now (a signal stops the run); the latest checkpoint's path (rank 0)."""

    @abstractmethod
    def finish(self, *, show: bool) -> FitResult:
        """Summarise the finished run and write its summaries."""

    @abstractmethod
    def close(self) -> None:
        """Let go of what the run holds open (TensorBoard writers)."""


# -- set-up shared by both kinds of run ----------------------------------------------------------
def training_batches(
    data: TrainingData, cfg: TrainConfig, where: Placement, *, seed: int
) -> TrainingBatches:
    """This rank's training batches, augmented as ``cfg`` says, seeded by ``seed``."""
    return data.train_batches(
        cfg.batch_size,
        seed=seed,
        device=where.device,
        augment=cfg.augmentation if cfg.augment else "none",
        pad=cfg.pad,
        flip=cfg.flip,
        rank=where.dist.rank,
        world_size=where.dist.world_size,
    )


def input_config(
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


def make_step(
    train_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    where: Placement,
    *,
    members: MemberState,
    norm: Normalize,
    total: int,
    capacity: int,
    step: int,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainStep:
    """The run's :class:`TrainStep`, with ``cfg``'s schedule, warm-up and numerics."""
    rates = lr_table(lambda s: learning_rate(s, total, cfg), total, where.device)
    return TrainStep(
        train_model,
        optimizer,
        members=members.members,
        rates=rates,
        state=members,
        norm=norm,
        capacity=capacity,
        warmup_lr=cfg.warmup_lr,
        warmup_error=cfg.warmup_error,
        label_smoothing=cfg.label_smoothing,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
        scaler=scaler,
        world_size=where.dist.world_size,
        graphs=cfg.cuda_graphs,
        mark_step=cfg.compile and cfg.compile_mode in GRAPH_COMPILE_MODES,
        step=step,
    )


def run_config(
    model: nn.Module,
    data: TrainingData,
    cfg: TrainConfig,
    where: Placement,
    run_info: dict[str, Any] | None,
    *,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json: the recipe, the model, the data (how it is fed, the input the model takes,
    where val/test came from, and its ``identity``: :func:`~reslab.train.setup.data_identity`),
    where it ran, and the caller's ``run_info``."""
    input_cfg: InputConfig = model.input_config  # type: ignore[assignment]  # prepare_model's
    augment = data.augmentation(cfg.augmentation) if cfg.augment else "none"
    record = {**data.record(), **(identity or data_identity(data))}
    return {
        "train_config": cfg.to_dict(),
        "model_config": model_config(model).to_dict(),
        "model_kind": model_record(model)["model_kind"],
        "data": {**record, "input": input_cfg.describe(), "augmentation": augment},
        "world_size": where.dist.world_size,
        **run_record(where.device),
        **(run_info or {}),
    }


def run_title(
    model: nn.Module, data: TrainingData, cfg: TrainConfig, run_info: dict[str, Any] | None
) -> str:
    """curves.png's title: the model (its registered name if the caller gave it), data, recipe."""
    name = (run_info or {}).get("model_name")
    if not name:
        depth = getattr(model_config(model), "depth", None)
        name = type(model).__name__ + (f"-{depth}" if depth else "")
    return f"{name} on {data.name}, {cfg.recipe} recipe"


def postfix(loss: float, error: float, lr: float) -> dict[str, str]:
    return {"loss": f"{loss:.3f}", "err": f"{100 * error:.1f}%", "lr": f"{lr:.3g}"}


# -- one network ---------------------------------------------------------------------------------
class SingleRun(Run):
    """One network trained into one run folder (or none)."""

    def __init__(
        self,
        model: nn.Module,
        data: TrainingData,
        cfg: TrainConfig,
        where: Placement,
        out_dir: Path | None,
        *,
        resume: bool,
        param_groups: list[dict] | None = None,
        run_info: dict[str, Any] | None = None,
        normalization: Normalize | None = None,
        allow_nonempty: bool = False,
    ) -> None:
        self.model, self.data, self.cfg, self.where = model, data, cfg, where
        self.run_info = run_info
        batches = training_batches(data, cfg, where, seed=cfg.seed)
        self.steps_per_epoch = len(batches)
        self.total = cfg.run_steps(self.steps_per_epoch)
        self.folder = None
        identity = data_identity(data)
        lock = None
        if out_dir is not None:  # this process's folder, and may a fresh run start in it
            lock = own_run_folder(out_dir, where, resume=resume, allow_nonempty=allow_nonempty)
        try:  # everything checked before the first write; the folder let go if a check fails
            saved = None
            if resume and out_dir is not None:
                saved = resume_checkpoint(out_dir, cfg, self.total, model=model, data=identity)
            norm = prepare_model(model, cfg, where, input_config(data, cfg, normalization, saved))
            self.state = RunState(
                model,
                build_optimizer(model, cfg, param_groups),
                torch.amp.GradScaler(where.device.type, enabled=cfg.precision == "fp16"),
                batches,
                warming=wants_warmup(cfg, getattr(model_config(model), "depth", None)),
            )
            torch.manual_seed(cfg.seed)  # global RNG: anything stochastic inside the model
            if saved is not None and out_dir is not None:
                check_optimizer(out_dir, saved, self.state.optimizer)
                self.state.load_state_dict(saved)  # after the seed: the saved RNG states win
            if out_dir is not None and where.dist.is_main:
                self.folder = RunFolder(out_dir, cfg, data.classes, lock=lock, data=identity)
                config = run_config(model, data, cfg, where, run_info, identity=identity)
                self.folder.start(config, self.state)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        members = MemberState.create(1, warmup=self.state.warming, device=where.device)
        members.set_warmup_record(0, self.step, warming=self.state.warming,
                                  recent_errors=self.state.recent_errors)  # fmt: skip
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.stepper = make_step(
            wrap_model(model, cfg, where), self.state.optimizer, cfg, where, members=members,
            norm=norm, total=self.total, capacity=min(self.eval_every, self.total),
            step=self.step, scaler=self.state.scaler,
        )  # fmt: skip
        self.stream = endless(batches)  # from the position the state was taken at
        self.lr = learning_rate(self.step, self.total, cfg, warming_up=self.state.warming)
        model.train()

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    def batch(self) -> tuple[Tensor, Tensor]:
        return next(self.stream)

    def absorb(self, report: StepReport, seconds: float) -> dict[str, str]:
        if not report.alive[0]:
            bad = report.failed_step[0]
            raise NonFiniteLossError(
                f"non-finite training loss ({report.failed_loss(0)}) at step {bad} (lr "
                f"{report.lrs[bad - report.first][0]:g}): no update from it or any later step "
                f"reached the weights, which are those after step {bad - 1}"
                f"{self.folder.last_good() if self.folder else ''}"
            )
        self.state.absorb(report, seconds)
        if report.losses:
            self.lr = report.lrs[-1][0]
            return postfix(report.losses[-1][0], report.errors()[-1], self.lr)
        return {}

    def evaluation_point(self, *, show: bool) -> str:
        """Close the training window, evaluate (rank 0), log and checkpoint."""
        state = self.state
        # a finite loss can still have non-finite gradients; the next loss would catch the
        # broken weights, but this step's checkpoint must not keep them as "good"
        bad = non_finite_weights(state.model)
        if bad:
            raise NonFiniteLossError(
                f"non-finite weights after step {state.step} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): the loss was finite but not its gradients;"
                f" stopped before checkpointing them"
                f"{self.folder.last_good() if self.folder else ''}"
            )
        record = state.close_window(lr=self.lr, steps_per_epoch=self.steps_per_epoch)
        if self.where.dist.is_main:
            evaluate_point(state.model, self.data, self.cfg, self.where.device, record,
                           progress=show)  # fmt: skip
            state.history.append(record)
        improved = state.improves(record.get("val_error"))  # before the latest checkpoint
        if self.folder is not None:
            self.folder.log(record)
            self._pull_warmup()
            self.folder.save(state, best=improved)
        return format_record(record, self.total)

    def _pull_warmup(self) -> None:
        self.state.warming, self.state.recent_errors = self.stepper.state.warmup_record(
            0, self.step
        )

    def save(self) -> Path | None:
        if self.folder is None:
            return None
        self._pull_warmup()
        return self.folder.save(self.state)

    def finish(self, *, show: bool) -> FitResult:
        state, data = self.state, self.data
        for bad in getattr(state.batches, "skipped", []):  # streamed images skip_bad left out
            if bad not in data.skipped:
                data.skipped.append(bad)
        summary = {}
        if self.where.dist.is_main:
            summary = summarize(self.model, data, self.cfg, self.where.device, state,
                                total=self.total, steps_per_epoch=self.steps_per_epoch,
                                progress=show)  # fmt: skip
        if self.folder is not None:
            title = run_title(self.model, data, self.cfg, self.run_info)
            self.folder.finish(summary, state.history, title=title)
        return FitResult(self.model, state.history, summary, state.losses)

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()
