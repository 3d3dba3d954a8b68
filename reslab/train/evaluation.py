"""Evaluation: accuracy and confusion of a split, the trainer's evaluation points and final summary.

(The module is ``evaluation`` so that ``reslab.train.evaluate`` stays the function.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from reslab._progress import progress_bar
from reslab.data import DataSplits, Normalize, Split
from reslab.train.checkpoint import model_config
from reslab.train.config import TrainConfig
from reslab.train.state import RunState
from reslab.train.step import autocast

__all__ = ["evaluate", "evaluate_point", "format_record", "summarize"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    normalize: Normalize | None = None,
    flip: bool = False,
    progress: bool | None = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class) of ``model`` on uint8
    images, normalised by ``normalize`` or else the ``input_norm`` that :func:`fit` attached.

    ``flip=True`` is test-time augmentation with the training set's own symmetry: the prediction
    is the mean of the softmaxes of each image and its horizontal mirror (two forward passes);
    the report then also gives ``single_view_accuracy``, from the first of the two passes.
    ``progress``: a bar over the batches, labelled ``desc`` (None: on a terminal).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    norm = resolve_norm(model, split, normalize)
    was_training = model.training
    model.eval()
    preds, singles = [], []
    starts = range(0, len(split), batch_size)
    for i in progress_bar(starts, desc=desc, unit="batch", leave=False, enabled=progress):
        raw = split.images[i : i + batch_size].to(device, non_blocking=True)
        views = view_probabilities(
            model, raw, norm, flip=flip, precision=precision, channels_last=channels_last
        )
        if flip:
            singles.append(views[0].argmax(1).cpu())
        preds.append(sum(views[1:], views[0]).argmax(1).cpu())
    model.train(was_training)
    report = confusion_report(_cat(preds), split.labels, model_config(model).num_classes)
    if flip:
        report["single_view_accuracy"] = accuracy(_cat(singles), split.labels)
    return report


def resolve_norm(model: nn.Module, split: Split, normalize: Normalize | None = None) -> Normalize:
    """``normalize``, else the ``input_norm`` that :func:`fit` attached to ``model``, else only
    the /255 scaling."""
    return (
        normalize or getattr(model, "input_norm", None) or Normalize.identity(split.images.shape[1])
    )


def view_probabilities(
    model: nn.Module,
    raw: Tensor,
    norm: Normalize,
    *,
    flip: bool = False,
    precision: str = "fp32",
    channels_last: bool = False,
) -> list[Tensor]:
    """The softmax (float32, (B, classes)) of a uint8 batch on ``model``'s device; with ``flip``
    also that of its horizontal mirror, as a second entry. ``model`` must be in eval mode."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views = [raw, raw.flip(3)] if flip else [raw]
    with autocast(raw.device, precision):
        # mirror the image, then normalise, as training's flip does: a per-pixel mean is not
        # mirror-symmetric, so mirroring the normalised batch would not match
        return [model(norm(v).contiguous(memory_format=fmt)).float().softmax(1) for v in views]


def confusion_report(pred: Tensor, y: Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy, error, n, per-class accuracy and the confusion matrix (rows: true class) of the
    predicted classes ``pred`` against the labels ``y``."""
    k = num_classes
    confusion = torch.bincount(y * k + pred, minlength=k * k).view(k, k)
    per_class = confusion.diag().double() / confusion.sum(1).clamp_min(1)
    acc = accuracy(pred, y)
    return {
        "accuracy": acc,
        "error": 1.0 - acc,
        "n": len(y),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }


def _cat(preds: list[Tensor]) -> Tensor:
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred == y).double().mean()) if len(y) else float("nan")


def _options(cfg: TrainConfig, device: torch.device, progress: bool | None) -> dict[str, Any]:
    return {
        "batch_size": cfg.eval_batch_size,
        "device": device,
        "precision": cfg.precision,
        "channels_last": cfg.channels_last,
        "progress": progress,
    }


def evaluate_point(
    model: nn.Module,
    splits: DataSplits,
    cfg: TrainConfig,
    device: torch.device,
    record: dict[str, Any],
    *,
    progress: bool | None = False,
) -> None:
    """Add ``val_error`` (None without a validation split) and ``test_error`` (None unless
    ``cfg.eval_test``) to an evaluation ``record``. Single view: the curves follow the papers'
    protocol; ``eval_flip`` applies to the final summary only."""
    kw = _options(cfg, device, progress)
    val = evaluate(model, splits.val, desc="val", **kw)["error"] if len(splits.val) else None
    test = evaluate(model, splits.test, desc="test", **kw)["error"] if cfg.eval_test else None
    record["val_error"], record["test_error"] = val, test


def format_record(r: dict[str, Any], total: int) -> str:
    """The one line printed per evaluation."""
    val = "" if r.get("val_error") is None else f"  val err {100 * r['val_error']:.2f}%"
    test = "" if r.get("test_error") is None else f"  test err {100 * r['test_error']:.2f}%"
    return (
        f"step {r['step']}/{total}  epoch {r['epoch']:.1f}  lr {r['lr']:.3g}  loss {r['loss']:.4f}"
        f"  train err {100 * r['train_error']:.2f}%{val}{test}  {r['images_per_second']:.0f} img/s"
    )


def summarize(
    model: nn.Module,
    splits: DataSplits,
    cfg: TrainConfig,
    device: torch.device,
    state: RunState,
    *,
    total: int,
    steps_per_epoch: int,
    progress: bool | None = False,
) -> dict[str, Any]:
    """summary.json: the final model's test (and validation) accuracy, with ``cfg.eval_flip``'s
    views, the best validation accuracy seen, speed and length of the run."""
    kw = {**_options(cfg, device, progress), "flip": cfg.eval_flip}
    test = evaluate(model, splits.test, desc="test", **kw)
    val = evaluate(model, splits.val, desc="val", **kw) if len(splits.val) else None
    return {
        "test_accuracy": test["accuracy"],  # the final model, as the papers report
        # with eval_flip, the single view too: it is what the papers' tables give
        "test_accuracy_single_view": test.get("single_view_accuracy", test["accuracy"]),
        "eval_flip": cfg.eval_flip,
        "val_accuracy": val["accuracy"] if val else None,
        "best_val_accuracy": 1.0 - state.best_val if math.isfinite(state.best_val) else None,
        "test_per_class_accuracy": test["per_class_accuracy"],
        "train_seconds": state.train_seconds,
        "images_per_second": state.images / max(state.train_seconds, 1e-9),
        "steps": total,
        "epochs": total / steps_per_epoch,
        "final_train_loss": state.losses[-1] if state.losses else None,
        "data": splits.name,
        "recipe": cfg.recipe,
    }
