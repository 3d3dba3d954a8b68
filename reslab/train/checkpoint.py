"""Checkpoints: plain dicts of tensors, numbers and strings, loadable with ``weights_only=True``.

Every checkpoint reslab writes carries ``format_version`` (:data:`FORMAT_VERSION`); a reader
refuses versions newer than it knows. Version 1 is the layout before the field existed (files
without it); version 2 keeps the training data's position under ``batches``; version 3 adds
``input_config`` (:class:`~reslab.data.InputConfig`: what evaluation, ``predict`` and export do
to an image) and keeps the data position as (epoch, batch) instead of a permutation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab._io import atomic_path
from reslab.data.augment import Normalize
from reslab.data.presets import InputConfig
from reslab.models import DenseConfig, DenseResNet, ResNetConfig, build_model

__all__ = [
    "BEST",
    "FORMAT_VERSION",
    "LATEST",
    "find_checkpoint",
    "holds_run",
    "load_checkpoint",
    "load_model",
    "model_config",
    "model_record",
    "save_checkpoint",
    "set_input",
    "set_input_norm",
]

LATEST = "checkpoint_latest.pt"  # the newest state, for --resume
BEST = "checkpoint_best.pt"  # the lowest validation error so far
FORMAT_VERSION = 3


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a run's checkpoints (a new run there must not start)."""
    return any((Path(run_dir) / name).exists() for name in (LATEST, BEST))


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` on the CPU, in the current format (:data:`FORMAT_VERSION`)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a reslab checkpoint (it holds a {type(ckpt).__name__})")
    return _upgrade(ckpt, path)


def _upgrade(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    version = ckpt.get("format_version", 1)  # files from before the field are version 1
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        import reslab

        raise ValueError(
            f"{path} has checkpoint format version {version!r}; this reslab "
            f"({reslab.__version__}) reads versions 1 to {FORMAT_VERSION}: it was written by a "
            "newer reslab, upgrade to read it"
        )
    if version == 1 and "perm" in ckpt:  # version 1 kept the data order at the top level
        ckpt["batches"] = {"perm": ckpt.pop("perm")}
    ckpt["format_version"] = FORMAT_VERSION
    return ckpt


def find_checkpoint(path: Path, *, prefer: str = BEST) -> Path:
    """A checkpoint file itself, or the preferred one (else the latest) in a run folder."""
    if path.is_dir():
        for name in (prefer, LATEST):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"no checkpoint ({prefer} or {LATEST}) in {path}")
    return path


def model_config(model: nn.Module) -> ResNetConfig | DenseConfig:
    """The config a reslab network was built from (its ``config``)."""
    config = getattr(model, "config", None)
    if not isinstance(config, ResNetConfig | DenseConfig):
        raise TypeError(f"{type(model).__name__} is not a reslab network: it has no config")
    return config


def set_input_norm(model: nn.Module, norm: Normalize) -> None:
    """Attach the normalisation of uint8 inputs that evaluation and checkpoints carry."""
    model.input_norm = norm  # type: ignore[assignment]  # nn.Module's typing: Tensor/Module only


def set_input(model: nn.Module, cfg: InputConfig) -> None:
    """Attach the input a network takes (``input_config``) and its normalisation (``input_norm``),
    both carried by its checkpoints."""
    model.input_config = cfg  # type: ignore[assignment]  # as in set_input_norm
    set_input_norm(model, cfg.normalizer())


def model_record(model: nn.Module) -> dict[str, Any]:
    """The entries that rebuild ``model``: its weights (no ``module.``/``_orig_mod.`` prefix since
    the raw module is saved), config, kind and input normalisation."""
    kind = "dense" if isinstance(model, DenseResNet) else "resnet"
    norm = getattr(model, "input_norm", None)
    cfg = getattr(model, "input_config", None)
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "model_config": model_config(model).to_dict(),
        "model_kind": kind,
        "normalization": norm.to_dict() if norm is not None else None,
        "input_config": cfg.to_dict() if cfg is not None else None,
    }


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the network saved in a checkpoint (or a run folder's best checkpoint), in eval mode.

    The returned model carries ``input_norm`` (the training set's normalisation), which
    :func:`reslab.train.evaluate` applies to uint8 images, and, for checkpoints of format 3 on,
    ``input_config`` (the evaluation transform of training; None in older ones).
    """
    file = find_checkpoint(Path(path))
    ckpt = load_checkpoint(file)
    if "packed" in ckpt:  # a seed-packed run's own state, not one network
        members = ", ".join(f"seed-{s}" for s in ckpt["packed"]["seeds"])
        raise ValueError(
            f"{file} is the state of a seed-packed run (K networks in one); each member is an "
            f"ordinary run in a folder beside it ({members}): load one of those"
        )
    config_cls = DenseConfig if ckpt["model_kind"] == "dense" else ResNetConfig
    model = build_model(config_cls.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.input_config = None  # type: ignore[assignment]  # as in set_input_norm
    if ckpt.get("input_config") is not None:
        set_input(model, InputConfig.from_dict(ckpt["input_config"]))
    elif ckpt.get("normalization") is not None:
        set_input_norm(model, Normalize.from_dict(ckpt["normalization"]))
    return model.eval()
