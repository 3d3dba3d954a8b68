"""DistributedDataParallel plumbing: torchrun's environment, SyncBatchNorm that runs on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["CPUSyncBatchNorm", "DistInfo", "convert_sync_batchnorm", "setup_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*):
    NCCL on GPUs, gloo on CPUs. A single process returns rank 0 of 1 and initialises nothing."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the mean and variance over every rank's batch.

    ``nn.SyncBatchNorm`` refuses CPU tensors; this computes the same thing with a differentiable
    all-reduce of per-channel (sum, sum of squares, count), so gloo runs can use it. Parameter and
    buffer names equal BatchNorm2d's, so state dicts are interchangeable.
    """

    group: dist.ProcessGroup | None = None  # set by convert_sync_batchnorm

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        c, group = x.shape[1], self.group or dist.group.WORLD
        count = torch.full((1,), xf.numel() / c, device=x.device)
        # Two passes (mean, then squared deviations) as BatchNorm2d does: E[x^2] - E[x]^2 loses
        # the variance of near-constant channels to cancellation, which the next steps amplify.
        # Each all-reduce sums over ranks; its backward all-reduces the gradient, so the
        # gradient reaches every rank's part of the batch.
        totals = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]), group=group)
        n = totals[-1]
        mean = totals[:c] / n
        centred = xf - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum((0, 2, 3)), group=group) / n
        run_mean, run_var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        if self.track_running_stats and run_mean is not None:
            assert run_var is not None and tracked is not None  # tracked together by BatchNorm
            with torch.no_grad():
                tracked.add_(1)
                # momentum None: BatchNorm2d's cumulative average over the batches seen so far
                m = self.momentum
                if m is None:
                    m = 1.0 / float(tracked)
                run_mean.lerp_(mean.detach(), m)
                run_var.lerp_(var.detach() * n / (n - 1), m)
        shape = (1, c, 1, 1)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, *, cuda: bool) -> nn.Module:
    """Swap every BatchNorm2d for a synchronised one (torch's on CUDA, :class:`CPUSyncBatchNorm`
    on CPU), keeping weights and running statistics."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # A group of its own: statistics all-reduced inside autograd must not interleave with DDP's
    # asynchronous gradient buckets on one gloo group (that mixed them up: 3% wrong gradients).
    group = dist.new_group(backend="gloo")
    assert isinstance(group, dist.ProcessGroup)  # every rank is a member
    _convert_cpu(model, group)
    return model


def _convert_cpu(model: nn.Module, group: dist.ProcessGroup) -> None:
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CPUSyncBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            new.to(next(child.buffers()).device)
            new.group = group
            setattr(model, name, new)
        else:
            _convert_cpu(child, group)
