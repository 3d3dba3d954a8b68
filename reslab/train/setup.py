"""Before the first step: the device and process group, the model on them, resume checks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.data import InputConfig, Normalize
from reslab.train.checkpoint import BEST, LATEST, holds_run, load_checkpoint, set_input
from reslab.train.config import TrainConfig
from reslab.train.distributed import DistInfo, convert_sync_batchnorm, setup_distributed

__all__ = [
    "Placement",
    "place",
    "prepare_model",
    "refuse_occupied",
    "resolve_device",
    "resume_checkpoint",
    "wrap_model",
]


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its device and its rank among the DDP processes."""

    device: torch.device
    dist: DistInfo


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` (CUDA where present), ``"cpu"``, ``"cuda"`` (this rank's GPU) or ``"cuda:N"``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def place(cfg: TrainConfig) -> Placement:
    """Join torchrun's process group (if any), pick this rank's device, set the thread count."""
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank would take that one GPU (NCCL refuses two ranks on one device)
        raise ValueError(
            f"--device {cfg.device} under torchrun: pass --device cuda, and each rank takes the "
            "GPU of its LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    dinfo = setup_distributed(use_cuda)
    if cfg.batch_size % dinfo.world_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} is not divisible by {dinfo.world_size} ranks"
        )
    device = resolve_device(cfg.device, dinfo.local_rank)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Placement(device, dinfo)


def prepare_model(
    model: nn.Module, cfg: TrainConfig, where: Placement, input_cfg: InputConfig
) -> Normalize:
    """Move ``model`` to the device in the configured memory layout, synchronise its BatchNorm
    over the ranks if asked, and attach ``input_cfg`` (the evaluation transform and the
    normalisation that evaluation and saved checkpoints apply to uint8 images) as
    ``input_config`` and ``input_norm``. Returns that normalisation."""
    model.to(where.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and where.dist.world_size > 1:
        convert_sync_batchnorm(model, cuda=where.device.type == "cuda")
    set_input(model, input_cfg)
    return model.input_norm  # type: ignore[return-value]  # set just above


def wrap_model(model: nn.Module, cfg: TrainConfig, where: Placement) -> nn.Module:
    """The module the training step calls: DDP across ranks, then ``torch.compile``. The raw
    ``model`` stays what is evaluated and saved (no ``module.``/``_orig_mod.`` prefixes)."""
    train_model: nn.Module = model
    if where.dist.world_size > 1:
        device = where.device
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model, mode=cfg.compile_mode)  # type: ignore[assignment]
    return train_model


def resume_checkpoint(out_dir: Path, cfg: TrainConfig, total: int) -> dict[str, Any]:
    """The latest checkpoint of the run in ``out_dir``, after checking that ``cfg`` can continue
    it (same batch size; at least as many steps as it has done)."""
    path = out_dir / LATEST
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt or "train_config" not in ckpt:
        raise ValueError(f"{path} holds weights only, not a training run's state to resume")
    was = ckpt["train_config"]["batch_size"]
    if was != cfg.batch_size:  # the saved permutation and position count in its batches
        raise ValueError(
            f"cannot resume {out_dir} with batch size {cfg.batch_size}: it was trained with "
            f"{was}, and its position in the epoch is counted in those batches"
        )
    if int(ckpt["step"]) > total:  # it would "finish" at once and report the wrong length
        raise ValueError(
            f"cannot resume {out_dir} at step {ckpt['step']} into a run of {total} steps: "
            "ask for at least as many (--iters/--epochs)"
        )
    return ckpt


def refuse_occupied(out_dir: Path) -> None:
    """A fresh run would mix its checkpoints with an old run's (eval would pick the old best) and
    a later --resume could continue the wrong weights: refuse, lose nothing."""
    if holds_run(out_dir):
        raise FileExistsError(
            f"run folder {out_dir} already holds a run ({LATEST} or {BEST}); continue it with "
            f"`--resume {out_dir}` (of `reslab train` or `reslab finetune`, whichever started "
            f"it), or train into another --out folder"
        )
