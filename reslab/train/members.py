"""The per-member arithmetic of a training step, on device tensors only.

A run trains K *members* at once: K = 1 for an ordinary run, K seeds of one network for a
seed-packed run (:mod:`reslab.models.packed`). Member ``m`` is row ``m`` of every parameter viewed
as ``(K, -1)`` (the invariant of :func:`reslab.models.packed.pack`; with K = 1 the whole tensor).
Everything here reads and writes device tensors in place and never reads a value back to the
host, so that a whole training step can be captured as a CUDA graph and replayed
(:mod:`reslab.train.captured`); on a CPU the same code runs eagerly.

- :func:`member_losses`: each member's mean cross-entropy from logits ``(N, K, classes)``.
- :class:`MemberState`: which members are alive (no non-finite loss yet) and from which step a
  member failed; He et al. 2015 §4.2's warm-up (``warmup_lr`` until the training error of the
  last :data:`WARMUP_WINDOW` batches is below ``warmup_error``), decided per member.
- :func:`sgd_update`: ``torch.optim.SGD``'s foreach update with a learning rate per member (a
  device tensor, so a graph replays it with each step's rate) and an ``active`` mask that keeps
  an inactive member's parameters exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "WARMUP_WINDOW",
    "MemberState",
    "check_members",
    "member_losses",
    "members_view",
    "sgd_update",
]

#: Batches averaged when deciding that training error fell below ``warmup_error``.
WARMUP_WINDOW = 10


def members_view(t: Tensor, k: int) -> Tensor:
    """``t`` of shape ``(K*d0, ...)`` as ``(K, d0, ...)`` (a view for any memory format)."""
    return t.unflatten(0, (k, -1))


def check_members(optimizer: torch.optim.Optimizer, members: int) -> None:
    """Refuse an optimiser whose parameters do not split into ``members`` along dim 0."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.ndim == 0 or p.shape[0] % members:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} does not split into {members} "
                    "members along dim 0; is it from a packed network?"
                )


def _per_member(v: Tensor, like: Tensor) -> Tensor:
    """A ``(K,)`` vector shaped to broadcast over ``like``'s ``(K, d0, ...)`` view."""
    return v.view(-1, *([1] * (like.ndim - 1)))


def member_losses(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Each member's mean cross-entropy, ``(K,)``, from logits ``(N, K, classes)`` and labels
    ``(N, K)`` (member m's own labels in column m)."""
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (N, K, classes) and labels (N, K), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in float32, as the trainer's
        logits = logits.float()
    per_sample = F.cross_entropy(
        logits.transpose(1, 2), labels, reduction="none", label_smoothing=label_smoothing
    )  # (N, K)
    return per_sample.mean(0)


@dataclass
class MemberState:
    """Per-member training state on the device: alive, warming up, the warm-up window.

    ``alive[m]`` is False from the step whose loss was non-finite (``failed_step[m]``) on;
    ``warming[m]`` holds while member m still trains at ``warmup_lr``; ``recent_errors`` holds
    the training error (fraction of the batch misclassified) of the last :data:`WARMUP_WINDOW`
    steps, step ``s`` in row ``s % WARMUP_WINDOW``.

    Every update is in place: a CUDA graph captured once keeps reading and writing these very
    tensors on every replay.
    """

    alive: Tensor  # (K,) bool
    warming: Tensor  # (K,) bool
    failed_step: Tensor  # (K,) int64, -1 while alive
    recent_errors: Tensor  # (WARMUP_WINDOW, K) float64

    @classmethod
    def create(
        cls, members: int, *, warmup: bool, device: torch.device | str = "cpu"
    ) -> MemberState:
        return cls(
            alive=torch.ones(members, dtype=torch.bool, device=device),
            warming=torch.full((members,), warmup, dtype=torch.bool, device=device),
            failed_step=torch.full((members,), -1, dtype=torch.int64, device=device),
            recent_errors=torch.zeros(WARMUP_WINDOW, members, dtype=torch.float64, device=device),
        )

    @property
    def members(self) -> int:
        return int(self.alive.shape[0])

    def observe_losses(self, losses: Tensor, step: int | Tensor) -> None:
        """Mark members whose loss of ``step`` is non-finite as failed (before the update)."""
        newly = self.alive & ~torch.isfinite(losses.detach())
        self.failed_step.copy_(torch.where(newly, step, self.failed_step))
        self.alive.logical_and_(~newly)

    def observe_errors(
        self, wrong: Tensor, step: int | Tensor, *, batch_size: int | Tensor, warmup_error: float
    ) -> None:
        """After ``step``: a warming member leaves warm-up once the mean training error of the
        last WARMUP_WINDOW batches is below ``warmup_error`` ("then go back to 0.1"). A member
        that failed keeps the warm-up state it failed in."""
        step = torch.as_tensor(step, device=self.alive.device)
        errors = wrong.to(torch.float64) / batch_size
        row = (step % WARMUP_WINDOW).view(1)
        self.recent_errors.index_copy_(0, row, errors.view(1, -1))
        full = step + 1 >= WARMUP_WINDOW  # every member has warmed up since step 0
        below = self.recent_errors.sum(0) / WARMUP_WINDOW < warmup_error
        self.warming.logical_and_(~(full & below & self.alive))

    def learning_rate(self, lr: Tensor, warmup_lr: float) -> Tensor:
        """Each member's rate, ``(K,)`` float64: ``warmup_lr`` while warming, else ``lr``."""
        return torch.where(self.warming, warmup_lr, lr.to(torch.float64))

    def warmup_record(self, member: int, step: int) -> tuple[bool, list[float]]:
        """Member ``member``'s warm-up state after ``step`` steps as a run's checkpoint keeps it:
        (warming, the errors of the last WARMUP_WINDOW steps, oldest first). Reads the device."""
        done = range(max(0, step - WARMUP_WINDOW), step)
        errors = self.recent_errors[:, member].tolist()
        return bool(self.warming[member]), [errors[s % WARMUP_WINDOW] for s in done]

    def set_warmup_record(
        self, member: int, step: int, *, warming: bool, recent_errors: list[float]
    ) -> None:
        """The inverse of :meth:`warmup_record` (a run resumed at ``step``)."""
        self.warming[member] = warming
        start = step - len(recent_errors)
        for s, error in enumerate(recent_errors, start=start):
            self.recent_errors[s % WARMUP_WINDOW, member] = error

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def state_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            own: Tensor = getattr(self, f.name)
            value = torch.as_tensor(state[f.name])
            if value.shape != own.shape:
                raise ValueError(
                    f"member state {f.name!r} has shape {tuple(value.shape)}, this run "
                    f"{tuple(own.shape)}: a checkpoint of another number of members"
                )
            own.copy_(value)


@torch.no_grad()
def sgd_update(
    group: dict[str, Any],
    state: dict[Tensor, dict[str, Any]],
    *,
    members: int,
    lr: Tensor,
    active: Tensor | None = None,
) -> None:
    """One ``torch.optim.SGD`` step of the parameters of ``group`` (weight decay, momentum,
    dampening, Nesterov from the group), member ``m`` at rate ``lr[m]`` (a ``(K,)`` device
    tensor, float64), ``state`` the optimiser's per-parameter state (momentum buffers).

    The update is ``torch.optim.SGD``'s foreach implementation op for op (torch/optim/sgd.py,
    ``_multi_tensor_sgd``), elementwise, so member ``m``'s slice of every tensor moves as in its
    own run; only the last operation, ``p -= lr * d``, takes the rate as a tensor instead of a
    Python number. An inactive member's gradients are replaced by zeros *before* anything else
    (they may be NaN, and ``0 * NaN`` is NaN) and its rate by 0, so its parameters do not change;
    its momentum buffer still decays and takes weight decay (it is never used again).
    """
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    k = members
    device = params[0].device
    views = [members_view(p, k) for p in params]
    grads = [members_view(p.grad, k) for p in params]
    if active is not None:  # where, not a product: a failed member's grads may be NaN
        grads = [torch.where(_per_member(active, g), g, 0.0) for g in grads]
    wd, momentum = group["weight_decay"], group["momentum"]
    if wd != 0:
        grads = list(torch._foreach_add(grads, views, alpha=wd))
    if momentum != 0:
        states = [state[p] for p in params]
        if all(s.get("momentum_buffer") is not None for s in states):
            bufs = [members_view(s["momentum_buffer"], k) for s in states]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
        else:  # the first step: the buffer starts as the gradient, undamped
            for s, g in zip(states, grads, strict=True):
                s["momentum_buffer"] = g.detach().clone().flatten(0, 1)
            bufs = [members_view(s["momentum_buffer"], k) for s in states]
        nesterov = group["nesterov"]
        grads = list(torch._foreach_add(grads, bufs, alpha=momentum)) if nesterov else bufs
    # p += (-lr_m) * d; the rate in float64 first, so that warmup_lr or lr * lr_scale rounds to
    # the float32 number a Python float gives torch.optim.SGD
    rate = lr.to(device=device, dtype=torch.float64)
    if active is not None:
        rate = torch.where(active, rate, 0.0)
    neg = (-rate).to(params[0].dtype)
    torch._foreach_addcmul_(views, grads, [_per_member(neg, v) for v in views])
