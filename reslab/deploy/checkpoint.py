"""A trained checkpoint, read for inference: the network, its input and its class names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from reslab.deploy.inputs import InputSpec, input_spec
from reslab.models.pretrained import model_from_weights
from reslab.train.checkpoint import find_checkpoint, read_checkpoint, refuse_packed

__all__ = ["Trained", "load_trained"]


@dataclass
class Trained:
    """What inference needs from a checkpoint. ``run`` is the run folder's ``config.json``
    (``{}`` for a checkpoint on its own): the data it was trained on, for int8 calibration."""

    net: nn.Module
    spec: InputSpec
    classes: list[str]
    path: Path
    meta: dict[str, Any]
    run: dict[str, Any]


def load_trained(source: str | Path, *, image_size: int | None = None) -> Trained:
    """Read a reslab checkpoint (or a run folder's best one) through the validated reader
    (:func:`reslab.train.checkpoint.read_checkpoint`: safe loading, format detection and
    version) and rebuild its network exactly (:func:`reslab.models.pretrained.model_from_weights`:
    its config sized before anything is built)."""
    if not Path(source).exists():
        raise FileNotFoundError(f"no checkpoint or run folder at {source}")
    path = find_checkpoint(Path(source))
    weights = read_checkpoint(path)  # checks the path: missing, a folder, a pipe, not weights
    refuse_packed(weights)
    net = model_from_weights(weights)
    meta = {k: v for k, v in weights.meta.items() if k not in ("optimizer", "rng", "scaler")}
    n = int(meta["model_config"]["num_classes"])
    classes = [str(c) for c in meta.get("classes") or []]
    if len(classes) != n:  # a checkpoint without names: the class indices
        classes = [str(i) for i in range(n)]
    config = path.parent / "config.json"
    try:
        run = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable run record {config}: {exc}") from exc
    spec = input_spec(meta, image_size=image_size)
    return Trained(net, spec, classes, path, meta, run)
