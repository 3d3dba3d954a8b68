"""Where BN and ReLU go in a residual unit (He et al. 2016, Fig. 4 and Table 2).

Seed 002 (He et al. 2016): identity after the addition ("full pre-activation") gives the cleanest
signal path and the lowest error; "BN after addition" is the worst because BN then sits on the
shortcut path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from reslab._progress import progress_bar, write_line
from reslab.analysis.common import new_figure, save_figure
from reslab.analysis.training import (
    TrainSpec,
    cifar_net,
    experiment_meta,
    light_summary,
    setup,
    single_view_accuracy,
    train_net,
)
from reslab.models.layers import ORDERINGS

__all__ = ["PAPER_TABLE2", "ordering_runs", "plot_orderings"]

#: He et al. 2016, Table 2: CIFAR-10 test error (%) of ResNet-110 with each ordering
#: (ResNet-164 values in the paper's second column are not reproduced here).
PAPER_TABLE2: dict[str, float] = {
    "original": 6.61,
    "bn_after_add": 8.17,
    "relu_before_add": 7.84,
    "relu_preact": 6.71,
    "full_preact": 6.37,
}


def ordering_runs(
    splits: Any,
    cfg: Any,
    *,
    depth: int = 20,
    orderings: Sequence[str] = tuple(ORDERINGS),
    seed: int = 0,
    log: Callable[[str], None] = write_line,
) -> list[dict[str, Any]]:
    rows = []
    for ordering in progress_bar(orderings, desc="orderings", unit="net"):
        torch.manual_seed(seed)  # the initialisation from the seed alone, not from the last run
        model = cifar_net(
            depth, ordering=ordering, in_channels=splits.in_channels, num_classes=splits.num_classes
        )
        run = train_net(ordering, model, splits, cfg, seed=seed)
        h = run.history
        row = {
            "ordering": ordering,
            "description": ORDERINGS[ordering].description,
            "depth": depth,
            "test_error": 100 * (1.0 - single_view_accuracy(run.summary)),  # as the curves
            "final_train_loss": run.summary.get("final_train_loss"),
            "paper_resnet110_test_error": PAPER_TABLE2[ordering],
            "seconds": round(run.seconds, 1),
            "summary": light_summary(run.summary),
            "history": h,
        }
        rows.append(row)
        log(f"  {ordering}: test err {row['test_error']:.2f}%  ({row['seconds']:.0f} s)")
    return rows


def plot_orderings(
    rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "orderings.png", title: str = ""
) -> Path:
    fig, axes = new_figure(ncols=2, size=(5.0, 3.6))
    ax = axes[0][0]
    for r in rows:
        h = r["history"]
        ax.plot([p["step"] for p in h], [100 * p["test_error"] for p in h], label=r["ordering"])
    ax.set_xlabel("iteration")
    ax.set_ylabel("test error (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["test_error"] for r in rows], 0.4, label="this run")
    ax.bar(
        [x + 0.2 for x in xs],
        [r["paper_resnet110_test_error"] for r in rows],
        0.4,
        label="paper, ResNet-110, 64k it.",
    )
    ax.set_xticks(list(xs), [r["ordering"] for r in rows], rotation=30, fontsize=7)
    ax.set_ylabel("final test error (%)")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    spec: TrainSpec | None = None,
    depth: int | None = None,
) -> dict[str, Any]:
    """``reslab analyze orderings``: the five orderings, one recipe, table next to Table 2."""
    from reslab.analysis.common import format_table
    from reslab.record import write_json

    spec = spec or TrainSpec()
    splits, cfg = setup(spec, quick=quick, quick_iters=200, full_iters=2000)
    depth = depth or (20 if quick else 110)
    rows = ordering_runs(splits, cfg, depth=depth, seed=spec.seed)
    title = f"{splits.name}, {depth} layers, {cfg.total_steps(len(splits.train))} it."
    figures = [plot_orderings(rows, out_dir, title=title)]
    payload = {
        "meta": experiment_meta("orderings", spec, splits, cfg, quick=quick),
        "runs": rows,
    }
    path = write_json(Path(out_dir) / "orderings.json", payload)
    table = format_table(
        [
            {
                "ordering": r["ordering"],
                "test_err_%": r["test_error"],
                "paper_110_%": r["paper_resnet110_test_error"],
                "seconds": r["seconds"],
            }
            for r in rows
        ],
        ["ordering", "test_err_%", "paper_110_%", "seconds"],
    )
    return {"json": path, "figures": figures, "table": table, "data": payload}
