"""What a run shows and leaves: curves, a tiny data set's numbers, progress bars, TensorBoard."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reslab import create_model
from reslab.data import DataSplits, Split
from reslab.train import TrainConfig, fit
from reslab.train.outputs import plot_curves


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("cifar_resnet20", in_channels=1, num_classes=10)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.preset("digits", **{"iters": 30, "eval_every": 10, **kw})


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures that get saved, kept open for inspection."""
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    real = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _curves(fig) -> dict[str, object]:
    return {line.get_label(): line for line in fig.axes[0].lines}


# -- curves.png --
def test_curves_of_one_evaluation_show_points_and_name_the_model(
    digits, tmp_path: Path, saved_figures
) -> None:
    """A run with a single evaluation drew empty axes (one point, no marker), and the title
    named the data and recipe but not the model."""
    cfg = _cfg(iters=3, eval_every=0)  # one evaluation, at the end
    fit(_model(), digits, cfg, tmp_path / "a", run_info={"model_name": "cifar_resnet20"})
    fit(_model(), digits, cfg, tmp_path / "b")  # no name given: the architecture's
    named, unnamed = saved_figures[-2:]
    lines = _curves(named)
    assert set(lines) == {"train", "val", "test"}
    for line in lines.values():
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", "None")
    assert named.axes[0].get_title() == "cifar_resnet20 on digits, digits recipe"
    assert unnamed.axes[0].get_title() == "ResNet-20 on digits, digits recipe"


def test_curves_keep_validation_and_test_error_in_view(tmp_path: Path, saved_figures) -> None:
    """The y-limit came from the training error alone: a run whose validation and test error
    lie above it (an early digits run: 12 % train, 40-60 % test) had them cut off."""
    history = [
        {"step": s, "train_error": tr, "val_error": va, "test_error": te}
        for s, tr, va, te in ((40, 0.12, 0.41, 0.60), (80, 0.05, 0.22, 0.31))
    ]
    plot_curves(history, tmp_path / "c.png", title="t")
    ax = saved_figures[-1].axes[0]
    top = ax.get_ylim()[1]
    for line in ax.lines:
        assert max(line.get_ydata()) <= top
    assert top <= 100


# -- a data set smaller than one batch --
def _tiny(digits, n: int = 40) -> DataSplits:
    return dataclasses.replace(
        digits, train=Split(digits.train.images[:n], digits.train.labels[:n])
    )


def test_a_data_set_smaller_than_a_batch_counts_its_real_images(digits) -> None:
    """40 images with batch 64: every step trains on the 40, so the training error is counted
    out of 40 (it was out of 64: "train err 0.78 %" at loss 12.4) and so is images/s."""
    tiny = _tiny(digits)
    model = _model()
    with torch.no_grad():  # predicts class 0 for every image; lr 0 keeps it so
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.arange(10, 0, -1).float())
    cfg = _cfg(iters=3, eval_every=1, lr=0.0, batch_size=64, eval_test=False)
    result = fit(model, tiny, cfg)
    expected = float((tiny.train.labels != 0).double().mean())
    assert [h["train_error"] for h in result.history] == [expected] * 3
    last = result.history[-1]
    assert last["images_per_second"] * last["seconds"] == pytest.approx(3 * 40)
    s = result.summary
    assert s["images_per_second"] * s["train_seconds"] == pytest.approx(3 * 40)


# -- progress bars --
def test_progress_bars_cover_training_and_evaluation_when_asked(
    digits, monkeypatch, capsys
) -> None:
    """The hand-written bar showed training steps only, and only on a terminal; RESLAB_PROGRESS
    asks for bars anywhere, and evaluation has its own (the printed line per evaluation stays)."""
    monkeypatch.setenv("RESLAB_PROGRESS", "1")
    fit(_model(), digits, _cfg(iters=4, eval_every=2), verbose=True)
    out, err = capsys.readouterr()
    assert "train:" in err and "4/4" in err  # the steps
    assert "val:" in err and "test:" in err  # the evaluations
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step")] == [
        "2/4",
        "4/4",
    ]


def test_no_bars_in_logs_by_default(digits, monkeypatch, capsys) -> None:
    monkeypatch.delenv("RESLAB_PROGRESS", raising=False)
    fit(_model(), digits, _cfg(iters=4, eval_every=2), verbose=True)
    out, err = capsys.readouterr()
    assert err == "" and "\r" not in out and out.count("\n") == 2


def test_experiments_show_their_sweeps(monkeypatch, capsys) -> None:
    """The experiments' own loops (not fit) have bars too."""
    from reslab.analysis.gradflow import dense_sweep

    monkeypatch.setenv("RESLAB_PROGRESS", "1")
    dense_sweep((2, 3), (("tanh", 1.0),), batch_size=4)
    assert "dense sweep:" in capsys.readouterr().err
    monkeypatch.setenv("RESLAB_PROGRESS", "0")
    dense_sweep((2,), (("tanh", 1.0),), batch_size=4)
    assert capsys.readouterr().err == ""


# -- TensorBoard --
needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="the optional tensorboard package"
)


def _events(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _as_logged(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's values as TensorBoard stores scalars (float32)."""
    from reslab.train.outputs import TENSORBOARD_TAGS

    return {
        tag: [(m["step"], float(np.float32(m[key]))) for m in metrics if m.get(key) is not None]
        for key, tag in TENSORBOARD_TAGS.items()
    }


@needs_tensorboard
def test_tensorboard_scalars_equal_the_metrics(digits, tmp_path: Path) -> None:
    fit(_model(), digits, _cfg(iters=20, eval_every=5), tmp_path)
    events = _events(tmp_path)
    assert {"loss/train", "error/train", "error/val", "error/test", "lr"} <= set(events)
    assert events == _as_logged(_metrics(tmp_path))
    assert [s for s, _ in events["error/val"]] == [5, 10, 15, 20]


@needs_tensorboard
def test_tensorboard_after_a_resume_shows_no_stale_points(digits, tmp_path: Path) -> None:
    """A process killed after logging an evaluation it never checkpointed: the resumed run
    replaces that point, in TensorBoard as in metrics.jsonl."""
    from torch.utils.tensorboard import SummaryWriter

    fit(_model(), digits, _cfg(iters=20), tmp_path)
    stale = SummaryWriter(str(tmp_path))  # the killed process's extra point at step 30
    stale.add_scalar("error/train", 0.999, global_step=30)
    stale.close()
    fit(_model(), digits, _cfg(iters=30), tmp_path, resume=True)
    events = _events(tmp_path)
    assert events == _as_logged(_metrics(tmp_path))
    assert [s for s, _ in events["error/train"]] == [10, 20, 30]


def test_tensorboard_can_be_turned_off(digits, tmp_path: Path) -> None:
    fit(_model(), digits, _cfg(iters=10, tensorboard=False), tmp_path)
    assert not list(tmp_path.glob("events.out.tfevents*"))
    assert (tmp_path / "metrics.jsonl").exists()
