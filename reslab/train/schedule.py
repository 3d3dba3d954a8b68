"""The learning rate as a pure function of the step (nanoGPT's ``get_lr``), tested alone."""

from __future__ import annotations

from reslab.train.config import TrainConfig

__all__ = ["learning_rate", "train_resolution", "train_size", "wants_warmup"]


def wants_warmup(cfg: TrainConfig, depth: int | None) -> bool:
    """He et al. 2015, §4.2: "In this case [110 layers], we find that the initial learning rate of
    0.1 is slightly too large to start converging. So we use 0.01 to warm up the training until the
    training error is below 80% (about 400 iterations), and then go back to 0.1." They do the same
    for ResNet-1202."""
    if cfg.warmup == "auto":
        return depth is not None and depth >= 110
    return cfg.warmup == "error"


def learning_rate(
    step: int, total_steps: int, cfg: TrainConfig, *, warming_up: bool = False
) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of a run of ``total_steps``.

    ``warming_up`` is the trainer's state "training error has not yet fallen below
    cfg.warmup_error"; while it holds the rate is ``cfg.warmup_lr``.
    """
    if warming_up:
        return cfg.warmup_lr
    if cfg.schedule == "step":
        passed = sum(step >= round(m * total_steps) for m in cfg.milestones)
        return cfg.lr * cfg.lr_decay**passed
    # onecycle: linear from ~0 to lr over warmup_fraction of the run, then linear to 0 at the end
    rise = round(cfg.warmup_fraction * total_steps)
    if step < rise:
        return cfg.lr * (step + 1) / rise
    return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - rise))


def train_resolution(step: int, total_steps: int, cfg: TrainConfig) -> int | None:
    """Side in pixels that training batches of step ``step`` are resized to (``None``: unchanged).

    ``cfg.resolutions`` lists (fraction of the run, side); the last pair whose fraction has been
    reached applies. Like the learning rate it depends on the step alone, so resume and DDP ranks
    agree without extra state.
    """
    side = None
    for fraction, s in cfg.resolutions:
        if step >= round(fraction * total_steps):
            side = s
    return side


def train_size(
    step: int, total_steps: int, cfg: TrainConfig, size: tuple[int, int]
) -> tuple[int, int] | None:
    """(H, W) that training batches of ``size`` (the data's input size) are resized to at
    ``step`` (``None``: unchanged).

    ``cfg.resolutions``' sides are relative to its last one, which stands for the data's own
    size: the ``fast`` recipe's 16/24/32 px trains 32-px CIFAR at 16, 24 and 32 px, 8-px digits
    at 4, 6 and 8 px and 224-px photos at 112, 168 and 224 px, always ending at the size it is
    evaluated at. (Applied as absolute pixels, 16/24/32 would shrink photos to 32 px and then
    evaluate them at 224, or blow digits up four times.)
    """
    side = train_resolution(step, total_steps, cfg)
    if side is None:
        return None
    last = cfg.resolutions[-1][1]
    new = (max(1, round(size[0] * side / last)), max(1, round(size[1] * side / last)))
    return None if new == tuple(size) else new
