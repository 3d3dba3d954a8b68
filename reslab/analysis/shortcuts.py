"""Shortcut variants (He et al. 2016, §3.1, Fig. 2-3 and Table 1): scaled, gated, 1x1-convolved
and dropped-out shortcuts against the identity, trained with one recipe.

Seed 001 (notes on He et al. 2016): "The identity mapping h(x_l) = x_l ... was found to achieve
the fastest error reduction and lower training loss among all variants of h, which suggests that
a clean information path is helpful for optimization." Every variant here is the same CIFAR-style
net (option A where the shape changes, as He et al. 2015's ResNet-110 that Table 1 uses), trained
on the same data in the same order with the same recipe and seed; every variant starts from the
identity net's weights, so only the variant's own parameters (gates, projections) differ at
step 0. "Trains fastest" is measured as the mean training loss over the run (the area under the
curve per step: lower means the loss came down sooner), "lowest training loss" as the mean over
the last tenth of the steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reslab._progress import progress_bar, write_line
from reslab.analysis.common import new_figure, save_figure
from reslab.analysis.training import (
    TrainSpec,
    experiment_meta,
    light_summary,
    setup,
    single_view_accuracy,
    train_net,
)
from reslab.models import ResNet, cifar_config
from reslab.models.shortcuts import COMBINES

__all__ = [
    "PAPER_ITERS",
    "VARIANTS",
    "Variant",
    "claim_verdict",
    "identity_claim",
    "loss_curve",
    "plot_shortcuts",
    "shortcut_runs",
    "variant_net",
]

#: He et al. 2015 §4.2, the schedule Table 1's nets were trained with.
PAPER_ITERS = 64_000


@dataclass(frozen=True)
class Variant:
    """One row of He et al. 2016 Table 1: a ``combine`` (and ``shortcut``) of the same net."""

    label: str
    figure: str  # the panel of Fig. 2 that draws it
    paper_error: float | None  # Table 1's CIFAR-10 test error (%) of ResNet-110; None: "fail"
    combine: str = "add"
    shortcut: str | None = None  # None: the net's own (option A for the CIFAR nets)

    def overrides(self) -> dict[str, str]:
        """The :class:`~reslab.models.ResNetConfig` fields that make this variant."""
        return {"combine": self.combine, **({"shortcut": self.shortcut} if self.shortcut else {})}

    @property
    def on_shortcut(self) -> str:
        return "1x1 conv" if self.shortcut == "C" else COMBINES[self.combine].on_shortcut

    @property
    def on_branch(self) -> str:
        return COMBINES[self.combine].on_branch


#: Table 1 of He et al. 2016 ("fail": test error above 20%), in the paper's order; the keys are
#: what ``reslab analyze shortcuts --variants`` takes.
VARIANTS: dict[str, Variant] = {
    "identity": Variant("original (identity)", "2(a)", 6.61),
    "scale": Variant("constant scaling 0.5, F x0.5", "2(b)", 12.35, combine="scale"),
    "scale_shortcut": Variant("constant scaling 0.5", "2(b)", None, combine="scale_shortcut"),
    "exclusive_gate": Variant("exclusive gating, b_g=-6", "2(c)", 8.70, combine="exclusive_gate"),
    "exclusive_gate_b0": Variant(
        "exclusive gating, b_g=0", "2(c)", None, combine="exclusive_gate_b0"
    ),
    "shortcut_gate": Variant("shortcut-only gating, b_g=-6", "2(d)", 6.91, combine="shortcut_gate"),
    "shortcut_gate_b0": Variant(
        "shortcut-only gating, b_g=0", "2(d)", 12.86, combine="shortcut_gate_b0"
    ),
    "conv1x1": Variant("1x1 conv shortcut (option C)", "2(e)", 12.22, shortcut="C"),
    "dropout": Variant("dropout shortcut 0.5", "2(f)", None, combine="dropout"),
}


def loss_curve(losses: Sequence[float], points: int = 400) -> dict[str, list[float]]:
    """The per-step training loss as at most ``points`` means over equal runs of steps, each
    placed at its last step (a 64k-step run would otherwise write 64k numbers per net)."""
    n = len(losses)
    width = max(1, -(-n // points))  # ceil: never more than `points` bins
    steps, means = [], []
    for start in range(0, n, width):
        chunk = losses[start : start + width]
        steps.append(float(start + len(chunk)))
        means.append(sum(chunk) / len(chunk))
    return {"step": steps, "loss": means}


def _tail_mean(losses: Sequence[float], fraction: float = 0.1) -> float:
    k = max(1, round(fraction * len(losses)))
    return sum(losses[-k:]) / k


def variant_net(
    key: str, depth: int, *, seed: int = 0, in_channels: int = 3, num_classes: int = 10
) -> tuple[ResNet, list[str]]:
    """The CIFAR-style net of ``depth`` layers with shortcut variant ``key``, and the names of the
    parameters the identity net does not have. Every weight the identity net has starts as the
    identity net of ``seed`` has it; the variant's own (gates, projections) are drawn from
    ``seed`` as well, so a comparison differs in the shortcut alone."""
    shape: dict[str, Any] = {"in_channels": in_channels, "num_classes": num_classes}
    torch.manual_seed(seed)
    start = ResNet(cifar_config(depth, **shape)).state_dict()
    torch.manual_seed(seed)
    model = ResNet(cifar_config(depth, **shape, **VARIANTS[key].overrides()))
    missing, unexpected = model.load_state_dict(start, strict=False)
    if unexpected:  # a variant must extend the identity net, never rename its layers
        raise ValueError(f"variant {key!r} lacks the identity net's {unexpected}")
    return model, sorted(missing)


def shortcut_runs(
    splits: Any,
    cfg: Any,
    *,
    depth: int = 20,
    variants: Sequence[str] = tuple(VARIANTS),
    seed: int = 0,
    log: Callable[[str], None] = write_line,
) -> list[dict[str, Any]]:
    """Train each of ``variants`` (keys of :data:`VARIANTS`) with ``cfg``; one row per net.

    A variant whose loss turns non-finite is recorded with ``diverged`` (the trainer stops it
    before the bad update) and no metrics.
    """
    from reslab.train import NonFiniteLossError

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown shortcut variants {unknown}; valid: {', '.join(VARIANTS)}")
    shape = {"in_channels": splits.in_channels, "num_classes": splits.num_classes}
    rows = []
    for key in progress_bar(variants, desc="shortcuts", unit="net"):
        variant = VARIANTS[key]
        model, new = variant_net(key, depth, seed=seed, **shape)
        row: dict[str, Any] = {
            "variant": key,
            "label": variant.label,
            "figure": variant.figure,
            "on_shortcut": variant.on_shortcut,
            "on_branch": variant.on_branch,
            "config": variant.overrides(),
            "depth": depth,
            "parameters": sum(p.numel() for p in model.parameters()),
            "new_parameters": new,
            "paper_resnet110_test_error": variant.paper_error,
        }
        try:
            run = train_net(key, model, splits, cfg, seed=seed)
        except NonFiniteLossError as exc:
            rows.append({**row, "diverged": str(exc)})
            log(f"  {key}: diverged ({exc})")
            continue
        row.update(
            mean_train_loss=sum(run.losses) / len(run.losses),
            final_train_loss=_tail_mean(run.losses),
            final_train_error=100 * run.history[-1]["train_error"],
            test_error=100 * (1.0 - single_view_accuracy(run.summary)),
            seconds=round(run.seconds, 1),
            loss_curve=loss_curve(run.losses),
            summary=light_summary(run.summary),
            history=run.history,
        )
        rows.append(row)
        log(
            f"  {key}: train loss {row['final_train_loss']:.4f} (mean {row['mean_train_loss']:.4f})"
            f", test err {row['test_error']:.2f}%  ({row['seconds']:.0f} s)"
        )
    return rows


def identity_claim(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Seed 001's claim on these runs: the identity reaches the lowest final training loss and the
    lowest mean training loss (trains fastest) of all variants. A diverged variant loses to it.

    ``margins`` are each other variant's loss minus the identity's (positive: the identity is
    lower), so a reader can see how close the call is.
    """
    by_key = {r["variant"]: r for r in rows}
    if "identity" not in by_key or "diverged" in by_key["identity"]:
        return {"tested": False, "reason": "the identity net was not trained (or diverged)"}
    ident = by_key["identity"]
    others = [r for r in rows if r["variant"] != "identity"]
    result: dict[str, Any] = {"tested": bool(others)}
    for metric in ("final_train_loss", "mean_train_loss"):
        margins = {
            r["variant"]: (None if "diverged" in r else r[metric] - ident[metric]) for r in others
        }
        result[metric] = {
            "identity": ident[metric],
            "margins": margins,
            "identity_lowest": all(m is None or m > 0 for m in margins.values()),
        }
    result["holds"] = bool(others) and all(
        result[m]["identity_lowest"] for m in ("final_train_loss", "mean_train_loss")
    )
    return result


def claim_verdict(claim: dict[str, Any]) -> str:
    """One line per measure: does the identity lead, and which variants beat it."""
    if not claim.get("tested"):
        return f"identity claim not tested: {claim.get('reason', 'no other variant')}"
    lines = []
    for metric, says in (("mean_train_loss", "trains fastest (mean training loss)"),
                         ("final_train_loss", "lowest final training loss")):  # fmt: skip
        beaten = [k for k, m in claim[metric]["margins"].items() if m is not None and m <= 0]
        lines.append(f"identity {says}: " + ("yes" if not beaten else f"no, {', '.join(beaten)}"))
    return "\n".join(lines)


def plot_shortcuts(
    rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "shortcuts.png", title: str = ""
) -> Path:
    """He et al. 2016 Fig. 3's view: training loss against iterations for every variant (left),
    test error at each evaluation (right)."""
    fig, axes = new_figure(ncols=2, size=(5.6, 4.0))
    trained = [r for r in rows if "diverged" not in r]
    window = 1
    for r in trained:
        style = {"color": "black", "lw": 2.0} if r["variant"] == "identity" else {"lw": 1.0}
        curve = r["loss_curve"]
        window = max(1, len(curve["loss"]) // 20)  # per-step losses are noisy: a running mean
        smooth = [
            sum(curve["loss"][max(0, i - window + 1) : i + 1]) / min(window, i + 1)
            for i in range(len(curve["loss"]))
        ]
        axes[0][0].plot(curve["step"], smooth, label=r["variant"], **style)
        h = r["history"]
        axes[0][1].plot(
            [p["step"] for p in h],
            [100 * p["test_error"] for p in h],
            marker=".",
            label=r["variant"],
            **style,
        )
    losses = [v for r in trained for v in r["loss_curve"]["loss"] if v > 0]
    if losses and max(losses) > 10 * min(losses):  # a log axis only where the loss spans decades
        axes[0][0].set_yscale("log")
    axes[0][0].set_xlabel("iteration")
    axes[0][0].set_ylabel(f"training loss (running mean of {window} points)")
    axes[0][0].set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=7)
    axes[0][1].set_xlabel("iteration")
    axes[0][1].set_ylabel("test error (%)")
    diverged = [r["variant"] for r in rows if "diverged" in r]
    if diverged:
        axes[0][1].set_title(f"diverged: {', '.join(diverged)}", fontsize=8)
    return save_figure(fig, out_dir, name)


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    paper: bool = False,
    spec: TrainSpec | None = None,
    depth: int | None = None,
    variants: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``reslab analyze shortcuts``: every variant, one recipe; table next to Table 1.

    ``quick``: the digits, 20 layers, 200 iterations of the digits recipe. Default: the CIFAR-10
    data with the ``paper`` recipe cut to 300 iterations, 20 layers. ``paper``: the paper's
    setting, ResNet-110 for 64k iterations (a GPU's work: about 9 x 64k steps).
    """
    from reslab.analysis.common import format_table
    from reslab.record import write_json

    if quick and paper:
        raise ValueError("--quick and --paper are different budgets; choose one")
    spec = spec or TrainSpec()
    if not quick and "preset" not in spec.overrides:  # the paper's SGD, no resizing
        spec = dataclasses.replace(spec, overrides={"preset": "paper", **spec.overrides})
    splits, cfg = setup(
        spec, quick=quick, quick_iters=200, full_iters=PAPER_ITERS if paper else 300
    )
    depth = depth or (110 if paper else 20)
    rows = shortcut_runs(
        splits, cfg, depth=depth, variants=variants or tuple(VARIANTS), seed=spec.seed
    )
    claim = identity_claim(rows)
    iters = cfg.total_steps(len(splits.train))
    title = f"{splits.name}, {depth} layers, {iters} it., seed {spec.seed}"
    figures = [plot_shortcuts(rows, Path(out_dir), title=title)]
    payload = {
        "meta": experiment_meta("shortcuts", spec, splits, cfg, quick=quick, paper=paper),
        "identity_claim": claim,
        "runs": rows,
    }
    path = write_json(Path(out_dir) / "shortcuts.json", payload)
    cells = [
        {
            "variant": r["variant"],
            "on_shortcut": r["on_shortcut"],
            "on_F": r["on_branch"],
            "final_loss": r.get("final_train_loss", "diverged"),
            "mean_loss": r.get("mean_train_loss"),
            "train_err_%": r.get("final_train_error"),
            "test_err_%": r.get("test_error"),
            "paper_110_%": r["paper_resnet110_test_error"] or "fail",
            "seconds": r.get("seconds"),
        }
        for r in rows
    ]
    table = format_table(cells, list(cells[0]))
    table += "\n\n" + claim_verdict(claim)
    return {"json": path, "figures": figures, "table": table, "data": payload}
