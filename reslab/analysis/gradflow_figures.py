"""Figures of the gradient-flow experiment: ratios against depth, and per-layer profiles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reslab.analysis.common import new_figure, save_figure

__all__ = ["plot_conv_sweep", "plot_dense_sweep", "plot_profiles"]

METRICS = (
    ("first_last_ratio", "|dL/dW_first| / |dL/dW_last|"),
    ("block_ratio", "|dL/dx_first unit| / |dL/dx_last unit|"),
)


def _finite(v: float | None) -> float:
    return float("nan") if v is None or v == 0 else v  # 0: underflow, off a log axis


def plot_dense_sweep(
    rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "gradflow_dense_depth.png"
) -> Path:
    """One column per activation; top: weight-gradient ratio, bottom: activation-gradient ratio."""
    activations = sorted({r["activation"] for r in rows}, key=["sigmoid", "tanh", "relu"].index)
    fig, axes = new_figure(ncols=len(activations), nrows=2, size=(4.2, 3.4))
    for col, act in enumerate(activations):
        keys = sorted({(r["family"], r["gain"]) for r in rows if r["activation"] == act})
        for row_i, (metric, ylabel) in enumerate(METRICS):
            ax = axes[row_i][col]
            for family, gain in keys:
                sel = sorted(
                    (
                        r
                        for r in rows
                        if (r["activation"], r["family"], r["gain"]) == (act, family, gain)
                    ),
                    key=lambda r: r["depth"],
                )
                ax.plot(
                    [r["depth"] for r in sel],
                    [_finite(r[metric]) for r in sel],
                    "o-" if family == "residual" else "s--",
                    label=f"{family}, gain {gain:g}",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"dense, {act}, no normalisation", fontsize=9)
            ax.set_xlabel("layers L")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.legend(fontsize=6)
    return save_figure(fig, out_dir, name)


def plot_conv_sweep(
    rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "gradflow_conv_depth.png"
) -> Path:
    """Columns: with BN / BN removed; rows: weight- and activation-gradient ratios."""
    fig, axes = new_figure(ncols=2, nrows=2, size=(4.6, 3.4))
    for col, norm in enumerate((True, False)):
        for row_i, (metric, ylabel) in enumerate(METRICS):
            ax = axes[row_i][col]
            for family in ("plain", "resnet", "preact"):
                sel = sorted(
                    (r for r in rows if r["family"] == family and r["norm"] == norm),
                    key=lambda r: r["depth"],
                )
                if sel:
                    ax.plot(
                        [r["depth"] for r in sel],
                        [_finite(r[metric]) for r in sel],
                        "o-",
                        label=family,
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"CIFAR nets at init, {'with BN' if norm else 'BN removed'}", fontsize=9)
            ax.set_xlabel("layers")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def plot_profiles(
    profiles: dict[str, dict[str, Any]], out_dir: Path, name: str, title: str
) -> Path:
    """Per-weight-layer ``||dL/dW||`` against layer index, one line per network."""
    fig, axes = new_figure(size=(6.0, 3.8))
    ax = axes[0][0]
    for label, prof in profiles.items():
        ys = [w["weight_grad_norm"] for w in prof["weights"]]
        ax.plot(range(1, len(ys) + 1), ys, label=label, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("weight layer (forward order)")
    ax.set_ylabel("|dL/dW|")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)
