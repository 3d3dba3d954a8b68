"""Training a seed-packed network (:mod:`reslab.models.packed`) as K separate runs would train.

What keeps the K members independent, step by step:

- **Data**: :class:`MemberBatches` gives member ``m`` the data order and augmentation a separate
  ``fit`` run with seed ``seeds[m]`` draws (its own generator, its own permutation per epoch).
- **Loss**: :func:`member_losses` is each member's mean cross-entropy; the backward pass runs on
  their sum, so each member's gradient is exactly its own (no other term depends on its weights).
- **Optimiser**: :class:`PackedSGD` is ``torch.optim.SGD``'s update (weight decay, momentum,
  dampening, Nesterov), all elementwise, with a learning rate per member: the group's rate times
  ``member_lr_scale[m]``. He et al. 2015 §4.2's warm-up of ResNet-110 (0.01 until the training
  error is below 80 %, then 0.1) ends at each member's own step (:class:`MemberState`).
- **Non-finite loss**: a separate run stops before the optimiser step of a non-finite loss and its
  last good checkpoint stays. Here that member is marked failed on the device (no host
  synchronisation) and from that step on gets no update: its gradients are replaced by zeros and
  its learning rate by 0, so its parameters stay exactly as they were before the failing step and
  nothing non-finite reaches the other members.

Everything here works on device tensors and reads nothing back to the host, so a loop can call it
every step and look at the members' state only when it evaluates or checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.data import Normalize, random_crop_flip
from reslab.models.packed import PackedNet
from reslab.train.config import TrainConfig

__all__ = [
    "WARMUP_WINDOW",
    "MemberBatches",
    "MemberState",
    "PackedSGD",
    "member_finite",
    "member_losses",
    "member_optimizer_states",
    "packed_train_step",
]

#: Batches averaged when deciding that training error fell below ``warmup_error``; the same
#: window as the trainer's (reslab.train.loop.WARMUP_WINDOW).
WARMUP_WINDOW = 10


def _members_view(t: Tensor, k: int) -> Tensor:
    """``t`` of shape ``(K*d0, ...)`` as ``(K, d0, ...)`` (a view for any memory format)."""
    return t.unflatten(0, (k, -1))


def _per_member(v: Tensor, like: Tensor) -> Tensor:
    """A ``(K,)`` vector shaped to broadcast over ``like``'s ``(K, d0, ...)`` view."""
    return v.view(-1, *([1] * (like.ndim - 1)))


class PackedSGD(torch.optim.Optimizer):
    """SGD with momentum over a packed network, with a learning rate per member.

    The update is ``torch.optim.SGD``'s (``foreach`` implementation), which is elementwise, so
    member ``m``'s slice of every tensor moves exactly as in its own run; only the last step,
    ``p -= lr * d``, uses ``group["lr"] * member_lr_scale[m]``. Member ``m`` is row ``m`` of every
    parameter viewed as ``(K, -1)``: the invariant of :func:`reslab.models.packed.pack`.

    ``step(member_lr_scale=..., active=...)`` takes device tensors of shape ``(K,)``: the factor
    on each member's learning rate (default 1) and which members are updated at all (default
    all). An inactive member's gradients are replaced by zeros *before* anything else (they may
    be NaN, and ``0 * NaN`` is NaN) and its rate by 0, so its parameters do not change; its
    momentum buffer still decays and takes weight decay (it is never used again).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        members: int,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if members < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"need lr, momentum, weight_decay >= 0: {lr}, {momentum}, {weight_decay}"
            )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov,
        )  # fmt: skip
        super().__init__(params, defaults)
        self.members = members
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim == 0 or p.shape[0] % members:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} does not split into {members} "
                        "members along dim 0; is it from a packed network?"
                    )

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: None = None,
        *,
        member_lr_scale: Tensor | None = None,
        active: Tensor | None = None,
    ) -> None:
        if closure is not None:
            raise ValueError("PackedSGD.step takes no closure")
        k = self.members
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = params[0].device
            views = [_members_view(p, k) for p in params]
            grads = [_members_view(p.grad, k) for p in params]
            if active is not None:  # where, not a product: a failed member's grads may be NaN
                on = active.to(device)
                grads = [torch.where(_per_member(on, g), g, 0.0) for g in grads]
            # torch.optim.SGD's foreach update, op for op (torch/optim/sgd.py, _multi_tensor_sgd)
            wd, momentum = group["weight_decay"], group["momentum"]
            if wd != 0:
                grads = list(torch._foreach_add(grads, views, alpha=wd))
            if momentum != 0:
                states = [self.state[p] for p in params]
                if all("momentum_buffer" in s for s in states):
                    bufs = [_members_view(s["momentum_buffer"], k) for s in states]
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
                else:  # the first step: the buffer starts as the gradient, undamped
                    for s, g in zip(states, grads, strict=True):
                        s["momentum_buffer"] = g.detach().clone().flatten(0, 1)
                    bufs = [_members_view(s["momentum_buffer"], k) for s in states]
                if group["nesterov"]:
                    grads = list(torch._foreach_add(grads, bufs, alpha=momentum))
                else:
                    grads = bufs
            # p += (-lr_m) * d, the member's own rate; in float64 first, so a scale of
            # warmup_lr / lr times lr rounds to the same float32 rate a separate run uses
            lr = torch.full((k,), float(group["lr"]), dtype=torch.float64, device=device)
            if member_lr_scale is not None:
                lr = lr * member_lr_scale.to(device=device, dtype=torch.float64)
            if active is not None:
                lr = torch.where(active.to(device), lr, 0.0)
            neg = (-lr).to(params[0].dtype)
            torch._foreach_addcmul_(views, grads, [_per_member(neg, v) for v in views])


def member_optimizer_states(state: dict[str, Any], members: int) -> list[dict[str, Any]]:
    """A :class:`PackedSGD` state dict as K state dicts of ``torch.optim.SGD`` for the unpacked
    members (:func:`reslab.models.packed.unpack` keeps the parameter order), so a member's
    checkpoint resumes as an ordinary run."""
    out = []
    for m in range(members):
        per: dict[int, dict[str, Any]] = {}
        for idx, s in state["state"].items():
            per[idx] = {
                key: t.chunk(members, 0)[m].clone() if isinstance(t, Tensor) and t.ndim else t
                for key, t in s.items()
            }
        groups = [{key: v for key, v in g.items()} for g in state["param_groups"]]
        out.append({"state": per, "param_groups": groups})
    return out


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


def member_finite(packed: PackedNet) -> Tensor:
    """``(K,)`` bool: whether all of member m's parameters and buffers are finite (a finite loss
    can still have non-finite gradients; the trainer checks the weights before checkpointing)."""
    k = packed.members
    ok = torch.ones(k, dtype=torch.bool, device=next(packed.parameters()).device)
    for t in packed.body.state_dict().values():
        if t.is_floating_point() and t.ndim:
            ok &= torch.isfinite(_members_view(t, k)).flatten(1).all(1).to(ok.device)
    return ok


@dataclass
class MemberState:
    """Per-member training state on the device: alive, warming up, the warm-up window.

    ``alive[m]`` is False from the step whose loss was non-finite (``failed_step[m]``) on;
    ``warming[m]`` holds while member m still trains at ``warmup_lr``; ``recent_wrong`` counts
    misclassified training images of the last :data:`WARMUP_WINDOW` steps (row ``step % W``).
    """

    alive: Tensor  # (K,) bool
    warming: Tensor  # (K,) bool
    failed_step: Tensor  # (K,) int64, -1 while alive
    recent_wrong: Tensor  # (WARMUP_WINDOW, K) int64

    @classmethod
    def create(
        cls, members: int, *, warmup: bool, device: torch.device | str = "cpu"
    ) -> MemberState:
        return cls(
            alive=torch.ones(members, dtype=torch.bool, device=device),
            warming=torch.full((members,), warmup, dtype=torch.bool, device=device),
            failed_step=torch.full((members,), -1, dtype=torch.int64, device=device),
            recent_wrong=torch.zeros(WARMUP_WINDOW, members, dtype=torch.int64, device=device),
        )

    def observe_losses(self, losses: Tensor, step: int) -> None:
        """Mark members whose loss of ``step`` is non-finite as failed (before the update)."""
        newly = self.alive & ~torch.isfinite(losses.detach())
        self.failed_step = torch.where(newly, step, self.failed_step)
        self.alive = self.alive & ~newly

    def observe_errors(
        self, wrong: Tensor, step: int, *, batch_size: int, cfg: TrainConfig
    ) -> None:
        """After ``step``: a warming member leaves warm-up once the mean training error of the
        last WARMUP_WINDOW batches is below ``cfg.warmup_error`` ("then go back to 0.1").

        Decided on the count of misclassified images (``sum < error * W * batch``), which the
        trainer's float mean of per-batch errors agrees with except exactly at the threshold.
        """
        self.recent_wrong[step % WARMUP_WINDOW] = wrong.to(self.recent_wrong)
        if step + 1 >= WARMUP_WINDOW:  # every member has warmed up since step 0
            limit = math.ceil(cfg.warmup_error * WARMUP_WINDOW * batch_size)
            self.warming = self.warming & ~(self.recent_wrong.sum(0) < limit)

    def lr_scale(self, lr: float, cfg: TrainConfig) -> Tensor:
        """Per-member factor on the schedule's ``lr``: ``warmup_lr / lr`` while warming, else 1
        (so a warming member trains at ``cfg.warmup_lr``, as ``learning_rate(warming_up=True)``
        gives a separate run)."""
        ones = torch.ones(self.warming.shape, dtype=torch.float64, device=self.warming.device)
        return torch.where(self.warming, ones * (cfg.warmup_lr / lr if lr > 0 else 0.0), ones)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k).cpu() for k in ("alive", "warming", "failed_step",
                                                   "recent_wrong")}  # fmt: skip

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, t in state.items():
            setattr(self, key, t.to(getattr(self, key).device))


class MemberBatches:
    """Training batches of K members, each drawn as a separate ``fit`` run with its seed draws
    them: its own ``torch.Generator`` seeded with the member's seed, a new permutation of the
    training set at every epoch, then pad-crop-flip from the same generator.

    ``batch(step)`` returns the packed input ``(N, K*C, H, W)`` (normalised) and labels ``(N, K)``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        seeds: Sequence[int],
        cfg: TrainConfig,
        normalize: Normalize,
    ) -> None:
        self.images, self.labels, self.cfg = images, labels, cfg
        self.seeds = list(seeds)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.perms: list[Tensor | None] = [None] * len(self.seeds)
        self.steps_per_epoch = cfg.steps_per_epoch(len(labels))
        k = len(self.seeds)
        # one normalisation over the packed channels: elementwise, so the same numbers
        self.normalize = Normalize(
            normalize.mode, normalize.mean.repeat(k, 1, 1), normalize.std.repeat(k, 1, 1)
        )

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        cfg, b = self.cfg, self.cfg.batch_size
        pos = step % self.steps_per_epoch
        xs, ys = [], []
        for m, g in enumerate(self.generators):
            if pos == 0 or self.perms[m] is None:
                self.perms[m] = torch.randperm(len(self.labels), generator=g)
            perm = self.perms[m]
            assert perm is not None
            idx = perm[pos * b : (pos + 1) * b].to(self.images.device)
            x = self.images[idx]
            if cfg.augment:
                x = random_crop_flip(x, padding=cfg.pad, flip=cfg.flip, generator=g)
            xs.append(x)
            ys.append(self.labels[idx])
        return self.normalize(torch.cat(xs, 1)), torch.stack(ys, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"perms": list(self.perms), "rng": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perms = list(state["perms"])
        for g, s in zip(self.generators, state["rng"], strict=True):
            g.set_state(s)


def packed_train_step(
    model: nn.Module,
    optimizer: PackedSGD,
    x: Tensor,
    y: Tensor,
    members: MemberState,
    *,
    step: int,
    lr: float,
    cfg: TrainConfig,
) -> Tensor:
    """One optimiser step of every member, without reading anything back to the host.

    ``lr`` is the schedule's rate for ``step`` without warm-up (``learning_rate(step, total,
    cfg)``); each group gets ``lr * lr_scale`` as in the trainer, and each warming member
    ``cfg.warmup_lr`` through ``members.lr_scale``. Returns ``(2, K)``: each member's loss and
    number of misclassified images in the batch (a failed member's loss is its non-finite value).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    logits = model(x)
    losses = member_losses(logits, y, label_smoothing=cfg.label_smoothing)
    wrong = (logits.detach().argmax(2) != y).sum(0)
    members.observe_losses(losses, step)
    # the failed members' terms are left out so the reported total stays finite; their
    # gradients may still be NaN (0 * NaN) and PackedSGD replaces them by zeros
    total = torch.where(members.alive, losses, 0.0).sum()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step(member_lr_scale=members.lr_scale(lr, cfg), active=members.alive)
    members.observe_errors(wrong, step, batch_size=y.shape[0], cfg=cfg)
    return torch.stack([losses.detach(), wrong.to(losses.dtype)])
