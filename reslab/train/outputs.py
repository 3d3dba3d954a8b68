"""What a run leaves in its folder: config.json, metrics.jsonl, checkpoints, TensorBoard events,
summary.json and curves.png. Rank 0 writes; metrics.jsonl is the record, TensorBoard a view.

The folder belongs to one process while the run goes on (:class:`reslab._io.FolderLock`), and a
failed write stops the run with one line naming the file, the reason and the last good
checkpoint (:class:`reslab._io.WriteError`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reslab._io import LOCK_NAME, FolderLock, WriteError, append_text, atomic_path, is_temp_name
from reslab.record import jsonable, write_json
from reslab.train.checkpoint import BEST, LATEST, model_record, save_checkpoint
from reslab.train.config import TrainConfig
from reslab.train.state import RunState
from reslab.train.step import NonFiniteLossError

__all__ = [
    "RUN_FILES",
    "TENSORBOARD_TAGS",
    "RunFolder",
    "append_metrics",
    "curves_figure",
    "files_not_of_a_run",
    "is_run_file",
    "plot_curves",
    "read_run_config",
]

#: The files a run writes in its folder, besides TensorBoard's ``events.out.tfevents.*``, the
#: lock file and temporary files of writes in progress.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png", LATEST, BEST)
_TENSORBOARD_EVENTS = "events.out.tfevents."


def is_run_file(name: str) -> bool:
    """Whether a run writes a file called ``name`` in its folder."""
    return (
        name in RUN_FILES
        or name.startswith(_TENSORBOARD_EVENTS)
        or name == LOCK_NAME
        or is_temp_name(name)
    )


def files_not_of_a_run(folder: Path) -> list[str]:
    """The entries of ``folder`` that no run writes (a user's notes, data, ...), sorted."""
    return sorted(e.name for e in Path(folder).iterdir() if not is_run_file(e.name))


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run folder's config.json, or an error that names it and says what is wrong."""
    file = Path(run_dir) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"not a run folder (no config.json): {run_dir}")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # a truncated or hand-edited file
        raise ValueError(f"config.json in {run_dir} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("train_config"), dict):
        raise ValueError(f"config.json in {run_dir} is not a reslab run record (no train_config)")
    try:  # a hand-edited recipe: an unknown field, a wrong type, a value out of range
        TrainConfig.from_dict(config["train_config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config.json in {run_dir} has an invalid train_config: {exc}") from None
    return config


# metrics.jsonl key -> TensorBoard tag; the "error/" tags share one section of the dashboard
TENSORBOARD_TAGS = {
    "loss": "loss/train",
    "train_error": "error/train",
    "val_error": "error/val",
    "test_error": "error/test",
    "lr": "lr",
    "images_per_second": "images_per_second",
}


def _line(record: dict[str, Any]) -> str:
    return json.dumps(jsonable(record)) + "\n"


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per evaluation (strict JSON: a non-finite number becomes null)."""
    append_text(path, _line(record))


class _TensorBoard:
    """The evaluation records as TensorBoard scalars, when the ``tensorboard`` package is there.

    ``purge_step``: a resumed run hides what a killed process logged after its last checkpoint,
    as metrics.jsonl is rewritten from the checkpoint's history.
    """

    def __init__(self, log_dir: Path, *, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        with self._writing():
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """TensorBoard's writer thread raises a write's OSError at the next call, naming no
        file: name the events file."""
        try:
            yield
        except OSError as exc:
            writer = getattr(self, "writer", None)
            events = getattr(getattr(writer, "file_writer", None), "event_writer", None)
            raise WriteError.of(getattr(events, "_file_name", self.log_dir), exc) from exc

    def log(self, record: dict[str, Any]) -> None:
        with self._writing():
            for key, tag in TENSORBOARD_TAGS.items():
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], global_step=record["step"])
            self.writer.flush()  # followable while the run goes on

    def close(self) -> None:
        with self._writing():
            self.writer.close()


class RunFolder:
    """The run folder of one run, written by rank 0 only.

    ``start`` writes config.json and rewrites metrics.jsonl from the state's history (the
    checkpoint is the record: a process killed between logging an evaluation and checkpointing
    it must not leave that line twice); ``log`` adds an evaluation; ``save`` writes checkpoints;
    ``finish`` writes summary.json and curves.png.
    """

    def __init__(
        self,
        path: Path,
        cfg: TrainConfig,
        classes: list[str],
        *,
        lock: FolderLock | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.cfg, self.classes = Path(path), cfg, list(classes)
        self.lock, self.data = lock, data  # data: what resume checks the data against
        self.metrics = self.path / "metrics.jsonl"
        self.tensorboard: _TensorBoard | None = None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write or a diverged state stops the run with where it can resume from."""
        try:
            yield
        except OSError as exc:
            error = WriteError.of(exc.filename or self.path, exc)
            reason = f"{error.strerror}{self.last_good()}"
            raise WriteError(error.filename, reason, error.errno) from exc
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{exc}{self.last_good()}") from None

    def start(self, config: dict[str, Any], state: RunState) -> None:
        with self._writing():
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / "config.json", config)
            if state.history:  # the checkpoint's history, whole or not at all
                with atomic_path(self.metrics) as tmp:
                    tmp.write_text("".join(map(_line, state.history)))
            else:  # created by the first evaluation
                self.metrics.unlink(missing_ok=True)
            if self.cfg.tensorboard and importlib.util.find_spec("tensorboard") is not None:
                try:
                    self.tensorboard = _TensorBoard(self.path, purge_step=state.step + 1)
                except ImportError as exc:  # a broken install must not stop the run
                    warnings.warn(f"TensorBoard events not written: {exc}", stacklevel=3)

    def log(self, record: dict[str, Any]) -> None:
        with self._writing():
            append_metrics(self.metrics, record)
            if self.tensorboard is not None:
                self.tensorboard.log(record)

    def save(self, state: RunState, *, best: bool = False) -> Path:
        """The latest checkpoint, and first the best one if ``best`` (a crash between the two
        then only repeats work). Returns the latest checkpoint's path. Non-finite weights are
        never saved (:func:`~reslab.train.checkpoint.save_checkpoint` refuses them)."""
        ckpt = {
            **model_record(state.model),
            "classes": self.classes,
            "train_config": self.cfg.to_dict(),
            **({"data": self.data} if self.data is not None else {}),
            **state.state_dict(),
        }
        with self._writing():
            if best:
                save_checkpoint(ckpt, self.path / BEST)
            save_checkpoint(ckpt, self.path / LATEST)
        return self.path / LATEST

    def last_good(self) -> str:
        """Where a failed run can be resumed from, as the end of an error message."""
        latest = self.path / LATEST
        return f"; last good checkpoint: {latest}" if latest.exists() else "; no checkpoint yet"

    def finish(self, summary: dict[str, Any], history: list[dict[str, Any]], title: str) -> None:
        with self._writing():
            write_json(self.path / "summary.json", summary)
            if history:
                plot_curves(history, self.path / "curves.png", title=title)
        self.close()

    def close(self) -> None:
        """Close the TensorBoard writer and let go of the folder (idempotent)."""
        tensorboard, self.tensorboard = self.tensorboard, None
        try:
            if tensorboard is not None:
                tensorboard.close()
        except OSError as exc:  # a view of metrics.jsonl: worth a warning, not the run's end
            warnings.warn(f"TensorBoard events not completed: {exc}", stacklevel=2)
        finally:
            if self.lock is not None:
                self.lock.release()


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
