"""What every experiment shares: figure output, tables, input batches.

Every result file records reslab's version and commit, library versions and device through
:func:`reslab.record.run_record` and is written by :func:`reslab.record.write_json`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from reslab._io import atomic_path

if TYPE_CHECKING:
    from reslab.data import DataSplits

__all__ = [
    "Batch",
    "format_table",
    "input_shape",
    "load_splits",
    "new_figure",
    "sample_batch",
    "save_figure",
    "to_float",
]

Batch = tuple[Tensor, Tensor]


def to_float(x: Tensor | float) -> float:
    return float(x.detach().double().item()) if isinstance(x, Tensor) else float(x)


def new_figure(
    ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 3.6)
) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False
    )
    return fig, axes


def save_figure(fig: Any, out_dir: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table; floats are shown with 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if not math.isfinite(v) else f"{v:.4g}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """A natural input for a network: 8x8 digits for dense nets, 32x32 (CIFAR stem) or 224x224."""
    cfg = getattr(model, "config", None)
    widths = getattr(cfg, "widths", None)
    if hasattr(cfg, "tau_mode") and widths is not None:
        n = widths[0]
        side = math.isqrt(n)
        return (1, side, side) if side * side == n else (1, 1, n)
    if cfg is not None and getattr(cfg, "stem", None) == "cifar":
        return (cfg.in_channels, 32, 32)
    return (getattr(cfg, "in_channels", 3), 224, 224)


def load_splits(spec: str, **kw: Any) -> DataSplits:
    """The trainer's data loader (``reslab.data.load_data``), imported when first needed."""
    from reslab.data import load_data

    return load_data(spec, **kw)


def sample_batch(
    model: nn.Module,
    batch_size: int,
    *,
    data: str | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, str]:
    """Inputs and labels for a gradient measurement and a note saying where they came from.

    With ``data`` (e.g. ``"digits"``) the first training images are standardised per channel; the
    images must match the model's input. Otherwise the inputs are N(0, 1) and the labels uniform:
    gradient norms at initialisation depend on the architecture, not on what the pixels show.
    """
    g = torch.Generator().manual_seed(seed)
    classes = num_classes or getattr(getattr(model, "config", None), "num_classes", 10) or 10
    if data is not None:
        from reslab.data import Normalize

        splits = load_splits(data, seed=seed)
        split = splits.train
        idx = torch.randperm(len(split.labels), generator=g)[:batch_size]
        x = Normalize.fit(split.images, "channel")(split.images[idx]).to(dtype)
        return (
            x,
            split.labels[idx],
            f"{splits.name} (train, {batch_size} images, channel-normalised)",
        )
    shape = input_shape(model)
    x = torch.randn(batch_size, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (batch_size,), generator=g)
    return x, y, f"gaussian N(0,1) {tuple(shape)}, uniform labels"
