"""The pieces around an optimiser step: the optimiser, the input batch, mixed precision, the
non-finite check. The step itself is :class:`reslab.train.captured.TrainStep`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.train.config import TrainConfig

__all__ = [
    "NonFiniteLossError",
    "autocast",
    "build_optimizer",
    "model_inputs",
    "non_finite_weights",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the run stopped before that optimiser step."""


def autocast(
    device: torch.device, precision: str, *, cache_enabled: bool = True
) -> contextlib.AbstractContextManager:
    """Mixed precision for ``precision`` "bf16"/"fp16"; nothing for "fp32". ``cache_enabled``:
    autocast's cache of cast weights (off while capturing a CUDA graph)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision], cache_enabled=cache_enabled)


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


def model_inputs(
    images: Tensor,
    norm: Callable[[Tensor], Tensor],
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


def non_finite_weights(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers that hold a NaN or infinity."""
    return [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
