"""What a run leaves in its folder: config.json, metrics.jsonl, checkpoints, TensorBoard events,
summary.json and curves.png. Rank 0 writes; metrics.jsonl is the record, TensorBoard a view."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

from reslab._io import atomic_path
from reslab.record import jsonable, write_json
from reslab.train.checkpoint import BEST, LATEST, model_record, save_checkpoint
from reslab.train.config import TrainConfig
from reslab.train.state import RunState

__all__ = ["TENSORBOARD_TAGS", "RunFolder", "append_metrics", "curves_figure", "plot_curves"]

# metrics.jsonl key -> TensorBoard tag; the "error/" tags share one section of the dashboard
TENSORBOARD_TAGS = {
    "loss": "loss/train",
    "train_error": "error/train",
    "val_error": "error/val",
    "test_error": "error/test",
    "lr": "lr",
    "images_per_second": "images_per_second",
}


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per evaluation (strict JSON: a non-finite number becomes null)."""
    with path.open("a") as f:
        f.write(json.dumps(jsonable(record)) + "\n")


class _TensorBoard:
    """The evaluation records as TensorBoard scalars, when the ``tensorboard`` package is there.

    ``purge_step``: a resumed run hides what a killed process logged after its last checkpoint,
    as metrics.jsonl is rewritten from the checkpoint's history.
    """

    def __init__(self, log_dir: Path, *, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        for key, tag in TENSORBOARD_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], global_step=record["step"])
        self.writer.flush()  # followable while the run goes on

    def close(self) -> None:
        self.writer.close()


class RunFolder:
    """The run folder of one run, written by rank 0 only.

    ``start`` writes config.json and rewrites metrics.jsonl from the state's history (the
    checkpoint is the record: a process killed between logging an evaluation and checkpointing
    it must not leave that line twice); ``log`` adds an evaluation; ``save`` writes checkpoints;
    ``finish`` writes summary.json and curves.png.
    """

    def __init__(self, path: Path, cfg: TrainConfig, classes: list[str]) -> None:
        self.path, self.cfg, self.classes = Path(path), cfg, list(classes)
        self.metrics = self.path / "metrics.jsonl"
        self.tensorboard: _TensorBoard | None = None

    def start(self, config: dict[str, Any], state: RunState) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)
        self.metrics.unlink(missing_ok=True)
        for record in state.history:
            append_metrics(self.metrics, record)
        if self.cfg.tensorboard and importlib.util.find_spec("tensorboard") is not None:
            try:
                self.tensorboard = _TensorBoard(self.path, purge_step=state.step + 1)
            except ImportError as exc:  # a broken install must not stop the run
                warnings.warn(f"TensorBoard events not written: {exc}", stacklevel=3)

    def log(self, record: dict[str, Any]) -> None:
        append_metrics(self.metrics, record)
        if self.tensorboard is not None:
            self.tensorboard.log(record)

    def save(self, state: RunState, *, best: bool = False) -> Path:
        """The latest checkpoint, and first the best one if ``best`` (a crash between the two
        then only repeats work). Returns the latest checkpoint's path."""
        ckpt = {
            **model_record(state.model),
            "classes": self.classes,
            "train_config": self.cfg.to_dict(),
            **state.state_dict(),
        }
        if best:
            save_checkpoint(ckpt, self.path / BEST)
        save_checkpoint(ckpt, self.path / LATEST)
        return self.path / LATEST

    def last_good(self) -> str:
        """Where a failed run can be resumed from, as the end of an error message."""
        latest = self.path / LATEST
        return f"; last good checkpoint: {latest}" if latest.exists() else "; no checkpoint yet"

    def finish(self, summary: dict[str, Any], history: list[dict[str, Any]], title: str) -> None:
        write_json(self.path / "summary.json", summary)
        if history:
            plot_curves(history, self.path / "curves.png", title=title)
        self.close()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def curves_figure(history: list[dict[str, Any]], *, title: str = "") -> Any:
    """Training (dashed) and test (bold) error against iterations, as He et al. 2015, Fig. 6,
    with validation error dotted; a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.6))
    top = 0.0
    curves = (("train_error", "--", 1, "train"), ("val_error", ":", 1, "val"),
              ("test_error", "-", 2, "test"))  # fmt: skip
    for key, style, width, label in curves:
        pts = [(h["step"], 100 * h[key]) for h in history if h.get(key) is not None]
        if not pts:
            continue
        # a single evaluation is a point: without a marker the line would draw nothing
        marker = "o" if len(pts) == 1 else None
        ax.plot(*zip(*pts, strict=True), style, lw=width, marker=marker, label=label)
        top = max(top, *(y for _, y in pts))
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole steps
    if history and max(h["step"] for h in history) >= 10_000:
        ax.ticklabel_format(axis="x", style="sci", scilimits=(4, 4))
    # every curve in view (train error alone cut off validation and test when they were higher)
    ax.set_ylim(0, min(100.0, 5 + top) if history else 100.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """:func:`curves_figure` saved as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history, title=title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
