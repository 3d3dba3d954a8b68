"""Evaluation: accuracy and confusion of a split, the trainer's evaluation points and final summary.

(The module is ``evaluation`` so that ``reslab.train.evaluate`` stays the function.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sized
from typing import Any, cast

import torch
from torch import Tensor, nn

from reslab._progress import progress_bar
from reslab.data import InputConfig, Normalize, Split
from reslab.data.training import TrainingData
from reslab.models.packed import PackedNet
from reslab.train.checkpoint import model_config
from reslab.train.config import TrainConfig
from reslab.train.state import RunState
from reslab.train.step import autocast

__all__ = [
    "EvalSource",
    "batches_of",
    "evaluate",
    "evaluate_crops",
    "evaluate_point",
    "format_record",
    "member_errors",
    "member_errors_point",
    "summarize",
]

#: What evaluation reads: a split held in memory, or any iterable of (uint8 images, labels)
#: batches, such as a streamed split's (:meth:`TrainingData.eval_batches`).
EvalSource = Split | Iterable[tuple[Tensor, Tensor]]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: EvalSource,
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

    ``split`` is a :class:`~reslab.data.Split` held in memory (read in batches of
    ``batch_size``) or any iterable of (uint8 images, labels) batches, such as a streamed
    split's (:meth:`reslab.data.training.TrainingData.eval_batches`): nothing more than a batch
    is then in memory at once.

    ``flip=True`` is test-time augmentation with the training set's own symmetry: the prediction
    is the mean of the softmaxes of each image and its horizontal mirror (two forward passes);
    the report then also gives ``single_view_accuracy``, from the first of the two passes.
    ``progress``: a bar over the batches, labelled ``desc`` (None: on a terminal).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    norm = resolve_norm(model, split, normalize)
    was_training = model.training
    model.eval()
    preds, singles, labels = [], [], []
    for raw, y in progress_bar(
        batches_of(split, batch_size), desc=desc, unit="batch", leave=False, enabled=progress,
        total=_count(split, batch_size),
    ):  # fmt: skip
        if not len(y):  # a streamed batch whose images skip_bad all left out
            continue
        raw = raw.to(device, non_blocking=True)
        views = view_probabilities(
            model, raw, norm, flip=flip, precision=precision, channels_last=channels_last
        )
        if flip:
            singles.append(views[0].argmax(1).cpu())
        preds.append(sum(views[1:], views[0]).argmax(1).cpu())
        labels.append(y.cpu())
    model.train(was_training)
    y = _cat(labels)
    report = confusion_report(_cat(preds), y, model_config(model).num_classes)
    if flip:
        report["single_view_accuracy"] = accuracy(_cat(singles), y)
    return report


def batches_of(split: EvalSource, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    """(uint8 images, labels) batches of ``split``: slices of a :class:`Split`, or the given
    batches."""
    if isinstance(split, Split):
        return (
            (split.images[i : i + batch_size], split.labels[i : i + batch_size])
            for i in range(0, len(split), batch_size)
        )
    return split


def _count(split: EvalSource, batch_size: int) -> int | None:
    """Batches, for the progress bar, where known."""
    if isinstance(split, Split):
        return -(-len(split) // batch_size)
    batches = getattr(split, "batches", split)
    return len(batches) if isinstance(batches, Sized) else None


def resolve_norm(
    model: nn.Module, split: EvalSource, normalize: Normalize | None = None
) -> Normalize:
    """``normalize``, else the ``input_norm`` that :func:`fit` attached to ``model``, else only
    the /255 scaling (whose zero mean and unit std broadcast over any number of channels)."""
    channels = split.images.shape[1] if isinstance(split, Split) else 1
    return normalize or getattr(model, "input_norm", None) or Normalize.identity(channels)


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


@torch.no_grad()
def evaluate_crops(
    model: nn.Module,
    images: Iterable[tuple[list[Tensor], Tensor]],
    cfg: InputConfig,
    crops: str,
    *,
    progress: bool | None = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """:func:`evaluate`'s report under an ImageNet test protocol of He et al. 2015, §3.4, on
    whole decoded images (``images``: groups of uint8 (C, H, W) and their labels):
    ``crops`` "1" (the evaluation transform of ``cfg``), "10" (four corners, centre and their
    mirrors) or "multiscale" (the fully convolutional network on the whole image at shorter
    sides {224, 256, 384, 480, 640}, scaled by ``cfg``'s size / 224, and their mirrors)."""
    from reslab.data.multicrop import (
        MULTI_SCALES,
        multiscale_probs,
        single_crop_probs,
        ten_crop_probs,
    )

    was_training = model.training
    model.eval()
    side = min(cfg.size)
    scales = [round(s * side / 224) for s in MULTI_SCALES]
    preds, labels = [], []
    for group, y in progress_bar(images, desc=desc, unit="batch", leave=False, enabled=progress):
        if crops == "1":
            probs = single_crop_probs(model, group, cfg)
        elif crops == "10":
            probs = ten_crop_probs(model, group, cfg)
        elif crops == "multiscale":
            probs = multiscale_probs(model, group, cfg, scales, flip=True)
        else:
            raise ValueError(f"unknown crops {crops!r}; valid choices: 1, 10, multiscale")
        preds.append(probs.argmax(1).cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return confusion_report(_cat(preds), _cat(labels), model_config(model).num_classes)


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
    data: TrainingData,
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
    val = _split_report(model, data, "val", kw)
    test = _split_report(model, data, "test", kw) if cfg.eval_test else None
    record["val_error"] = val["error"] if val else None
    record["test_error"] = test["error"] if test else None


def _split_report(
    model: nn.Module, data: TrainingData, split: str, kw: dict[str, Any]
) -> dict[str, Any] | None:
    """:func:`evaluate` of ``split`` (None when the data has no such images); images a streamed
    split skips as unreadable join ``data.skipped``."""
    if not data.split_size(split):
        return None
    batches = data.eval_batches(split, batch_size=kw["batch_size"], device=kw["device"])
    report = evaluate(model, batches, desc=split, **kw)
    for bad in getattr(batches, "skipped", []):
        if bad not in data.skipped:
            data.skipped.append(bad)
    return report


@torch.no_grad()
def member_errors(
    model: PackedNet,
    split: Split | Iterable[tuple[Tensor, Tensor]],
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    progress: bool | None = False,
    desc: str = "eval",
) -> list[float]:
    """Each member's single-view error on ``split``, for a seed-packed network
    (:class:`~reslab.models.packed.PackedNet`): every batch goes through the packed network once
    (``forward_shared``), which computes all K members' logits; normalised by ``input_norm``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    norm = cast(Normalize, model.input_norm)  # the trainer attaches it
    wrong, n = torch.zeros(model.members, dtype=torch.int64), 0
    for raw, y in progress_bar(
        batches_of(split, batch_size), desc=desc, unit="batch", leave=False, enabled=progress,
        total=_count(split, batch_size),
    ):  # fmt: skip
        x = norm(raw.to(device, non_blocking=True)).contiguous(memory_format=fmt)
        with autocast(device, precision):
            pred = model.forward_shared(x).argmax(-1).cpu()  # (N, K)
        wrong += (pred != y.cpu()[:, None]).sum(0)
        n += len(y)
    model.train(was_training)
    return (wrong.double() / n).tolist() if n else [math.nan] * len(wrong)


def member_errors_point(
    model: PackedNet,
    data: TrainingData,
    cfg: TrainConfig,
    device: torch.device,
    *,
    progress: bool | None = False,
) -> tuple[list[float] | None, list[float] | None]:
    """:func:`evaluate_point` of every member of a seed-packed network: (val errors, test
    errors), each None as there (no validation split; ``cfg.eval_test`` off)."""
    kw = _options(cfg, device, progress)

    def errors(split: str) -> list[float] | None:
        if not data.split_size(split):
            return None
        batches = data.eval_batches(split, batch_size=kw["batch_size"], device=device)
        return member_errors(model, batches, desc=split, **kw)

    return errors("val"), errors("test") if cfg.eval_test else None


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
    data: TrainingData,
    cfg: TrainConfig,
    device: torch.device,
    state: RunState,
    *,
    total: int,
    steps_per_epoch: int,
    progress: bool | None = False,
) -> dict[str, Any]:
    """summary.json: the final model's test (and validation) accuracy, with ``cfg.eval_flip``'s
    views, the best validation accuracy seen, speed and length of the run, and the images left
    out as unreadable (``skip_bad``: their count, and the files with the reasons)."""
    kw = {**_options(cfg, device, progress), "flip": cfg.eval_flip}
    test = _split_report(model, data, "test", kw)
    val = _split_report(model, data, "val", kw)
    if test is None:  # no test images: NaN, as evaluate gives for an empty split
        test = {"accuracy": math.nan, "per_class_accuracy": [0.0] * data.num_classes}
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
        "data": data.name,
        "loader": data.loader.kind,
        "recipe": cfg.recipe,
        "skipped": len(data.skipped),
        "skipped_files": [list(f) for f in data.skipped],
    }
