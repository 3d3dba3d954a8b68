"""What a run leaves in its folder: config.json, metrics.jsonl, summary.json, curves.png."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from reslab._io import atomic_path

__all__ = ["Progress", "append_metrics", "git_revision", "plot_curves", "write_json"]


def git_revision() -> str:
    """HEAD of the checkout reslab runs from, with "+dirty" for uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+dirty" if dirty else "")) if rev else "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "git_revision": git_revision(),
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "device": str(device),
        "device_name": name or platform.machine(),
        "num_threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def plot_curves(history: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Training (dashed) and test (bold) error against iterations, as He et al. 2015, Fig. 6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(steps, [100 * h["train_error"] for h in history], "--", lw=1, label="train")
    for key, style, label in (("val_error", ":", "val"), ("test_error", "-", "test")):
        pts = [(h["step"], 100 * h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, lw=2 if key == "test_error" else 1, label=label)
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    if steps and max(steps) >= 10_000:
        ax.ticklabel_format(axis="x", style="sci", scilimits=(4, 4))
    ax.set_ylim(0, min(100, 5 + max(100 * h["train_error"] for h in history)) if history else 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


class Progress:
    """A one-line progress bar on a terminal (loss, error, lr, ETA); silent otherwise."""

    def __init__(self, total: int, start: int = 0, *, enabled: bool | None = None) -> None:
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.last = 0.0

    def update(self, step: int, loss: float, error: float, lr: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and step < self.total):
            return
        self.last = now
        done = (step - self.start) / max(1, self.total - self.start)
        eta = (now - self.t0) * (1 - done) / done if done > 0 else 0.0
        bar = "#" * int(24 * step / self.total)
        sys.stderr.write(
            f"\r[{bar:<24}] {step}/{self.total} loss {loss:.3f} err {100 * error:5.1f}% "
            f"lr {lr:.3g} ETA {int(eta) // 60}:{int(eta) % 60:02d} "
        )
        sys.stderr.flush()

    def newline(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
