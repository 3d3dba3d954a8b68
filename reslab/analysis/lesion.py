"""Lesion study (Veit, Wilber & Belongie 2016, "Residual Networks Behave Like Ensembles of
Relatively Shallow Networks", §4): delete one block at test time and measure the accuracy.

Deleting a residual unit leaves its shortcut, ``x_{l+1} = h(x_l)``; deleting a plain unit leaves
``x_{l+1} = x_l``, possible only where the unit keeps the shape. Veit et al. find that removing a
single unit of a ResNet barely matters while removing a layer of a plain (VGG) net is fatal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from reslab._progress import progress_bar
from reslab.analysis.common import new_figure, save_figure
from reslab.analysis.hooks import find_blocks
from reslab.analysis.training import (
    TrainSpec,
    experiment_meta,
    light_summary,
    setup,
    train_twin,
)

__all__ = ["DeletedUnit", "deleted", "lesion_study"]


@runtime_checkable
class BranchDeletable(Protocol):
    """A unit that can compute its output with the residual branch deleted (reslab's
    :class:`~reslab.models.ResidualBlock` and :class:`~reslab.models.DenseResidualLayer`)."""

    def forward_without_branch(self, x: Tensor) -> Tensor: ...

    def can_delete_branch(self) -> bool: ...


class DeletedUnit(nn.Module):
    """What is left of a unit after deleting its residual branch: ``f(h(x))``, the shortcut alone
    (with the unit's pre-activation where the shortcut reads it). A plain unit becomes the
    identity. The unit itself computes this (``forward_without_branch``)."""

    def __init__(self, unit: BranchDeletable) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: Tensor) -> Tensor:
        return self.unit.forward_without_branch(x)


def deletable(unit: nn.Module) -> bool:
    """A residual unit always (its shortcut remains); a plain unit only if it keeps the shape.
    Units of other libraries' models are never deleted here: they do not say what is left."""
    return isinstance(unit, BranchDeletable) and unit.can_delete_branch()


@contextlib.contextmanager
def deleted(model: nn.Module, unit_name: str) -> Iterator[None]:
    """Temporarily replace the unit called ``unit_name`` by :class:`DeletedUnit`."""
    parent_name, _, child = unit_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    unit = parent.get_submodule(child)
    if not isinstance(unit, BranchDeletable) or not unit.can_delete_branch():
        raise ValueError(f"unit {unit_name} changes the shape and has no shortcut")
    parent._modules[child] = DeletedUnit(unit)
    try:
        yield
    finally:
        parent._modules[child] = unit


def lesion_study(
    model: nn.Module,
    split: Any,
    *,
    evaluate_fn: Callable[[nn.Module], float] | None = None,
) -> dict[str, Any]:
    """Test accuracy with each unit deleted in turn (units that cannot be deleted get ``None``)."""
    if evaluate_fn is None:
        from reslab.train import evaluate

        def evaluate_fn(m: nn.Module) -> float:
            return float(evaluate(m, split)["accuracy"])

    base = evaluate_fn(model)
    rows = []
    units = progress_bar(find_blocks(model), desc="lesion", unit="unit", leave=False)
    for i, (name, unit) in enumerate(units):
        row: dict[str, Any] = {
            "index": i + 1,
            "unit": name,
            "shape_changes": bool(getattr(unit, "shape_changes", False)),
        }
        if deletable(unit):
            with deleted(model, name):
                acc = evaluate_fn(model)
            row.update(accuracy=acc, drop=base - acc)
        else:
            row.update(accuracy=None, drop=None)
        rows.append(row)
    same_shape = [r["drop"] for r in rows if not r["shape_changes"] and r["drop"] is not None]
    return {
        "baseline_accuracy": base,
        "units": rows,
        "mean_drop_same_shape": sum(same_shape) / max(len(same_shape), 1),
        "max_drop_same_shape": max(same_shape, default=float("nan")),
    }


def plot_lesion(
    results: dict[str, dict[str, Any]], out_dir: Path, name: str = "lesion.png"
) -> Path:
    fig, axes = new_figure(size=(6.4, 3.6))
    ax = axes[0][0]
    n = len(results)
    width = 0.8 / max(n, 1)
    for k, (label, res) in enumerate(results.items()):
        xs = [r["index"] + (k - (n - 1) / 2) * width for r in res["units"] if r["drop"] is not None]
        ys = [100 * r["drop"] for r in res["units"] if r["drop"] is not None]
        ax.bar(xs, ys, width=width, label=f"{label} (intact {100 * res['baseline_accuracy']:.1f}%)")
    ax.set_xlabel("deleted unit")
    ax.set_ylabel("test accuracy drop (points)")
    ax.set_title("deleting one unit at test time (Veit et al. 2016)")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def lesion_rows(results: dict[str, dict[str, Any]]) -> Sequence[dict[str, Any]]:
    return [
        {
            "net": k,
            "intact_acc": v["baseline_accuracy"],
            "mean_drop": v["mean_drop_same_shape"],
            "max_drop": v["max_drop_same_shape"],
        }
        for k, v in results.items()
    ]


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    spec: TrainSpec | None = None,
    depth: int = 20,
) -> dict[str, Any]:
    """``reslab analyze lesion``: train a ResNet and its plain twin, delete each unit in turn."""

    from reslab.analysis.common import format_table
    from reslab.record import write_json

    spec = spec or TrainSpec()
    splits, cfg = setup(spec, quick=quick, quick_iters=300, full_iters=2000)
    results, summaries = {}, {}
    for family in progress_bar(("resnet", "plain"), desc="lesion", unit="net"):
        label = f"{family}-{depth}"
        trained = train_twin(family, depth, splits, cfg, seed=spec.seed)
        summaries[label] = light_summary(trained.summary)
        results[label] = lesion_study(trained.model, splits.test)
    figures = [plot_lesion(results, out_dir)]
    payload = {
        "meta": experiment_meta("lesion", spec, splits, cfg, quick=quick),
        "results": results,
        "training": summaries,
    }
    path = write_json(Path(out_dir) / "lesion.json", payload)
    table = format_table(list(lesion_rows(results)), ["net", "intact_acc", "mean_drop", "max_drop"])
    return {"json": path, "figures": figures, "table": table, "data": payload}
