"""One optimiser step (forward, loss, backward, SGD update) and the pieces around it.

:func:`train_step` is the unit a captured version (CUDA graphs of the whole step) can replace:
it takes a ready input batch and returns plain numbers, with no other state than the model,
optimiser and gradient scaler it is given.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.data import Normalize
from reslab.train.config import TrainConfig

__all__ = [
    "NonFiniteLossError",
    "StepOptions",
    "StepStats",
    "autocast",
    "build_optimizer",
    "model_inputs",
    "non_finite_weights",
    "set_learning_rate",
    "train_step",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the run stopped before that optimiser step."""


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``precision`` "bf16"/"fp16"; nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, param_groups: list[dict] | None = None
) -> torch.optim.SGD:
    """SGD with ``cfg``'s momentum and weight decay over ``param_groups`` (each may carry an
    ``lr_scale``), or over the trainable parameters: one group, or with ``decay_all=False`` two,
    the second (BatchNorm scales and shifts, biases) without weight decay."""
    if param_groups is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.decay_all:
            param_groups = [{"params": params}]
        else:  # weight decay on conv/linear weights only (nanoGPT: split by tensor rank)
            param_groups = [
                {"params": [p for p in params if p.ndim >= 2]},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ]
    return torch.optim.SGD(
        param_groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` times each group's ``lr_scale`` (fine-tuning's slower pretrained layers)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def model_inputs(
    images: Tensor,
    norm: Normalize,
    *,
    side: int | tuple[int, int] | None = None,
    channels_last: bool = False,
) -> Tensor:
    """The network's input from a uint8 batch: normalised, resized to ``side`` (a square's side
    or (H, W): progressive resizing; antialiased, like a real smaller image), in the memory
    layout the model uses."""
    x = norm(images)
    size = (side, side) if isinstance(side, int) else side
    if size is not None and tuple(size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass(frozen=True)
class StepOptions:
    """What :func:`train_step` needs besides the batch; fixed for a run."""

    precision: str = "fp32"  # "fp32", "bf16" or "fp16" autocast of the forward pass
    label_smoothing: float = 0.0
    world_size: int = 1  # DDP ranks whose numbers are all-reduced
    cuda_graphs: bool = False  # torch.compile replays the step as CUDA graphs: mark each step

    @classmethod
    def of(cls, cfg: TrainConfig, world_size: int = 1) -> StepOptions:
        graphs = cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")
        return cls(cfg.precision, cfg.label_smoothing, world_size, graphs)


@dataclass(frozen=True)
class StepStats:
    """One step's numbers over the global batch (all ranks)."""

    loss: float  # mean training loss
    wrong: int  # misclassified images
    images: int  # images in the batch
    stop: bool  # a rank caught a signal: every rank stops after this step

    @property
    def error(self) -> float:
        return self.wrong / self.images


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: Tensor,
    y: Tensor,
    *,
    options: StepOptions,
    stop: bool = False,
) -> StepStats:
    """Forward ``x``, cross-entropy against ``y``, backward, one optimiser step; ``stop`` is this
    rank's "a signal came" flag, all-reduced with the loss so that every rank stops together.

    Raises :class:`NonFiniteLossError` before the optimiser step if the loss is NaN or infinite,
    so the weights stay those of the last good step.
    """
    if options.cuda_graphs:  # one training step per replay of the CUDA graphs (forward + backward)
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(x.device, options.precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=options.label_smoothing)
    wrong = (logits.detach().argmax(1) != y).sum()
    flag = torch.tensor(float(stop), device=loss.device)
    count = torch.tensor(float(len(y)), device=loss.device)
    stats = torch.stack([loss.detach(), wrong.float(), count, flag])
    if options.world_size > 1:  # global mean loss and error; stop together on a signal
        dist.all_reduce(stats)
        stats[0] /= options.world_size  # equal shares: the mean of means is the global mean
    loss_value, n_wrong, n_images, stops = stats.tolist()
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"non-finite training loss ({loss_value})")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return StepStats(loss_value, round(n_wrong), round(n_images), stops > 0)


def non_finite_weights(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers that hold a NaN or infinity."""
    return [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
