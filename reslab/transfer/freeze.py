"""Freezing pretrained layers, unfreezing them on a schedule, and per-group learning rates.

A ResNet is cut into ordered parts: ``stem`` (conv1, bn1), the stages ``layer1..N`` and ``head``
(final BN, classifier). ``freeze_until(model, "layer3")`` freezes the stem and layer1..3. A frozen
BatchNorm stays in eval mode even when the trainer calls ``model.train()``: otherwise its running
statistics would drift to the new data while its scale and shift stay fixed, silently changing
the pretrained features (the reason torchvision's detection models use FrozenBatchNorm2d).
Schedules and groups are plain functions of the step and the model (STYLE.md §8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = [
    "check_freeze_point",
    "freezable_parts",
    "freeze_point_at",
    "freeze_until",
    "gradual_schedule",
    "param_groups",
    "unfreeze_schedule",
]

_STEM = ("conv1", "bn1")
NONE = "none"


def freezable_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The model's parts in forward order: ``stem``, each stage, ``head``."""
    stages = getattr(model, "stage_names", None)
    if stages is None:
        raise ValueError(f"{type(model).__name__} has no stages to freeze (a reslab ResNet has)")
    parts: dict[str, list[nn.Module]] = {"stem": [], **{s: [] for s in stages}, "head": []}
    for name, child in model.named_children():
        part = "stem" if name in _STEM else name if name in stages else "head"
        parts[part].append(child)
    return parts


def _stay_in_eval_while_frozen(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: a BatchNorm whose affine parameters are frozen runs in eval mode."""
    if module.weight is not None and not module.weight.requires_grad:
        module.train(False)


def _keep_frozen_bn_in_eval(bn: nn.modules.batchnorm._BatchNorm) -> None:
    if not any(h is _stay_in_eval_while_frozen for h in bn._forward_pre_hooks.values()):
        bn.register_forward_pre_hook(_stay_in_eval_while_frozen)
    bn.train(False)


def check_freeze_point(model: nn.Module, until: str) -> list[str]:
    """The valid freeze points of ``model`` in order ("none", "stem", "layer1", ...); a
    ``ValueError`` if ``until`` is not one of them. A model without stages (a dense net) has
    only "none": it trains whole."""
    if until == NONE and getattr(model, "stage_names", None) is None:
        return [NONE]
    order = [NONE, *list(freezable_parts(model))[:-1]]  # the head is what we train: never frozen
    if until not in order:
        raise ValueError(f"unknown part {until!r}; valid choices: {', '.join(order)}")
    return order


def freeze_until(model: nn.Module, until: str) -> list[str]:
    """Freeze every part up to and including ``until`` ("none", "stem", "layer1", ...); unfreeze
    the later ones. Returns the names of the frozen parts. Calling it again with an earlier part
    unfreezes the parts in between, which is how the schedules below work."""
    order = check_freeze_point(model, until)
    if order == [NONE]:  # nothing can be frozen: every parameter trains
        model.requires_grad_(True)
        return []
    parts = freezable_parts(model)
    frozen = order[1 : order.index(until) + 1]
    for name, modules in parts.items():
        trainable = name not in frozen
        for module in modules:
            module.requires_grad_(trainable)
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    if trainable:
                        m.train(model.training)
                    else:
                        _keep_frozen_bn_in_eval(m)
    return frozen


def gradual_schedule(model: nn.Module, until: str, every: int) -> dict[int, str]:
    """Unfreeze one part every ``every`` steps, deepest first (Howard & Ruder 2018, ULMFiT's
    "gradual unfreezing"): ``{0: "layer3", every: "layer2", ..., k*every: "none"}``."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    order = check_freeze_point(model, until)
    points = order[: order.index(until) + 1][::-1]
    return {i * every: point for i, point in enumerate(points)}


def freeze_point_at(step: int, schedule: Mapping[int, str]) -> str:
    """The freeze point in force at ``step``: that of the latest schedule step <= ``step``."""
    due = [s for s in schedule if s <= step]
    return schedule[max(due)] if due else NONE


def unfreeze_schedule(schedule: Mapping[int, str]) -> Callable[[int, nn.Module], None]:
    """An ``on_step(step, model)`` callback for ``reslab.train.fit`` that applies ``schedule``."""
    applied: list[str] = []

    def on_step(step: int, model: nn.Module) -> None:
        point = freeze_point_at(step, schedule)
        if not applied or applied[-1] != point:
            freeze_until(model, point)
            applied.append(point)

    return on_step


def param_groups(
    model: nn.Module,
    *,
    pretrained_lr_scale: float = 0.1,
    new: Sequence[str] = ("fc",),
    decay_all: bool = True,
) -> list[dict[str, Any]]:
    """Optimiser groups for ``fit(param_groups=...)``: pretrained layers learn at
    ``pretrained_lr_scale`` times the base rate, the new modules (children named in ``new``,
    the replaced classifier by default) at the full rate. ``decay_all=False`` exempts BN
    parameters and biases (rank < 2) from weight decay, as the trainer's own grouping does.

    Frozen parameters are included: they receive no gradient, so the optimiser skips them until
    they are unfrozen (a group cannot be added to a running optimiser through ``fit``).
    """
    groups: dict[tuple[str, bool], list[Tensor]] = {}
    for name, p in model.named_parameters():
        kind = "new" if name.split(".")[0] in new else "pretrained"
        groups.setdefault((kind, decay_all or p.ndim >= 2), []).append(p)
    out = []
    for kind in ("pretrained", "new"):
        scale = pretrained_lr_scale if kind == "pretrained" else 1.0
        for decay in (True, False):
            if groups.get((kind, decay)):
                group = {"params": groups[(kind, decay)], "lr_scale": scale, "name": kind}
                out.append(group if decay else {**group, "weight_decay": 0.0})
    return out
