"""Checkpoints: plain dicts of tensors, numbers and strings, loadable with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab._io import atomic_path
from reslab.data.augment import Normalize
from reslab.models import DenseConfig, DenseResNet, ResNetConfig, build_model

__all__ = [
    "BEST",
    "LATEST",
    "find_checkpoint",
    "holds_run",
    "load_checkpoint",
    "load_model",
    "model_record",
    "save_checkpoint",
]

LATEST = "checkpoint_latest.pt"  # the newest state, for --resume
BEST = "checkpoint_best.pt"  # the lowest validation error so far


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a run's checkpoints (a new run there must not start)."""
    return any((Path(run_dir) / name).exists() for name in (LATEST, BEST))


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {exc}") from exc


def find_checkpoint(path: Path, *, prefer: str = BEST) -> Path:
    """A checkpoint file itself, or the preferred one (else the latest) in a run folder."""
    if path.is_dir():
        for name in (prefer, LATEST):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"no checkpoint ({prefer} or {LATEST}) in {path}")
    return path


def model_record(model: nn.Module) -> dict[str, Any]:
    """The entries that rebuild ``model``: its weights (no ``module.``/``_orig_mod.`` prefix since
    the raw module is saved), config, kind and input normalisation."""
    kind = "dense" if isinstance(model, DenseResNet) else "resnet"
    norm = getattr(model, "input_norm", None)
    return {
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "model_kind": kind,
        "normalization": norm.to_dict() if norm is not None else None,
    }


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the network saved in a checkpoint (or a run folder's best checkpoint), in eval mode.

    The returned model carries ``input_norm`` (the training set's normalisation), which
    :func:`reslab.train.evaluate` applies to uint8 images.
    """
    ckpt = load_checkpoint(find_checkpoint(Path(path)))
    config_cls = DenseConfig if ckpt["model_kind"] == "dense" else ResNetConfig
    model = build_model(config_cls.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    if ckpt.get("normalization") is not None:
        model.input_norm = Normalize.from_dict(ckpt["normalization"])
    return model.eval()
