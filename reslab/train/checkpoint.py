"""Checkpoints: plain dicts of tensors, numbers and strings, loadable with ``weights_only=True``.

Every checkpoint reslab writes carries ``format_version`` (:data:`FORMAT_VERSION`); a reader
refuses versions newer than it knows. Version 1 is the layout before the field existed (files
without it); version 2 keeps the training data's position under ``batches``; version 3 adds
``input_config`` (:class:`~reslab.data.InputConfig`: what evaluation, ``predict`` and export do
to an image) and keeps the data position as (epoch, batch) instead of a permutation.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab._io import save_torch
from reslab.data.augment import Normalize
from reslab.data.presets import InputConfig
from reslab.models import DenseConfig, DenseResNet, ResNetConfig
from reslab.models.pretrained import checkpoint_config, model_from_weights
from reslab.models.weights import Weights, read_weights
from reslab.train.step import NonFiniteLossError

__all__ = [
    "BEST",
    "FORMAT_VERSION",
    "LATEST",
    "check_format_version",
    "find_checkpoint",
    "holds_run",
    "load_checkpoint",
    "load_model",
    "model_config",
    "model_from_checkpoint",
    "model_record",
    "non_finite_tensors",
    "read_checkpoint",
    "refuse_packed",
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


def non_finite_tensors(tree: Any, name: str = "") -> list[str]:
    """Where ``tree`` (a checkpoint: nested dicts and lists of tensors) holds a floating-point
    tensor with a NaN or infinity, as dotted names (``model.fc.weight``,
    ``optimizer.state.3.momentum_buffer``)."""
    if isinstance(tree, torch.Tensor):
        finite = not tree.is_floating_point() or bool(torch.isfinite(tree).all())
        return [] if finite else [name or "tensor"]
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)  # type: ignore[assignment]
    else:
        return []
    return [
        bad for k, v in items for bad in non_finite_tensors(v, f"{name}.{k}" if name else str(k))
    ]


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file,
    and a failed write is a :class:`~reslab._io.WriteError` naming ``path`` and the reason.

    A state with non-finite weights or optimiser buffers (a diverged step) is never written: it
    raises :class:`~reslab.train.step.NonFiniteLossError` and the file keeps its last good state.
    """
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteLossError(
            f"not writing {path}: non-finite values in {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''} (the run diverged)"
        )
    save_torch(state, path)


def read_checkpoint(path: Path) -> Weights:
    """The reslab checkpoint at ``path``, read by the one validated reader every checkpoint and
    weight file goes through (:func:`reslab.models.weights.read_weights`: a folder, named pipe
    or device is refused by name, nothing is unpickled beyond tensors and plain data, a damaged
    file is named), then checked to be a reslab checkpoint of a format version this reslab
    reads (:func:`check_format_version`) whose ``model_config`` parses and is small enough to
    build (:func:`reslab.models.pretrained.checkpoint_config`). Non-finite weights (not written
    by this reslab, which refuses to) are read with a warning."""
    weights = read_weights(path)
    if weights.format != "reslab":
        raise ValueError(
            f"{path} is a {weights.format} state dict, not a reslab checkpoint: it has no "
            "architecture, classes or training state (fine-tune from it: reslab finetune "
            f"--from {path} --model NAME --data ...)"
        )
    weights.meta = check_format_version(weights.meta, path)
    checkpoint_config(weights)  # parses and is not too large to build (from its numbers alone)
    bad = non_finite_tensors(weights.state_dict)
    if bad:
        warnings.warn(
            f"{path} holds non-finite weights ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): the network's outputs will not be numbers",
            stacklevel=2,
        )
    return weights


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (:func:`read_checkpoint`) as the dict that was saved, on the
    CPU, in the current format (:data:`FORMAT_VERSION`)."""
    weights = read_checkpoint(Path(path))
    return {"model": weights.state_dict, **weights.meta}


def check_format_version(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """A reslab checkpoint's entries (all but its weights) in the current format: versions up
    to :data:`FORMAT_VERSION` are upgraded, a newer one is refused (it was written by a newer
    reslab whose layout this one would misread)."""
    version = meta.get("format_version", 1)  # files from before the field are version 1
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        import reslab

        raise ValueError(
            f"{path} has checkpoint format version {version!r}; this reslab "
            f"({reslab.__version__}) reads versions 1 to {FORMAT_VERSION}: it was written by a "
            "newer reslab, upgrade to read it"
        )
    meta = dict(meta)
    if version == 1 and "perm" in meta:  # version 1 kept the data order at the top level
        meta["batches"] = {"perm": meta.pop("perm")}
    meta["format_version"] = FORMAT_VERSION
    return meta


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


def refuse_packed(weights: Weights) -> None:
    """A seed-packed run's own checkpoint holds K networks in one: refused where one network is
    wanted, naming the member folders beside it, which hold ordinary checkpoints."""
    packed = weights.meta.get("packed")
    if packed is not None:
        members = ", ".join(f"seed-{s}" for s in packed["seeds"])
        raise ValueError(
            f"{weights.path} is the state of a seed-packed run (K networks in one); each member "
            f"is an ordinary run in a folder beside it ({members}): load one of those"
        )


def model_from_checkpoint(weights: Weights) -> nn.Module:
    """The network of a checkpoint :func:`read_checkpoint` returned, with exactly its weights
    (:func:`reslab.models.pretrained.model_from_weights`: its config checked and sized before
    anything is built, every tensor fitting it), its input config (format 3 on; else None) and
    input normalisation, in eval mode."""
    refuse_packed(weights)
    model = model_from_weights(weights)
    model.input_config = None  # type: ignore[assignment]  # as in set_input_norm
    if weights.meta.get("input_config") is not None:
        set_input(model, InputConfig.from_dict(weights.meta["input_config"]))
    elif weights.meta.get("normalization") is not None:
        set_input_norm(model, Normalize.from_dict(weights.meta["normalization"]))
    return model.eval()


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the network saved in a checkpoint (or a run folder's best checkpoint), in eval mode.

    The returned model carries ``input_norm`` (the training set's normalisation), which
    :func:`reslab.train.evaluate` applies to uint8 images, and, for checkpoints of format 3 on,
    ``input_config`` (the evaluation transform of training; None in older ones). Every failure
    names the file and says what it is (:func:`read_checkpoint`, :func:`model_from_checkpoint`).
    """
    return model_from_checkpoint(read_checkpoint(find_checkpoint(Path(path))))
