"""Before the first step: the device and process group, the model on them, the run folder's
owner, and the checks that a fresh run may start in a folder or a resumed one may continue."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from reslab._io import LOCK_NAME, FolderLock
from reslab.data import InputConfig, Normalize
from reslab.data.training import TrainingData
from reslab.train.checkpoint import (
    BEST,
    LATEST,
    holds_run,
    load_checkpoint,
    model_config,
    set_input,
)
from reslab.train.config import TrainConfig
from reslab.train.distributed import DistInfo, convert_sync_batchnorm, setup_distributed
from reslab.train.outputs import RUN_FILES, files_not_of_a_run, read_run_config

__all__ = [
    "Placement",
    "check_optimizer",
    "data_identity",
    "own_run_folder",
    "place",
    "prepare_model",
    "refuse_occupied",
    "resolve_device",
    "resume_checkpoint",
    "wrap_model",
]

FINGERPRINT_IMAGES = 64  # images per split hashed into the data's fingerprint, evenly spaced


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
    """Move ``model`` to the device in the configured memory layout, turn on its gradient
    checkpointing and synchronise its BatchNorm over the ranks if asked, and attach ``input_cfg``
    (the evaluation transform and the normalisation that evaluation and saved checkpoints apply
    to uint8 images) as ``input_config`` and ``input_norm``. Returns that normalisation."""
    model.to(where.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        enable = getattr(model, "set_grad_checkpointing", None)
        if not callable(enable):
            raise ValueError(
                f"--grad-checkpointing: {type(model).__name__} has no set_grad_checkpointing "
                "(the convolutional ResNets have it)"
            )
        enable(True)
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


def data_identity(data: TrainingData) -> dict[str, Any]:
    """What a run records of its data (config.json's ``data``, and each checkpoint's) and what a
    resume must match: the class names, the split sizes and a fingerprint, a SHA-256 of each
    split's labels and of up to :data:`FINGERPRINT_IMAGES` of its images, evenly spaced (in
    memory: cheap for any size, yet other images of the same count and classes differ), or of
    its file names and sizes (streamed: nothing is decoded)."""
    digest = hashlib.sha256()
    sizes = {}
    for name in ("train", "val", "test"):
        sizes[name] = data.split_size(name)
        digest.update(f"{name}:{sizes[name]}".encode())
        for part in data.fingerprint(name, FINGERPRINT_IMAGES):
            digest.update(part)
    return {
        "name": data.name,
        "classes": list(data.classes),
        **sizes,
        "fingerprint": digest.hexdigest()[:32],
    }


def own_run_folder(
    out_dir: Path, where: Placement, *, resume: bool, allow_nonempty: bool = False
) -> FolderLock | None:
    """Rank 0 takes ``out_dir``'s lock (:class:`reslab._io.FolderLock`) before anything is
    written there and, for a fresh run, checks that the folder may hold it
    (:func:`refuse_occupied`). Every rank learns the outcome, so none waits at the first
    collective for a rank 0 that has stopped. Returns rank 0's lock (None on other ranks)."""
    lock, error = None, None
    if where.dist.is_main:
        try:
            if not resume:  # a refused folder is left exactly as it was: no lock file made
                refuse_occupied(out_dir, allow_nonempty=allow_nonempty)
            lock = FolderLock(out_dir).acquire()
            if not resume:
                refuse_occupied(out_dir, allow_nonempty=allow_nonempty, lock=lock)
        except (OSError, ValueError) as exc:
            if lock is not None:
                lock.release()
            lock, error = None, exc
    if where.dist.world_size > 1:
        ok = torch.tensor([0.0 if error else 1.0], device=where.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item() and error is None:
            raise RuntimeError(f"rank 0 cannot train in the run folder {out_dir} (see its error)")
    if error is not None:
        raise error
    return lock


def _differences(was: dict[str, Any], now: dict[str, Any]) -> str:
    keys = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    return ", ".join(f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in keys[:4]) + (
        ", ..." if len(keys) > 4 else ""
    )


def _check_model(out_dir: Path, ckpt: dict[str, Any], model: nn.Module) -> None:
    was, now = ckpt.get("model_config"), model_config(model).to_dict()
    if was is not None and was != now:
        raise ValueError(
            f"cannot resume {out_dir} with another network: {_differences(was, now)} (resume "
            "with the network of its checkpoint, reslab.train.checkpoint.load_model)"
        )
    saved, own = ckpt["model"], model.state_dict()
    wrong = [k for k in own if k not in saved or tuple(saved[k].shape) != tuple(own[k].shape)]
    wrong += [k for k in saved if k not in own]
    if wrong:
        raise ValueError(
            f"cannot resume {out_dir}: its checkpoint's weights do not fit this network "
            f"({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})"
        )


def check_optimizer(out_dir: Path, ckpt: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """The resumed run builds the optimiser parameter groups its checkpoint saved."""
    was = [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]]
    now = [len(g["params"]) for g in optimizer.param_groups]
    if was != now:
        raise ValueError(
            f"cannot resume {out_dir}: its optimiser had parameter groups of {was} tensors, this "
            f"run builds {now} (a fine-tuning run resumes with `reslab finetune --resume`, and "
            "the same freeze and learning-rate options)"
        )


def _check_data(out_dir: Path, ckpt: dict[str, Any], data: dict[str, Any]) -> None:
    was = ckpt.get("data")
    if was is None:  # written before checkpoints recorded their data: what config.json says
        try:
            was = read_run_config(out_dir).get("data")
        except (OSError, ValueError):
            was = None
    was = dict(was or {})
    if "classes" in ckpt:
        was.setdefault("classes", ckpt["classes"])
    keys = [k for k in ("classes", "train", "val", "test", "fingerprint") if k in was]
    if any(was[k] != data.get(k) for k in keys):
        diff = _differences({k: was[k] for k in keys}, {k: data.get(k) for k in keys})
        raise ValueError(
            f"cannot resume {out_dir}: the data is not the data it was trained on ({diff}); "
            "resume with the run's own data, classes and validation split"
        )


def resume_checkpoint(
    out_dir: Path,
    cfg: TrainConfig,
    total: int,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The latest checkpoint of the run in ``out_dir``, after checking everything the resumed run
    is given against it, before anything is written: ``cfg`` (same batch size; at least as many
    steps as it has done), the ``model`` (same config, weights of the same names and shapes),
    the ``optimizer``'s parameter groups, and the ``data`` (its :func:`data_identity`: classes,
    split sizes and fingerprint)."""
    path = out_dir / LATEST
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt or "train_config" not in ckpt:
        raise ValueError(f"{path} holds weights only, not a training run's state to resume")
    if model is not None:
        _check_model(out_dir, ckpt, model)
    if optimizer is not None:
        check_optimizer(out_dir, ckpt, optimizer)
    if data is not None:
        _check_data(out_dir, ckpt, data)
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


def refuse_occupied(
    out_dir: Path, *, allow_nonempty: bool = False, lock: FolderLock | None = None
) -> None:
    """Whether a fresh run may start in ``out_dir``; refuses, losing nothing, where it would
    replace what it did not write.

    - A folder holding a run's checkpoints: a fresh run would mix its checkpoints with the old
      run's (eval would pick the old best) and a later --resume could continue the wrong weights.
    - Files named as a run's outputs (config.json, metrics.jsonl, ...) in a folder without
      reslab's lock file: not written by reslab, so they would be lost. (With the lock file they
      are what a run left before its first checkpoint, and are replaced.) ``lock``: this
      process's lock on the folder, which knows whether the lock file was there before it.
    - Any other file, unless ``allow_nonempty``: a run folder is the run's; with it, such files
      are kept as they are.
    """
    if holds_run(out_dir):
        raise FileExistsError(
            f"run folder {out_dir} already holds a run ({LATEST} or {BEST}); continue it with "
            f"`--resume {out_dir}` (of `reslab train` or `reslab finetune`, whichever started "
            f"it), or train into another --out folder"
        )
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"run folder {out_dir} is a file, not a folder")
    names = {e.name for e in out_dir.iterdir()}
    clash = sorted(names & set(RUN_FILES) | {n for n in names if n.startswith("events.out.")})
    marked = lock.found if lock is not None else LOCK_NAME in names
    if clash and not marked:
        raise FileExistsError(
            f"run folder {out_dir} holds {', '.join(clash)}, which reslab did not write there "
            "and a new run would replace: move them away, or choose another --out folder"
        )
    others = files_not_of_a_run(out_dir)
    if others and not allow_nonempty:
        shown = ", ".join(others[:3]) + (f" (+{len(others) - 3} more)" if len(others) > 3 else "")
        raise FileExistsError(
            f"run folder {out_dir} is not empty ({shown}): pass --allow-nonempty to train into it "
            "anyway (its files are kept, never replaced), or choose another --out folder"
        )
