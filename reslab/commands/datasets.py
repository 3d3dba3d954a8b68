"""How the commands read a run's data: the model's input, the report of what was read, and a
run's data read again as it was (for ``--resume`` and ``reslab eval``)."""

from __future__ import annotations

import sys
from typing import Any

from reslab.data import InputConfig
from reslab.data.reading import open_data
from reslab.data.training import TrainingData
from reslab.models import ResNetConfig, default_cfg, get_config

__all__ = ["model_input", "reopen_data", "say_data"]


def model_input(name: str) -> dict[str, Any] | None:
    """The registered model's input (timm's ``default_cfg``: size, crop ratio, interpolation),
    the default geometry of streamed data; None for dense networks, sized by the data."""
    config = get_config(name)
    return default_cfg(config) if isinstance(config, ResNetConfig) else None


def say_data(data: TrainingData, *, err: bool = False) -> None:
    """How the data is read: the loader reslab picked and why, the input, and where val/test
    came from."""
    out = sys.stderr if err else sys.stdout
    h, w = data.image_size
    print(f"data: {data.name}: loader {data.loader}; input {h}x{w}", file=out, flush=True)
    for line in data.notes:
        print(f"data: {line}", file=out, flush=True)
    if data.skipped:
        print(f"data: skipped {len(data.skipped)} unreadable image(s): "
              + "; ".join(f"{w} ({r})" for w, r in data.skipped[:5]), file=out,
              flush=True)  # fmt: skip


def reopen_data(
    spec: str,
    saved: dict[str, Any],
    input_config: dict[str, Any] | None,
    *,
    classes: list[str] | None = None,
    **given: Any,
) -> TrainingData:
    """A run's data read as the run read it (its config.json ``saved``: the loader, the
    validation split's size and seed, skip_bad) at the input of its checkpoint; ``given``
    (loader, skip_bad, workers) overrides."""
    opts = {**saved.get("data_options", {}), **{k: v for k, v in given.items() if v is not None}}
    opts.pop("image_size", None), opts.pop("resize", None)  # the checkpoint's input decides
    if input_config is None:  # a checkpoint from before input configs: in memory, own size
        opts.pop("loader", None)
    return open_data(
        spec,
        input=InputConfig.from_dict(input_config) if input_config is not None else None,
        val_size=saved.get("val_size"),
        seed=saved.get("data_seed", 0),
        classes=classes if classes is not None else saved.get("classes"),
        train_fraction=saved.get("train_fraction") or 1.0,
        **opts,
    )
