"""Ensembles of trained networks: the mean of the members' softmax, scored as members are added.

Averaging the class probabilities of independently trained networks is the oldest way to buy
accuracy with compute; the ResNet papers' own ImageNet entries were ensembles, and Veit et al.
(2016) read a single residual network as an implicit ensemble of its many paths. Networks that
differ only in their seed (initialisation, data order, augmentation) make different mistakes, so
their average is usually more accurate than any one of them; how much, and how fast the gain
saturates with the number of members, is what :func:`evaluate_ensemble` measures.

A packed run (K seeds trained as one network) writes one ordinary run folder per member and, in
its parent folder, a ``packed.json`` (or ``summary.json``) whose ``members`` entry lists them;
:func:`expand_runs` turns such a folder into its members, so they are an ensemble for free.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab._progress import progress_bar
from reslab.data import Normalize
from reslab.train.checkpoint import model_config
from reslab.train.evaluation import (
    EvalSource,
    batches_of,
    confusion_report,
    resolve_norm,
    view_probabilities,
)

__all__ = ["PACKED_FILES", "evaluate_ensemble", "expand_runs", "packed_members"]

#: The files of a packed run's parent folder that may list its members, in the order looked at:
#: a JSON object with ``"members": ["seed0", "seed1", ...]``, each a run folder relative to the
#: file's own folder (or absolute), in member order. Other keys are ignored.
PACKED_FILES = ("packed.json", "summary.json")


def packed_members(path: str | Path) -> list[Path] | None:
    """The member run folders that ``path`` lists, or None where it lists none.

    ``path`` is a packed run's parent folder (its ``packed.json``, else its ``summary.json``, with
    a ``members`` list) or one of those files itself. An ordinary run folder, whose summary has no
    ``members``, or a checkpoint file gives None. Members are checked to exist.
    """
    path = Path(path)
    if path.is_dir():
        files = [path / name for name in PACKED_FILES if (path / name).is_file()]
    elif path.suffix == ".json" and path.is_file():
        files = [path]
    else:
        return None
    for file in files:
        try:
            record = json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file} is not a JSON file: {exc}") from exc
        if not isinstance(record, dict) or "members" not in record:
            continue
        members = record["members"]
        if (
            not isinstance(members, list)
            or not members
            or not all(isinstance(m, str) and m for m in members)
        ):
            raise ValueError(
                f"'members' in {file} must be a non-empty list of run folders (strings), "
                f"got {members!r}"
            )
        folders = [file.parent / m for m in members]  # an absolute entry stays absolute
        for folder in folders:
            if not folder.exists():
                raise FileNotFoundError(f"member run {folder} listed in {file} not found")
        return folders
    if path.is_file():
        raise ValueError(f"{path} lists no 'members' (expected a packed run's packed.json)")
    return None


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """``paths`` with every packed run replaced by its member run folders, order kept."""
    runs: list[Path] = []
    for path in paths:
        members = packed_members(path)
        runs.extend(members if members is not None else [Path(path)])
    return runs


def _per_member(value: Any, k: int, name: str) -> list[Any]:
    """``value`` for each of ``k`` members: a sequence of ``k`` entries, or one for all."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != k:
            raise ValueError(f"{name}: {len(value)} entries for {k} ensemble members")
        return list(value)
    return [value] * k


def _check_members(
    models: Sequence[nn.Module],
    split: EvalSource,
    normalize: Normalize | Sequence[Normalize | None] | None,
    flip: bool | Sequence[bool],
) -> tuple[int, list[Normalize], list[bool]]:
    """The members' common number of classes, and each member's normalisation and mirror."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    counts = [model_config(m).num_classes for m in models]
    if len(set(counts)) > 1:
        sizes = ", ".join(map(str, counts))
        raise ValueError(f"ensemble members predict different numbers of classes: {sizes}")
    given = _per_member(normalize, len(models), "normalize")
    norms = [resolve_norm(m, split, n) for m, n in zip(models, given, strict=True)]
    return counts[0], norms, [bool(f) for f in _per_member(flip, len(models), "flip")]


@torch.no_grad()
def evaluate_ensemble(
    models: Sequence[nn.Module],
    split: EvalSource,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    normalize: Normalize | Sequence[Normalize | None] | None = None,
    flip: bool | Sequence[bool] = False,
    progress: bool | None = False,
    desc: str = "ensemble",
    keep_probabilities: bool = False,
) -> dict[str, Any]:
    """Score the ensemble whose prediction is the mean of ``models``' softmax outputs.

    Every member sees the same uint8 images of ``split`` (a split in memory, or any iterable of
    (uint8 images, labels) batches, such as a streamed split's) through its own normalisation (entry
    ``i`` of ``normalize``, else the ``input_norm`` :func:`fit` attached to it) and its own
    ``flip`` (test-time mirror, as in :func:`reslab.train.evaluate`: a member's probabilities are
    then the mean over the image and its mirror). The models must be on ``device`` (default:
    that of the first model's parameters) and predict the same number of classes.

    The report holds what :func:`reslab.train.evaluate` reports, for the full ensemble
    (``accuracy``, ``error``, ``n``, ``per_class_accuracy``, ``confusion``), and
    ``accuracy_vs_members`` (entry ``k - 1``: the ensemble of the first ``k`` members, in the
    order given), ``member_accuracy`` (each member alone), ``member_accuracy_mean`` and
    ``member_accuracy_std`` (sample standard deviation; None for one member). With
    ``keep_probabilities`` also ``probabilities``, the ensemble's (N, classes) float32 tensor.

    Memory: the members run batch by batch on a running sum of probabilities, so nothing of size
    members x images x classes is ever held. (Over 60 lines with this docstring; the body is 42.)
    """
    num_classes, norms, flips = _check_members(models, split, normalize, flip)
    k = len(models)
    device = torch.device(device) if device is not None else next(models[0].parameters()).device
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    # per batch: correct predictions of the first k members together, and of each member alone
    correct_ensemble = torch.zeros(k, dtype=torch.int64, device=device)
    correct_member = torch.zeros(k, dtype=torch.int64, device=device)
    preds: list[Tensor] = []
    kept: list[Tensor] = []
    labels_seen: list[Tensor] = []
    batches = batches_of(split, batch_size)
    for raw, y in progress_bar(batches, desc=desc, unit="batch", leave=False, enabled=progress):
        if not len(y):  # a streamed batch whose images skip_bad all left out
            continue
        labels_seen.append(y.cpu())
        raw = raw.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        members = [view_probabilities(model, raw, norm, flip=mirror, precision=precision,
                                      channels_last=channels_last)
                   for model, norm, mirror in zip(models, norms, flips, strict=True)]  # fmt: skip
        total = _tally(members, y, correct_member, correct_ensemble)
        preds.append(total.argmax(1).cpu())
        if keep_probabilities:
            kept.append((total / k).cpu())
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    labels = torch.cat(labels_seen) if labels_seen else torch.zeros(0, dtype=torch.int64)
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
    report = confusion_report(pred, labels, num_classes)
    singles = [_share(c, len(labels)) for c in correct_member.tolist()]
    report.update(
        members=k,
        accuracy_vs_members=[_share(c, len(labels)) for c in correct_ensemble.tolist()],
        member_accuracy=singles,
        member_accuracy_mean=statistics.fmean(singles),
        member_accuracy_std=statistics.stdev(singles) if k > 1 else None,
    )
    if keep_probabilities:
        report["probabilities"] = torch.cat(kept) if kept else torch.zeros(0, num_classes)
    return report


def _tally(
    members: Sequence[Sequence[Tensor]],
    y: Tensor,
    correct_member: Tensor,
    correct_ensemble: Tensor,
) -> Tensor:
    """Add one batch's correct predictions, of each member alone and of the first ``j`` members
    together, to the counts; return the sum of all members' probabilities. ``members[j]``: member
    ``j``'s probabilities of each view (one vote per member, however many views)."""
    total = torch.zeros(0)  # the sum of the first j members' probabilities
    for j, views in enumerate(members):
        probs = sum(views[1:], views[0]) / len(views)
        total = probs if j == 0 else total + probs
        correct_member[j] += (probs.argmax(1) == y).sum()
        correct_ensemble[j] += (total.argmax(1) == y).sum()  # the mean's argmax is the sum's
    return total


def _share(count: int, n: int) -> float:
    """``count / n`` as :func:`reslab.train.evaluation.accuracy` computes it (NaN for no images)."""
    return count / n if n else float("nan")
