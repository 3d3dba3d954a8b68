"""The degradation problem (He et al. 2015, §4.1-4.2 and Fig. 6): with one recipe, deeper plain
nets reach a *higher training error* than shallower ones, while deeper ResNets do not.

Seed 001 (after He et al. 2015): "with more layers added to a sufficiently deep model, training
error increases" - an optimisation difficulty, not overfitting. Seed 003 puts it the same way.
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

__all__ = ["degradation_runs", "plot_degradation"]


def train_error(model: Any, splits: Any, limit: int = 5000, seed: int = 0) -> float:
    """Error on a seeded random subset of (up to ``limit``) un-augmented training images, in eval
    mode. A random subset, not the first images: a split may be stored ordered by class."""
    from reslab.data import Split
    from reslab.train import evaluate

    n = len(splits.train.labels)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    sub = Split(splits.train.images[idx], splits.train.labels[idx])
    return evaluate(model, sub)["error"]


def degradation_runs(
    splits: Any,
    cfg: Any,
    *,
    depths: Sequence[int] = (20, 32, 44, 56),
    seed: int = 0,
    log: Callable[[str], None] = write_line,
) -> list[dict[str, Any]]:
    """Train the plain and residual twin at each depth with ``cfg``; one row per network."""
    rows = []
    bar = progress_bar(total=2 * len(depths), desc="degradation", unit="net")
    for family in ("plain", "resnet"):
        for depth in depths:
            name = f"{family}-{depth}"
            # each net's initialisation from the seed alone (not from whatever ran before), so
            # twins at one depth start from the same convolution weights
            torch.manual_seed(seed)
            model = cifar_net(
                depth,
                residual=family == "resnet",
                in_channels=splits.in_channels,
                num_classes=splits.num_classes,
            )
            run = train_net(name, model, splits, cfg, seed=seed)
            row: dict[str, Any] = {
                "net": name,
                "family": family,
                "depth": depth,
                "final_train_error": train_error(run.model, splits),
                # single view, as the train error and the curves (eval_flip averages a mirror)
                "test_error": 1.0 - single_view_accuracy(run.summary),
                "seconds": round(run.seconds, 1),
                "summary": light_summary(run.summary),
                "history": run.history,
            }
            rows.append(row)
            log(
                f"  {name}: train err {100 * row['final_train_error']:.2f}%  "
                f"test err {100 * row['test_error']:.2f}%  ({row['seconds']:.0f} s)"
            )
            bar.update()
    bar.close()
    return rows


def plot_degradation(
    rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "degradation.png", title: str = ""
) -> Path:
    """He et al. 2015 Fig. 6: training (dashed) and test (bold) error against iterations."""
    fig, axes = new_figure(ncols=2, size=(5.0, 3.8))
    depths = sorted({r["depth"] for r in rows})
    colors = dict(
        zip(
            depths,
            ["tab:orange", "tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown"],
            strict=False,
        )
    )
    for ax, family in zip(axes[0], ("plain", "resnet"), strict=True):
        for r in (r for r in rows if r["family"] == family):
            h = r["history"]
            steps = [p["step"] for p in h]
            c = colors[r["depth"]]
            ax.plot(steps, [100 * p["train_error"] for p in h], "--", color=c, lw=1)
            ax.plot(
                steps,
                [100 * p["test_error"] for p in h],
                "-",
                color=c,
                lw=2,
                label=f"{family}-{r['depth']}",
            )
        ax.set_xlabel("iteration")
        ax.set_ylabel("error (%)")
        ax.set_title(f"{family} {title}".strip())
        ax.legend(fontsize=8)
    fig.suptitle("dashed: training error, bold: test error", fontsize=9)
    return save_figure(fig, out_dir, name)


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    spec: TrainSpec | None = None,
    depths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """``reslab analyze degradation``: Fig. 6 curves and a final table."""
    from reslab.analysis.common import format_table
    from reslab.record import write_json

    spec = spec or TrainSpec()
    splits, cfg = setup(spec, quick=quick, quick_iters=200, full_iters=2000)
    depths = tuple(depths or (20, 32, 44, 56))
    rows = degradation_runs(splits, cfg, depths=depths, seed=spec.seed)
    title = f"{splits.name}, {cfg.total_steps(len(splits.train))} it."
    figures = [plot_degradation(rows, out_dir, title=title)]
    payload = {
        "meta": experiment_meta("degradation", spec, splits, cfg, quick=quick),
        "runs": rows,
    }
    path = write_json(Path(out_dir) / "degradation.json", payload)
    table = format_table(
        [
            {
                "net": r["net"],
                "train_err_%": 100 * r["final_train_error"],
                "test_err_%": 100 * r["test_error"],
                "seconds": r["seconds"],
            }
            for r in rows
        ],
        ["net", "train_err_%", "test_err_%", "seconds"],
    )
    return {"json": path, "figures": figures, "table": table, "data": payload}
