"""Gradient flow: per-block and per-weight-layer gradient norms, and how they change with depth.

Seed 000 (Herberg 2023): in a plain net ``dL/dW_l`` carries the product of the layer Jacobians,
which vanishes when each factor is below 1 and explodes when above; the residual form replaces
each factor ``J`` by ``I + J`` so the product cannot vanish ("the exploding gradients problem can
still occur"). Seeds 001/002 (He et al. 2016, eq. 5): ``dL/dx_l = dL/dx_L (1 + d/dx_l sum F)``.
Seed 001 (after He et al. 2015, §4.1) adds that BatchNorm already keeps a plain net's gradients
healthy. The sweeps here measure all of these, with and without normalisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab._progress import progress_bar
from reslab.analysis.common import sample_batch
from reslab.analysis.gradflow_figures import plot_conv_sweep, plot_dense_sweep, plot_profiles
from reslab.analysis.hooks import GradientRecorder, find_blocks, find_weight_layers
from reslab.analysis.training import cifar_net
from reslab.models import DenseConfig, ResNetConfig, build_model, get_config

__all__ = [
    "GradientProfile",
    "conv_model",
    "conv_sweep",
    "dense_model",
    "dense_sweep",
    "gradient_profile",
]


@dataclass
class GradientProfile:
    """Gradient norms of one network for one batch.

    ``blocks``: ``||dL/dx||`` at each residual unit's output (``x_{l+1}``), in forward order.
    ``weights``: for each weight layer in forward order, ``||dL/dW||`` and ``||dL/d(Wx)||``.
    ``first_last_ratio`` is the first weight layer's ``||dL/dW||`` over the last one's.
    """

    blocks: list[dict[str, Any]] = field(default_factory=list)
    weights: list[dict[str, Any]] = field(default_factory=list)
    loss: float = float("nan")

    @property
    def first_last_ratio(self) -> float:
        if not self.weights:
            return float("nan")
        return self.weights[0]["weight_grad_norm"] / self.weights[-1]["weight_grad_norm"]

    @property
    def block_ratio(self) -> float:
        """``||dL/dx||`` after the first unit over that after the last unit."""
        if not self.blocks:
            return float("nan")
        return self.blocks[0]["grad_norm"] / self.blocks[-1]["grad_norm"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_last_ratio": self.first_last_ratio,
            "block_ratio": self.block_ratio,
            "loss": self.loss,
            "blocks": self.blocks,
            "weights": self.weights,
        }


def gradient_profile(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    train_mode: bool = True,
) -> GradientProfile:
    """Run one forward/backward pass and record every block's and weight layer's gradient norm.

    ``train_mode`` uses BatchNorm's batch statistics, as in the first training step. The model's
    mode, its buffers (BatchNorm running statistics, which a train-mode pass would move) and any
    existing ``.grad`` are restored afterwards, and no hook stays on the model.
    """
    blocks = find_blocks(model)
    weight_layers = find_weight_layers(model)
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    saved = {p: p.grad for p in model.parameters()}
    for p in saved:
        p.grad = None
    model.train(train_mode)
    try:
        with GradientRecorder(blocks) as brec, GradientRecorder(weight_layers) as wrec:
            loss = loss_fn(model(inputs), targets)
            loss.backward()
        by_name = dict(weight_layers)
        weights = []
        for r in wrec.records():
            w = by_name[r.name].weight
            assert isinstance(w, Tensor)
            g = w.grad
            weights.append(
                {
                    "name": r.name,
                    "weight_grad_norm": float(g.double().norm()) if g is not None else 0.0,
                    "weight_norm": float(w.detach().double().norm()),
                    "act_grad_norm": r.grad_norm,
                    "output_std": r.output_std,
                }
            )
        block_rows = [
            {
                "name": r.name,
                "grad_norm": r.grad_norm,
                "grad_rms": r.grad_rms,
                "output_std": r.output_std,
            }
            for r in brec.records()
        ]
        return GradientProfile(block_rows, weights, float(loss.detach()))
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for p, g in saved.items():
            p.grad = g


# ------------------------------------------------------------------------------------------------
# Model families for the sweeps
# ------------------------------------------------------------------------------------------------


def conv_model(family: str, depth: int, *, norm: bool = True, in_channels: int = 3) -> nn.Module:
    """A CIFAR network of ``depth`` = 6n+2 layers: ``plain``, ``resnet`` (post-activation, He et
    al. 2015 §4.2) or ``preact`` (full pre-activation, He et al. 2016); ``norm=False`` builds it
    without normalisation (``ResNetConfig.norm="none"``), seed 001's question."""
    orderings = {"plain": "original", "resnet": "original", "preact": "full_preact"}
    if family not in orderings:
        raise ValueError(f"unknown family {family!r}; valid choices: {', '.join(orderings)}")
    return cifar_net(
        depth,
        residual=family != "plain",
        ordering=orderings[family],
        in_channels=in_channels,
        norm="batch" if norm else "none",
    )


def dense_model(
    depth: int,
    *,
    activation: str = "tanh",
    residual: bool = True,
    gain: float = 1.0,
    tau: float = 1.0,
    width: int = 64,
    in_features: int = 64,
) -> nn.Module:
    """Seed 000's dense layer ``y + tau*sigma(Wy + b)`` (or its plain twin) ``depth`` times."""
    cfg = DenseConfig.uniform(
        in_features, width, depth, activation=activation, residual=residual, gain=gain, tau=tau
    )
    return build_model(cfg)


# Dense conditions: (activation, gain). Gain scales PyTorch's default init (std = 1/sqrt(3 n)),
# so per-layer Jacobian norms are below 1 for gain <= 1 with any of the three activations, and
# above 1 for gain 4 with tanh/relu (sigmoid' <= 1/4 keeps it small).
DENSE_CONDITIONS: list[tuple[str, float]] = [
    ("sigmoid", 1.0),
    ("tanh", 0.5),
    ("tanh", 1.0),
    ("tanh", 4.0),
    ("relu", 1.0),
    ("relu", 4.0),
]

# Conv conditions: (family, with BatchNorm).
CONV_CONDITIONS: list[tuple[str, bool]] = [
    ("plain", True),
    ("resnet", True),
    ("preact", True),
    ("plain", False),
    ("resnet", False),
    ("preact", False),
]


def _row(profile: GradientProfile, seconds: float, **meta: Any) -> dict[str, Any]:
    return {
        **meta,
        "first_last_ratio": profile.first_last_ratio,
        "block_ratio": profile.block_ratio,
        "first_weight_grad": profile.weights[0]["weight_grad_norm"],
        "last_weight_grad": profile.weights[-1]["weight_grad_norm"],
        "loss": profile.loss,
        "seconds": round(seconds, 3),
    }


def dense_sweep(
    depths: Sequence[int],
    conditions: Sequence[tuple[str, float]] = DENSE_CONDITIONS,
    *,
    batch: tuple[Tensor, Tensor] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    keep_profiles: Sequence[int] = (),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """First/last gradient ratios of plain and residual dense nets (no normalisation).

    Computed in float64 so that ratios of 1e-60 are numbers, not underflowed zeros. Returns the
    rows and the full per-layer profiles for the depths in ``keep_profiles``.
    """
    rows, profiles = [], {}
    bar = progress_bar(total=len(conditions) * 2 * len(depths), desc="dense sweep", unit="net")
    for activation, gain in conditions:
        for residual in (False, True):
            for depth in depths:
                torch.manual_seed(seed)
                model = dense_model(depth, activation=activation, residual=residual, gain=gain)
                model.double()
                if batch is None:
                    x, y, _ = sample_batch(model, batch_size, seed=seed, dtype=torch.float64)
                else:
                    x, y = batch[0].double(), batch[1]
                t0 = time.perf_counter()
                prof = gradient_profile(model, x, y)
                kind = "residual" if residual else "plain"
                rows.append(
                    _row(
                        prof,
                        time.perf_counter() - t0,
                        family=kind,
                        activation=activation,
                        gain=gain,
                        depth=depth,
                    )
                )
                if depth in keep_profiles:
                    profiles[f"{kind}-{activation}-gain{gain:g}-L{depth}"] = prof.to_dict()
                bar.update()
    bar.close()
    return rows, profiles


def conv_sweep(
    depths: Sequence[int],
    conditions: Sequence[tuple[str, bool]] = CONV_CONDITIONS,
    *,
    batch: tuple[Tensor, Tensor] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    max_depth_without_norm: int = 110,
    keep_profiles: Sequence[int] = (),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """First/last gradient ratios of CIFAR plain / ResNet / pre-act ResNet at initialisation.

    Without BN a residual net's forward signal doubles in variance every unit (Kaiming init), so
    very deep un-normalised nets overflow; those are capped at ``max_depth_without_norm``.
    """
    rows, profiles = [], {}
    bar = progress_bar(total=len(conditions) * len(depths), desc="conv sweep", unit="net")
    for family, norm in conditions:
        for depth in depths:
            bar.update()
            if not norm and depth > max_depth_without_norm:
                continue
            torch.manual_seed(seed)
            model = conv_model(family, depth, norm=norm)
            if batch is None:
                x, y, _ = sample_batch(model, batch_size, seed=seed)
            else:
                x, y = batch
            t0 = time.perf_counter()
            prof = gradient_profile(model, x, y)
            rows.append(_row(prof, time.perf_counter() - t0, family=family, norm=norm, depth=depth))
            if depth in keep_profiles:
                key = f"{family}-{'bn' if norm else 'nonorm'}-{depth}"
                profiles[key] = prof.to_dict()
            del model
    bar.close()
    return rows, profiles


def profile_named_models(
    models: dict[str, nn.Module], *, data: str | None = None, batch_size: int = 8, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """``gradient_profile`` of each named model on its natural input (see ``sample_batch``)."""
    out = {}
    for name, model in progress_bar(models.items(), desc="gradflow", unit="net"):
        x, y, source = sample_batch(model, batch_size, data=data, seed=seed)
        torch.manual_seed(seed)
        prof = gradient_profile(model, x, y)
        out[name] = {**prof.to_dict(), "input": source, "batch_size": batch_size}
    return out


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------

DENSE_DEPTHS = {"full": (10, 30, 100, 300, 1000), "quick": (10, 30, 100, 300, 1000)}
CONV_DEPTHS = {"full": (20, 32, 44, 56, 110, 1202), "quick": (20, 56)}


def run_sweeps(
    out_dir: Path, *, quick: bool = False, data: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """Dense and CIFAR depth sweeps at initialisation, their figures and per-layer profiles."""
    budget = "quick" if quick else "full"
    dense_batch = None
    source = "gaussian N(0,1), uniform labels"
    if data is not None:
        probe = dense_model(1)
        x, y, source = sample_batch(probe, 128, data=data, seed=seed, dtype=torch.float64)
        dense_batch = (x.flatten(1), y)
    dense_rows, dense_prof = dense_sweep(
        DENSE_DEPTHS[budget], batch=dense_batch, seed=seed, keep_profiles=(100,)
    )
    conv_rows, conv_prof = conv_sweep(CONV_DEPTHS[budget], seed=seed, keep_profiles=(56,))
    plot_dense_sweep(dense_rows, out_dir)
    plot_conv_sweep(conv_rows, out_dir)
    keep = {k: v for k, v in dense_prof.items() if "sigmoid" in k or "tanh-gain0.5" in k}
    plot_profiles(
        keep,
        out_dir,
        "gradflow_dense_profile.png",
        "dense nets, L = 100, at init (per weight layer)",
    )
    plot_profiles(
        {k: v for k, v in conv_prof.items() if k.endswith("-bn-56")},
        out_dir,
        "gradflow_conv_profile.png",
        "CIFAR nets, 56 layers, with BN, at init",
    )
    return {
        "dense": {"input": source, "dtype": "float64", "rows": dense_rows, "profiles": dense_prof},
        "conv": {
            "input": "gaussian N(0,1) 3x32x32, uniform labels, batch 8, BN in train mode",
            "rows": conv_rows,
            "profiles": conv_prof,
        },
    }


def _named_models(
    out_dir: Path, models: Sequence[str], *, data: str | None, seed: int, batch_size: int
) -> tuple[dict[str, Any], list[Path], str]:
    """Profiles of registered models (at init) and checkpoints: per-model entries, figure, table."""
    from reslab.analysis.common import format_table
    from reslab.models import create_model

    built: dict[str, nn.Module] = {}
    fit_to_data: dict[str, Any] = {}
    if data is not None:  # registered conv nets get the data's channels and classes
        from reslab.analysis.common import load_splits

        splits = load_splits(data, seed=seed)
        fit_to_data = {"in_channels": splits.in_channels, "num_classes": splits.num_classes}
    for name in models:
        if Path(name).exists():  # a checkpoint file or a run folder
            from reslab.train.checkpoint import load_model

            built[name] = load_model(name)
        else:
            torch.manual_seed(seed)
            conv = isinstance(get_config(name), ResNetConfig)
            built[name] = create_model(name, **(fit_to_data if conv else {}))
    entries = profile_named_models(built, data=data, batch_size=batch_size, seed=seed)
    figure = plot_profiles(
        {k: entries[k] for k in built},
        out_dir,
        "gradflow_models.png",
        "per weight layer (model names: at init; paths: checkpoints)",
    )
    columns = ["first_last_ratio", "block_ratio", "loss"]
    rows = [{"model": k, **{c: entries[k][c] for c in columns}} for k in built]
    return entries, [figure], format_table(rows, ["model", *columns])


def _sweep_entries(sweeps: dict[str, Any]) -> dict[str, Any]:
    """Every swept network under its own name, so the file has first_last_ratio per model."""
    entries: dict[str, Any] = {}
    for r in sweeps["dense"]["rows"]:
        key = f"dense_{r['family']}{r['depth']}_{r['activation']}_gain{r['gain']:g}"
        entries[key] = {"first_last_ratio": r["first_last_ratio"], "block_ratio": r["block_ratio"]}
    for r in sweeps["conv"]["rows"]:
        key = f"cifar_{r['family']}{r['depth']}" + ("" if r["norm"] else "_nonorm")
        entries[key] = {"first_last_ratio": r["first_last_ratio"], "block_ratio": r["block_ratio"]}
    return entries


def _sweep_table(sweeps: dict[str, Any]) -> str:
    from reslab.analysis.common import format_table

    names = [
        (r, f"dense {r['family']} {r['activation']} g{r['gain']:g}")
        for r in sweeps["dense"]["rows"]
    ]
    names += [
        (r, f"cifar {r['family']} {'BN' if r['norm'] else 'no-BN'}") for r in sweeps["conv"]["rows"]
    ]
    rows = [
        {
            "net": net,
            "L": r["depth"],
            "first/last dW": r["first_last_ratio"],
            "dx_1/dx_L": r["block_ratio"],
        }
        for r, net in names
    ]
    return format_table(rows, ["net", "L", "first/last dW", "dx_1/dx_L"])


def run(
    out_dir: Path,
    models: Sequence[str] = (),
    *,
    quick: bool = False,
    data: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """``reslab analyze gradflow``: named models (or checkpoints) if given, else the sweeps."""
    from reslab.record import run_record, write_json

    payload: dict[str, Any] = {
        # every network and batch here is built and measured on the CPU
        "meta": run_record("cpu", experiment="gradflow", quick=quick, data=data, seed=seed)
    }
    if models:
        entries, figures, table = _named_models(
            out_dir, models, data=data, seed=seed, batch_size=batch_size
        )
        payload.update(entries)
    else:
        sweeps = run_sweeps(out_dir, quick=quick, data=data, seed=seed)
        payload["sweeps"] = sweeps
        payload.update(_sweep_entries(sweeps))
        names = ("dense_depth", "conv_depth", "dense_profile", "conv_profile")
        figures = [Path(out_dir) / f"gradflow_{n}.png" for n in names]
        table = _sweep_table(sweeps)
    path = write_json(Path(out_dir) / "gradflow.json", payload)
    return {"json": path, "figures": figures, "table": table, "data": payload}
