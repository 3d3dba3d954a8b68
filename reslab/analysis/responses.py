"""Layer responses: the standard deviation of each residual branch's output before the addition.

He et al. 2015, §4.2 and Fig. 7: "the responses are the outputs of each 3x3 layer, after BN and
before other nonlinearity (ReLU/addition)". ResNets have generally smaller responses than their
plain counterparts, which supports the idea that residual functions are closer to zero than
non-residual ones; deeper ResNets have smaller responses still.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from reslab._progress import progress_bar
from reslab.analysis.common import new_figure, save_figure
from reslab.analysis.hooks import find_blocks
from reslab.analysis.training import (
    TrainSpec,
    cifar_net,
    experiment_meta,
    light_summary,
    setup,
    train_twin,
)
from reslab.models import ResidualBlock

__all__ = ["branch_responses", "plot_responses"]


class _RunningStd:
    """Mean and standard deviation over every element seen, accumulated in float64."""

    def __init__(self) -> None:
        self.n, self.s, self.s2 = 0, 0.0, 0.0

    def add(self, t: Tensor) -> None:
        t = t.detach().double()
        self.n += t.numel()
        self.s += float(t.sum())
        self.s2 += float((t * t).sum())

    @property
    def std(self) -> float:
        mean = self.s / max(self.n, 1)
        return max(self.s2 / max(self.n, 1) - mean * mean, 0.0) ** 0.5


@torch.no_grad()
def branch_responses(model: nn.Module, images: Tensor, *, batch_size: int = 256) -> dict[str, Any]:
    """Std of every 3x3 layer's BN output (``layers``: the stem's, where it has a BN, then every
    branch BN) and of each unit's last branch BN (``units``).

    ``images`` are already normalised network inputs; the model runs in eval mode (the BN running
    statistics, as at test time in the paper).
    """
    stats: dict[str, _RunningStd] = {}
    handles = []
    order: list[tuple[str, str, bool]] = []  # (key, unit name, is the branch's last layer)
    stem_bn = getattr(model, "bn1", None)
    if isinstance(stem_bn, nn.BatchNorm2d):  # Fig. 7 counts every 3x3 layer, the stem's too
        stats["stem.bn1"] = _RunningStd()
        order.append(("stem.bn1", "stem", False))
        handles.append(stem_bn.register_forward_hook(lambda m, i, o: stats["stem.bn1"].add(o)))
    for name, unit in find_blocks(model):
        if not isinstance(unit, ResidualBlock):
            continue  # only reslab's units say which of their layers are the branch's
        last = unit.last_branch_layer()
        for bn, module in unit.branch_norms():
            key = f"{name}.{bn}"
            stats[key] = _RunningStd()
            order.append((key, name, module is last))
            handles.append(module.register_forward_hook(lambda m, i, o, key=key: stats[key].add(o)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layers = [
        {"name": k, "unit": u, "last_in_branch": last, "std": stats[k].std} for k, u, last in order
    ]
    return {"layers": layers, "units": [r for r in layers if r["last_in_branch"]]}


def plot_responses(
    results: dict[str, dict[str, Any]], out_dir: Path, name: str = "responses.png"
) -> Path:
    """Fig. 7 of He et al. 2015: std per layer in network order (top) and sorted (bottom)."""
    fig, axes = new_figure(nrows=2, size=(6.4, 3.0))
    for label, res in results.items():
        stds = [r["std"] for r in res["layers"]]
        style = "--" if label.startswith("plain") else "-"
        axes[0][0].plot(range(1, len(stds) + 1), stds, style, label=label, lw=1.2)
        axes[1][0].plot(
            range(1, len(stds) + 1), sorted(stds, reverse=True), style, label=label, lw=1.2
        )
    axes[0][0].set_xlabel("layer index (original order)")
    axes[1][0].set_xlabel("layer index (sorted by magnitude)")
    for ax in (axes[0][0], axes[1][0]):
        ax.set_ylabel("std of BN output")
        ax.legend(fontsize=7)
    axes[0][0].set_title("responses of the 3x3 layers (after BN, before ReLU/addition)")
    return save_figure(fig, out_dir, name)


def summarize(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, res in results.items():
        stds = [r["std"] for r in res["layers"]]
        last = [r["std"] for r in res["units"]]
        rows.append(
            {
                "net": label,
                "mean_std_all": sum(stds) / len(stds),
                "mean_std_branch_end": sum(last) / len(last),
                "max_std": max(stds),
            }
        )
    return rows


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    spec: TrainSpec | None = None,
    depths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """``reslab analyze responses``: train plain/residual twins, then Fig. 7 on the test set."""
    from reslab.analysis.common import format_table
    from reslab.record import write_json

    spec = spec or TrainSpec()
    splits, cfg = setup(spec, quick=quick, quick_iters=300, full_iters=2000)
    depths = tuple(depths or ((20,) if quick else (20, 56)))
    results: dict[str, dict[str, Any]] = {}
    init: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    bar = progress_bar(total=2 * len(depths), desc="responses", unit="net")
    for depth in depths:
        for family in ("plain", "resnet"):
            label = f"{family}-{depth}"
            run_ = train_twin(family, depth, splits, cfg, seed=spec.seed)
            # the training set's normalisation, which the trainer attaches to the model
            input_norm = cast(Callable[[Tensor], Tensor], run_.model.input_norm)
            x = input_norm(splits.test.images)
            results[label] = branch_responses(run_.model, x)
            summaries[label] = light_summary(run_.summary)
            torch.manual_seed(spec.seed)
            fresh = cifar_net(
                depth,
                residual=family == "resnet",
                in_channels=splits.in_channels,
                num_classes=splits.num_classes,
            )
            init[label] = branch_responses(fresh, x)
            bar.update()
    bar.close()
    figures = [plot_responses(results, out_dir)]
    payload = {
        "meta": experiment_meta("responses", spec, splits, cfg, quick=quick),
        "trained": results,
        "init": init,
        "training": summaries,
        "summary": summarize(results),
    }
    path = write_json(Path(out_dir) / "responses.json", payload)
    rows = [{**r, "test_acc": summaries[r["net"]]["test_accuracy"]} for r in summarize(results)]
    table = format_table(
        rows, ["net", "test_acc", "mean_std_all", "mean_std_branch_end", "max_std"]
    )
    return {"json": path, "figures": figures, "table": table, "data": payload}
