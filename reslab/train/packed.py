"""Training a seed-packed network (:mod:`reslab.models.packed`) as K separate runs would train.

What keeps the K members independent, step by step:

- **Data**: :class:`MemberBatches` gives member ``m`` the training batches a separate ``fit`` run
  with seed ``seeds[m]`` draws (its own source: epoch order and augmentation from its seed).
- **Loss**: :func:`~reslab.train.members.member_losses` is each member's mean cross-entropy; the
  backward pass runs on their sum, so each member's gradient is exactly its own (no other term
  depends on its weights).
- **Optimiser**: ``torch.optim.SGD``'s update (weight decay, momentum, dampening, Nesterov), all
  elementwise, with a learning rate per member (:func:`~reslab.train.members.sgd_update`;
  :class:`PackedSGD` is it as an optimiser). He et al. 2015 §4.2's warm-up of ResNet-110 (0.01
  until the training error is below 80 %, then 0.1) ends at each member's own step
  (:class:`~reslab.train.members.MemberState`).
- **Non-finite loss**: a separate run stops before the optimiser step of a non-finite loss and its
  last good checkpoint stays. Here that member is marked failed on the device (no host
  synchronisation) and from that step on gets no update: its gradients are replaced by zeros and
  its learning rate by 0, so its parameters stay exactly as they were before the failing step and
  nothing non-finite reaches the other members.

The step itself is :class:`reslab.train.captured.TrainStep` with ``members=K``, the same step an
ordinary run takes with ``members=1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from reslab.data.feed import TrainingBatches
from reslab.data.training import TrainingData
from reslab.models.packed import PackedNet
from reslab.train.config import TrainConfig
from reslab.train.members import (
    WARMUP_WINDOW,
    MemberState,
    check_members,
    member_losses,
    members_view,
    sgd_update,
)

__all__ = [
    "WARMUP_WINDOW",
    "MemberBatches",
    "MemberState",
    "PackedSGD",
    "member_finite",
    "member_losses",
    "member_optimizer_states",
]


class PackedSGD(torch.optim.Optimizer):
    """SGD with momentum over a packed network, with a learning rate per member.

    The update is :func:`~reslab.train.members.sgd_update` (``torch.optim.SGD``'s foreach update
    op for op), so member ``m``'s slice of every tensor moves exactly as in its own run; only the
    last step, ``p -= lr * d``, uses ``group["lr"] * member_lr_scale[m]``.

    ``step(member_lr_scale=..., active=...)`` takes device tensors of shape ``(K,)``: the factor
    on each member's learning rate (default 1) and which members are updated at all (default
    all); an inactive member's parameters do not change.
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
        check_members(self, members)

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
            device = group["params"][0].device
            lr = torch.full((k,), float(group["lr"]), dtype=torch.float64, device=device)
            if member_lr_scale is not None:
                lr = lr * member_lr_scale.to(device=device, dtype=torch.float64)
            on = active.to(device) if active is not None else None
            sgd_update(group, self.state, members=k, lr=lr, active=on)


def member_optimizer_states(state: dict[str, Any], members: int) -> list[dict[str, Any]]:
    """A packed network's ``torch.optim.SGD`` (or :class:`PackedSGD`) state dict as K state dicts
    of ``torch.optim.SGD`` for the unpacked members (:func:`reslab.models.packed.unpack` keeps
    the parameter order), so a member's checkpoint resumes as an ordinary run."""
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


def member_finite(packed: PackedNet) -> Tensor:
    """``(K,)`` bool: whether all of member m's parameters and buffers are finite (a finite loss
    can still have non-finite gradients; the trainer checks the weights before checkpointing)."""
    k = packed.members
    ok = torch.ones(k, dtype=torch.bool, device=next(packed.parameters()).device)
    for t in packed.body.state_dict().values():
        if t.is_floating_point() and t.ndim:
            ok &= torch.isfinite(members_view(t, k)).flatten(1).all(1).to(ok.device)
    return ok


class MemberBatches:
    """The training batches of K members as one packed batch, itself a
    :class:`~reslab.data.feed.TrainingBatches`.

    Member ``m`` draws from its own source, the training batches a run with seed ``seeds[m]``
    draws (:meth:`~reslab.data.training.TrainingData.train_batches` with that seed: its epoch
    order and augmentation); a batch is the members' uint8 images concatenated along channels,
    ``(N, K*C, H, W)``, with labels ``(N, K)``. The position is the members' positions, which
    move together.
    """

    def __init__(self, sources: Sequence[TrainingBatches]) -> None:
        if not sources or len({len(s) for s in sources}) != 1:
            raise ValueError("member batches need one or more sources of one epoch length")
        self.sources = list(sources)

    @classmethod
    def of(
        cls,
        data: TrainingData,
        seeds: Sequence[int],
        cfg: TrainConfig,
        device: torch.device | str = "cpu",
    ) -> MemberBatches:
        """Each seed's training batches of ``data`` with ``cfg``'s batch size and augmentation."""
        return cls(
            [
                data.train_batches(
                    cfg.batch_size,
                    seed=s,
                    device=torch.device(device),
                    augment=cfg.augmentation if cfg.augment else "none",
                    pad=cfg.pad,
                    flip=cfg.flip,
                )
                for s in seeds
            ]
        )

    def __len__(self) -> int:
        return len(self.sources[0])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for drawn in zip(*self.sources, strict=True):
            shapes = {tuple(x.shape) for x, _ in drawn}
            if len(shapes) > 1:  # a streamed source left unreadable images out of a batch
                raise ValueError(
                    f"the members' batches differ in size ({sorted(shapes)}): seed-packed "
                    "training needs full batches (data without unreadable images)"
                )
            yield torch.cat([x for x, _ in drawn], 1), torch.stack([y for _, y in drawn], 1)

    def seek(self, step: int) -> None:
        for s in self.sources:
            s.seek(step)

    def state_dict(self) -> dict[str, Any]:
        return {"members": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, position in zip(self.sources, state["members"], strict=True):
            s.load_state_dict(position)
