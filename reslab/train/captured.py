"""The whole training step as one unit, captured as a CUDA graph on a GPU and run eagerly on a CPU.

One step is: normalise the uint8 batch (and resize it, for progressive resizing), the forward pass
under autocast, each member's loss, the backward pass, the SGD update and the bookkeeping (the
step's loss, misclassified images, whether the loss was finite, the warm-up rule). It reads every
changing number from device tensors (the batch from static buffers, the learning rate from a table
indexed by a step counter on the device) and writes only in place, so the same Python function
serves both ways of running it:

- **eagerly** (CPU, or a GPU without ``cuda_graphs``): called once per step;
- **as a CUDA graph** (``cuda_graphs`` on a GPU): a few eager steps on a side stream, then one
  capture with ``torch.cuda.graph`` (the "whole network capture" of PyTorch's CUDA graphs notes:
  forward, backward and optimiser step in one graph), then one ``replay()`` per step. A small
  CIFAR ResNet is bound by the CPU launching a few hundred kernels per step; a replay is one
  launch. A new graph is captured when the input shape (progressive resizing) or the set of
  trainable parameters (a freeze schedule) changes.

Nothing in the step reads a value back to the host. The promise of the non-finite check is kept on
the device instead: a member whose loss is NaN or infinite is marked failed at that step
(:class:`~reslab.train.members.MemberState`), and from that step on its update is masked (its
gradients zeroed, its rate 0), so no update computed from a non-finite loss reaches its weights.
The host learns of it when it reads (:meth:`TrainStep.read`), which the trainer does at
evaluation, checkpoint and log points only: before it checkpoints, so the last good checkpoint is
never replaced by weights after a non-finite step. (A finite loss whose gradients are not finite
is caught at the next evaluation by the weights check, as before.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from reslab.data import Normalize
from reslab.train.members import (
    MemberState,
    check_members,
    member_losses,
    members_view,
    sgd_update,
)
from reslab.train.step import autocast, model_inputs

__all__ = ["GRAPH_WARMUP_STEPS", "StepReport", "TrainStep", "lr_table"]

#: Eager steps on a side stream before a graph is captured (PyTorch's CUDA graphs notes: lazy
#: initialisation, cuDNN's algorithm choice and autograd's streams must happen before capture).
GRAPH_WARMUP_STEPS = 3


def lr_table(
    rate: Callable[[int], float], total: int, device: torch.device | str = "cpu"
) -> Tensor:
    """``rate(step)`` for every step of a run, as a float64 device tensor a step indexes."""
    return torch.tensor([rate(s) for s in range(total)], dtype=torch.float64, device=device)


@dataclass(frozen=True)
class StepReport:
    """What the host reads from the device: the steps since the last read and the members' state.

    ``losses[i][m]``, ``wrong[i][m]`` and ``lrs[i][m]`` are member m's mean loss, misclassified
    images and learning rate of step ``first + i``; ``images[i]`` the images of that step's
    (global) batch.
    """

    first: int
    losses: list[list[float]]
    wrong: list[list[float]]
    lrs: list[list[float]]
    images: list[int]
    alive: list[bool]
    failed_step: list[int]
    warming: list[bool]

    def errors(self, member: int = 0) -> list[float]:
        return [w[member] / n for w, n in zip(self.wrong, self.images, strict=True)]

    def failed(self) -> list[int]:
        """The members whose loss went non-finite."""
        return [m for m, ok in enumerate(self.alive) if not ok]

    def failed_loss(self, member: int) -> float:
        """Member ``member``'s loss at its failed step, if that step is in this report."""
        i = self.failed_step[member] - self.first
        return self.losses[i][member] if 0 <= i < len(self.losses) else float("nan")


@dataclass
class _Graph:
    key: tuple
    images: Tensor  # static input buffers the graph reads
    labels: Tensor
    warm: int = 0  # eager steps run for this key
    graph: Any = None  # torch.cuda.CUDAGraph once captured


class TrainStep:
    """The training step of a run of ``members`` members (1: an ordinary run; K: a seed-packed
    network whose forward returns ``(N, K, classes)`` logits from ``(N, K*C, H, W)`` inputs).

    ``model`` is the module the step calls (the network, or its DDP / ``torch.compile`` wrapper;
    ``mark_step`` when that wrapper replays CUDA graphs of its own);
    ``optimizer`` a ``torch.optim.SGD`` (its groups' hyper-parameters and momentum buffers; each
    group may carry an ``lr_scale``); ``rates`` the schedule's learning rate per step
    (:func:`lr_table`); ``state`` the members' device state; ``norm`` the input normalisation
    (over K*C channels for a packed network). ``capacity``: steps the device log holds between
    two reads (the trainer reads at least every evaluation interval).

    ``step(images, labels, size=...)`` takes a uint8 batch and labels ``(N,)`` or ``(N, K)`` on the
    device; :meth:`read` synchronises and returns the steps since the last read.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        members: int,
        rates: Tensor,
        state: MemberState,
        norm: Callable[[Tensor], Tensor],
        capacity: int,
        warmup_lr: float,
        warmup_error: float,
        label_smoothing: float = 0.0,
        precision: str = "fp32",
        channels_last: bool = False,
        scaler: torch.amp.GradScaler | None = None,
        world_size: int = 1,
        graphs: bool = False,
        mark_step: bool = False,
        step: int = 0,
    ) -> None:
        device = rates.device
        if graphs and device.type != "cuda":
            graphs = False  # the same step, eagerly: CUDA graphs exist on CUDA devices only
        if graphs and world_size > 1:
            raise ValueError("cuda_graphs with DDP (torchrun) is not supported: train without it")
        if graphs and scaler is not None and scaler.is_enabled():
            raise ValueError(
                "cuda_graphs with fp16: the gradient scaler adjusts its scale between steps "
                "outside a graph; use --precision bf16 (no scaler) or fp32"
            )
        check_members(optimizer, members)
        self.model, self.optimizer, self.members = model, optimizer, members
        if isinstance(norm, Normalize):  # its statistics on the device: a copy from host memory
            # each step would be a synchronisation, and inside a graph capture an error
            norm = Normalize(norm.mode, norm.mean.to(device), norm.std.to(device))
        self.rates, self.state, self.norm = rates, state, norm
        self.warmup_lr, self.warmup_error = warmup_lr, warmup_error
        self.label_smoothing, self.precision = label_smoothing, precision
        self.channels_last, self.scaler, self.world_size = channels_last, scaler, world_size
        self.graphs = graphs
        # torch.compile's own CUDA graphs (reduce-overhead) replay forward and backward; they
        # must be told where a step begins
        self.mark_step = mark_step
        self.device = device
        self.capacity = capacity
        self.step = step  # the host's count; the device has its own in `counter`
        self.counter = torch.tensor(step, dtype=torch.int64, device=device)
        # float64: a float64 network's losses are logged as they are, float32 ones exactly
        self.losses = torch.zeros(capacity, members, dtype=torch.float64, device=device)
        self.wrong = torch.zeros(capacity, members, dtype=torch.float64, device=device)
        self.lrs = torch.zeros(capacity, members, dtype=torch.float64, device=device)
        self.images = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.stop_flag = torch.zeros((), dtype=torch.float64, device=device)
        self._read_from = step
        self._inputs: tuple[Tensor, Tensor] | None = None
        self._size: tuple[int, int] | int | None = None  # progressive resizing
        self._graph: _Graph | None = None

    # -- the step -----------------------------------------------------------------------------
    def __call__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        size: tuple[int, int] | int | None = None,
        stop: bool = False,
    ) -> None:
        """One optimiser step on ``images`` (uint8) and ``labels``; ``stop``: this rank caught a
        signal (all-reduced under DDP, see :meth:`agree_stop`). Reads nothing back."""
        if self.step - self._read_from >= self.capacity:
            raise RuntimeError(
                f"{self.capacity} steps since the last read: the device log would overwrite "
                "steps the host has not read"
            )
        if self.world_size > 1:
            self.stop_flag.fill_(float(stop))
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        if self.graphs:
            self._graph_step(images, labels, size)
        else:
            self._inputs, self._size = (images, labels), size
            self.optimizer.zero_grad(set_to_none=True)
            self._step(capturing=False)
        self.step += 1

    def _step(self, *, capturing: bool) -> None:
        """The step proper: device tensors in, device tensors updated in place (see the module
        docstring for why nothing here may read back to the host or rebind a tensor)."""
        assert self._inputs is not None
        images, labels = self._inputs
        k, n, state = self.members, images.shape[0], self.state
        x = model_inputs(images, self.norm, side=self._size, channels_last=self.channels_last)
        # autocast's cast cache must be off while capturing (PyTorch's CUDA graphs notes)
        with autocast(self.device, self.precision, cache_enabled=not capturing):
            logits = self.model(x)
        logits = logits.view(n, k, -1)
        labels = labels.view(n, k)
        losses = member_losses(logits, labels, label_smoothing=self.label_smoothing)
        wrong = (logits.detach().argmax(2) != labels).sum(0).double()
        count = torch.full((1,), float(n), dtype=torch.float64, device=self.device)
        seen = losses.detach().double()
        if self.world_size > 1:  # global mean loss and error; a signal stops every rank
            stats = torch.cat([seen, wrong, count, self.stop_flag.view(1)])
            dist.all_reduce(stats)
            seen, wrong, count = stats[:k] / self.world_size, stats[k : 2 * k], stats[2 * k]
            self.stop_flag.copy_(stats[-1])
        state.observe_losses(seen, self.counter)  # a non-finite loss on any rank fails the member
        total = torch.where(state.alive, losses, 0.0).sum()  # failed members: no gradient
        if self.scaler is not None and self.scaler.is_enabled():  # fp16: skip overflowing steps
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            active = state.alive & self._grads_finite()
        else:
            total.backward()
            active = state.alive
        rate = state.learning_rate(self.rates.index_select(0, self.counter.view(1)), self.warmup_lr)
        for group in self.optimizer.param_groups:
            scaled = rate * group.get("lr_scale", 1.0)
            sgd_update(group, self.optimizer.state, members=k, lr=scaled, active=active)
        if self.scaler is not None:
            self.scaler.update()
        state.observe_errors(
            wrong, self.counter, batch_size=count.view(()), warmup_error=self.warmup_error
        )
        row = (self.counter % self.capacity).view(1)
        self.losses.index_copy_(0, row, seen.view(1, k))
        self.wrong.index_copy_(0, row, wrong.view(1, k))
        self.lrs.index_copy_(0, row, rate.view(1, k))
        self.images.index_copy_(0, row, count.view(1))
        self.counter.add_(1)

    def _grads_finite(self) -> Tensor:
        """``(K,)`` bool: whether all of member m's gradients are finite (fp16 overflow)."""
        ok = torch.ones(self.members, dtype=torch.bool, device=self.device)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    ok &= torch.isfinite(members_view(p.grad, self.members)).flatten(1).all(1)
        return ok

    def _graph_step(
        self, images: Tensor, labels: Tensor, size: tuple[int, int] | int | None
    ) -> None:
        trainable = tuple(p.requires_grad for g in self.optimizer.param_groups for p in g["params"])
        key = (tuple(images.shape), images.dtype, tuple(labels.shape), size, trainable)
        g = self._graph
        if g is None or g.key != key:  # a new shape or freeze point: warm up, capture again
            g = self._graph = _Graph(key, torch.empty_like(images), torch.empty_like(labels))
        g.images.copy_(images, non_blocking=True)
        g.labels.copy_(labels, non_blocking=True)
        self._inputs, self._size = (g.images, g.labels), size
        if g.graph is not None:
            g.graph.replay()
            return
        if g.warm < GRAPH_WARMUP_STEPS:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                self._step(capturing=False)
            torch.cuda.current_stream(self.device).wait_stream(side)
            g.warm += 1
            return
        # capture records the kernels without running them; the gradients the backward pass
        # allocates in the graph's pool are rewritten, not accumulated, by every replay
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(capturing=True)
        g.graph = graph
        graph.replay()  # this step

    # -- the host's side ----------------------------------------------------------------------
    def agree_stop(self) -> bool:
        """Under DDP: whether any rank caught a signal during the last step (every rank gets the
        same answer and stops after the same step). A host synchronisation: DDP's ranks must
        agree each step, so a DDP run reads this every step."""
        return bool(self.stop_flag > 0)

    def read(self) -> StepReport:
        """Synchronise and return the steps since the last read and the members' state."""
        first, n, k = self._read_from, self.step - self._read_from, self.members
        rows = torch.arange(first, self.step, device=self.device) % self.capacity
        s = self.state
        parts = [self.losses[rows].flatten(), self.wrong[rows].flatten(),
                 self.lrs[rows].flatten(), self.images[rows], s.alive, s.failed_step,
                 s.warming]  # fmt: skip
        flat = torch.cat([p.to(torch.float64) for p in parts]).cpu().tolist()  # one transfer
        losses, flat = flat[: n * k], flat[n * k :]
        wrong, flat = flat[: n * k], flat[n * k :]
        lrs, flat = flat[: n * k], flat[n * k :]
        images, flat = flat[:n], flat[n:]
        self._read_from = self.step
        return StepReport(
            first=first,
            losses=[losses[i * k : (i + 1) * k] for i in range(n)],
            wrong=[wrong[i * k : (i + 1) * k] for i in range(n)],
            lrs=[lrs[i * k : (i + 1) * k] for i in range(n)],
            images=[round(v) for v in images],
            alive=[bool(v) for v in flat[:k]],
            failed_step=[round(v) for v in flat[k : 2 * k]],
            warming=[bool(v) for v in flat[2 * k :]],
        )

    def device_tensors(self) -> list[Tensor]:
        """Every tensor the step keeps between calls (a graph's replay reads these addresses)."""
        return [self.counter, self.losses, self.wrong, self.lrs, self.images, self.stop_flag,
                *self.state.tensors(), self.rates]  # fmt: skip
