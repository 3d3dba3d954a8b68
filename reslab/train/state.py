"""The state of a training run: everything a resume needs to continue bit for bit, in one object."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reslab.data.feed import TrainingBatches
from reslab.train.captured import StepReport
from reslab.train.members import WARMUP_WINDOW

__all__ = ["WARMUP_WINDOW", "RunState", "Window", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """torch's global random states (CPU and every CUDA device), for a checkpoint."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    """The inverse of :func:`rng_state`."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        # the devices both machines have: a checkpoint from one with more visible GPUs must
        # resume on one with fewer (set_rng_state_all would index past the last device)
        for index, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


@dataclass
class Window:
    """Training loss and error summed since the last evaluation, and over how many steps: a
    resume inside a window must log the same mean at the next evaluation as a straight run."""

    loss: float = 0.0
    error: float = 0.0
    steps: int = 0

    def add(self, loss: float, error: float) -> None:
        self.loss, self.error, self.steps = self.loss + loss, self.error + error, self.steps + 1


@dataclass
class RunState:
    """The mutable state of one run. :meth:`state_dict` is exactly what resume needs: the model's
    and optimiser's state, the gradient scaler, the data source's position, the random number
    generators, the warm-up state, the history and the counters; :meth:`load_state_dict` puts a
    run back where the state was taken."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: TrainingBatches  # data order and augmentation: a function of seed and position
    # He et al. 2015 §4.2's warm-up at warmup_lr is on, and the errors of the last WARMUP_WINDOW
    # steps: decided on the device step by step (reslab.train.members.MemberState), copied here
    # when a checkpoint is taken and back when one is loaded
    warming: bool = False
    step: int = 0  # optimiser steps done
    recent_errors: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    losses: list[float] = field(default_factory=list)  # the loss of every step
    window: Window = field(default_factory=Window)
    best_val: float = math.inf  # lowest validation error so far
    train_seconds: float = 0.0  # time in training steps (evaluation excluded)
    images: int = 0  # training images processed, all ranks

    def absorb(self, report: StepReport, seconds: float, *, member: int = 0) -> None:
        """Count the steps of ``report`` (member ``member``'s numbers; read from the device at an
        evaluation, checkpoint or log point) and the ``seconds`` they took."""
        for loss, error, images in zip(
            (row[member] for row in report.losses), report.errors(member), report.images,
            strict=True,
        ):  # fmt: skip
            self.losses.append(loss)
            self.images += images
            self.window.add(loss, error)
        self.train_seconds += seconds

    def close_window(self, *, lr: float, steps_per_epoch: int) -> dict[str, Any]:
        """The training half of an evaluation record (means over the steps since the last one);
        starts a new window."""
        w, self.window = self.window, Window()
        return {
            "step": self.step,
            "epoch": self.step / steps_per_epoch,
            "lr": lr,
            "loss": w.loss / w.steps,
            "train_error": w.error / w.steps,
            "seconds": self.train_seconds,
            "images_per_second": self.images / max(self.train_seconds, 1e-9),
        }

    def improves(self, val_error: float | None) -> bool:
        """Whether ``val_error`` is a new best; if so it becomes the best."""
        if val_error is None or not val_error < self.best_val:
            return False
        self.best_val = val_error
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.progress_state(),
            "rng": rng_state(),
        }

    def progress_state(self) -> dict[str, Any]:
        """What the run has done, apart from the weights, optimiser and random states: the step,
        the data's position, the warm-up state, the history, losses and counters."""
        return {
            "step": self.step,
            "batches": self.batches.state_dict(),
            "warming": self.warming,
            "recent_errors": list(self.recent_errors),
            "history": self.history,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "window": [self.window.loss, self.window.error, self.window.steps],
            "best_val": self.best_val,
            "train_seconds": self.train_seconds,
            "images": self.images,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty: the disabled scaler of an fp32 run; fp16 starts a new scale
            self.scaler.load_state_dict(state["scaler"])
        self.load_progress_state(state)
        set_rng_state(state["rng"])

    def load_progress_state(self, state: dict[str, Any]) -> None:
        """The inverse of :meth:`progress_state`."""
        self.step = int(state["step"])
        self._load_position(state.get("batches"))
        self.warming = bool(state["warming"])
        self.recent_errors = list(state["recent_errors"])
        self.history = list(state["history"])
        self.losses = state["losses"].tolist()
        loss, error, steps = state["window"]
        self.window = Window(float(loss), float(error), int(steps))
        self.best_val = float(state["best_val"])
        self.train_seconds = float(state["train_seconds"])
        self.images = int(state["images"])

    def _load_position(self, position: dict[str, Any] | None) -> None:
        """The training data's position; a checkpoint of format 1 or 2 holds the permutation of
        the data order reslab drew then from a generator instead, which these batches do not
        use: the run continues at the same step, with this version's data order."""
        if position is not None and "epoch" in position:
            self.batches.load_state_dict(position)
            return
        self.batches.seek(self.step)
        warnings.warn(
            f"the checkpoint (format 1 or 2) holds the data order of an older reslab: training "
            f"continues at step {self.step} with the weights, optimiser and schedule as saved, "
            "but the images of the remaining steps are drawn in this version's order, not the "
            "one the older version would have drawn",
            stacklevel=3,
        )
