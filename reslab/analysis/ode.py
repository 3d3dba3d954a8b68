"""The ODE view of seed 000: ``y_l = y_{l-1} + tau * sigma(W_{l-1} y_{l-1} + b_{l-1})``.

With ``tau = T / L`` and the layer weights sampled from one continuous ``W(t), b(t)`` at the
layer times ``t_{l-1} = (l - 1) tau``, the residual net is the forward-Euler discretisation of
``y'(t) = sigma(W(t) y + b(t))`` on ``[0, T]`` (Haber & Ruthotto 2017; Chen et al. 2018), so its
output converges to ``y(T)`` with error O(1/L). Also here: ``tau``'s effect on gradient norms and a
learnable per-layer ``tau`` (Antil, Díaz & Herberg 2022) against a fixed one on real data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from reslab._progress import progress_bar
from reslab.analysis.common import new_figure, sample_batch, save_figure
from reslab.analysis.gradflow import dense_model, gradient_profile
from reslab.models import DenseConfig, DenseResNet
from reslab.models.dense import ACTIVATIONS

__all__ = [
    "ContinuousWeights",
    "euler_convergence",
    "euler_net",
    "learnable_vs_fixed_tau",
    "tau_gradient_sweep",
]


class ContinuousWeights:
    """``W(t) = A + t B`` and ``b(t) = c + t d`` with Gaussian ``A, B`` of variance 1/width."""

    def __init__(self, width: int, *, seed: int = 0, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        s = scale / math.sqrt(width)
        self.A, self.B = (
            torch.randn(width, width, generator=g, dtype=torch.float64) * s for _ in range(2)
        )
        self.c, self.d = (
            torch.randn(width, generator=g, dtype=torch.float64) * 0.1 for _ in range(2)
        )

    def __call__(self, t: float) -> tuple[Tensor, Tensor]:
        return self.A + t * self.B, self.c + t * self.d


def euler_net(
    weights: ContinuousWeights, depth: int, *, T: float = 1.0, activation: str = "tanh"
) -> nn.Module:
    """A :class:`~reslab.models.DenseResNet` with ``tau = T/L`` whose layer ``l`` holds
    ``W(t_{l-1}), b(t_{l-1})``: forward Euler for ``y' = sigma(W(t) y + b(t))``."""
    width = weights.A.shape[0]
    cfg = DenseConfig.uniform(
        width, width, depth, num_classes=0, activation=activation, tau=T / depth
    )
    model = DenseResNet(cfg).double()
    with torch.no_grad():
        for i, layer in enumerate(model.dense_layers()):
            W, b = weights(i * T / depth)
            layer.linear.weight.copy_(W)
            layer.linear.bias.copy_(b)
    return model


def rk4_reference(
    weights: ContinuousWeights,
    y0: Tensor,
    *,
    T: float = 1.0,
    activation: str = "tanh",
    steps: int = 4096,
) -> Tensor:
    """Classical Runge-Kutta on a fine grid: the ODE's solution ``y(T)`` to ~1e-12."""
    act = ACTIVATIONS[activation]()

    def f(t: float, y: Tensor) -> Tensor:
        W, b = weights(t)
        return act(y @ W.T + b)

    h, y = T / steps, y0
    for k in range(steps):
        t = k * h
        k1 = f(t, y)
        k2 = f(t + h / 2, y + h / 2 * k1)
        k3 = f(t + h / 2, y + h / 2 * k2)
        k4 = f(t + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


def euler_convergence(
    depths: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    *,
    width: int = 16,
    T: float = 1.0,
    activation: str = "tanh",
    batch_size: int = 64,
    seed: int = 0,
    scale: float = 2.0,
) -> list[dict[str, Any]]:
    """Distance of each net's output to the ODE solution and to the net with twice the layers."""
    weights = ContinuousWeights(width, seed=seed, scale=scale)
    g = torch.Generator().manual_seed(seed + 1)
    y0 = torch.randn(batch_size, width, generator=g, dtype=torch.float64)
    ref = rk4_reference(weights, y0, T=T, activation=activation)
    outs = {}
    with torch.no_grad():
        for L in progress_bar(depths, desc="euler", unit="net", leave=False):
            outs[L] = euler_net(weights, L, T=T, activation=activation)(y0)
    rows = []
    for L in depths:
        err = (outs[L] - ref).norm(dim=1) / ref.norm(dim=1)
        row = {"depth": L, "tau": T / L, "relative_error_to_ode": float(err.mean())}
        if 2 * L in outs:
            row["distance_to_2L"] = float(
                ((outs[L] - outs[2 * L]).norm(dim=1) / ref.norm(dim=1)).mean()
            )
        rows.append(row)
    return rows


def tau_gradient_sweep(
    taus: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 2.0),
    *,
    depth: int = 100,
    activations: Sequence[str] = ("tanh", "relu"),
    seed: int = 0,
    batch: tuple[Tensor, Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Gradient ratios of a ``depth``-layer dense residual net as ``tau`` varies (at init)."""
    rows = []
    taus_bar = progress_bar(total=len(activations) * len(taus), desc="tau sweep", unit="net")
    for act in activations:
        for tau in taus:
            torch.manual_seed(seed)
            model = dense_model(depth, activation=act, tau=tau).double()
            if batch is None:
                x, y, _ = sample_batch(model, 128, seed=seed, dtype=torch.float64)
            else:
                x, y = batch[0].double(), batch[1]
            prof = gradient_profile(model, x, y)
            rows.append(
                {
                    "activation": act,
                    "tau": tau,
                    "depth": depth,
                    "block_ratio": prof.block_ratio,
                    "first_last_ratio": prof.first_last_ratio,
                    "first_weight_grad": prof.weights[0]["weight_grad_norm"],
                    "output_std": prof.blocks[-1]["output_std"],
                }
            )
            taus_bar.update()
    taus_bar.close()
    return rows


def learnable_vs_fixed_tau(
    splits: Any,
    *,
    depth: int = 16,
    width: int = 64,
    T: float = 1.0,
    activation: str = "tanh",
    iters: int = 600,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the same dense residual net with fixed ``tau = T/L`` and with learnable per-layer
    ``tau`` (initialised at ``T/L``) using one recipe; returns accuracies and learned taus."""
    from reslab.train import TrainConfig, fit

    in_features = (
        splits.in_channels * splits.image_size**2
        if isinstance(splits.image_size, int)
        else splits.in_channels * math.prod(splits.image_size)
    )
    out: dict[str, Any] = {
        "depth": depth,
        "width": width,
        "T": T,
        "activation": activation,
        "iters": iters,
    }
    # Third arm: fixed tau again, but with the total time the learnable net ended with, to tell
    # per-layer adaptivity apart from a longer integration time T.
    arms = [("fixed", "fixed", T / depth), ("learnable", "learnable", T / depth)]
    every = [*arms, ("fixed_matched_T", "fixed", None)]
    for key, mode, tau in progress_bar(every, desc="learnable tau", unit="net"):
        if tau is None:
            tau = max(sum(out["learnable"]["taus"]), 1e-3) / depth
        torch.manual_seed(seed)
        cfg = DenseConfig.uniform(
            in_features,
            width,
            depth,
            num_classes=splits.num_classes,
            activation=activation,
            tau=tau,
            tau_mode=mode,
        )
        model = DenseResNet(cfg)
        tcfg = TrainConfig.preset("digits", iters=iters, seed=seed)
        t0 = time.perf_counter()
        result = fit(model, splits, tcfg, None)
        out[key] = {
            "test_accuracy": result.summary.get("test_accuracy"),
            "val_accuracy": result.summary.get("val_accuracy"),
            "T": tau * depth if mode == "fixed" else None,
            "taus": [
                float(layer.tau.detach())
                for layer in cast(DenseResNet, result.model).dense_layers()
            ],
            "seconds": round(time.perf_counter() - t0, 1),
            "history": result.history,
        }
    return out


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


def plot_euler(rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "ode_euler.png") -> Path:
    fig, axes = new_figure(size=(5.2, 3.6))
    ax = axes[0][0]
    L = [r["depth"] for r in rows]
    err = [r["relative_error_to_ode"] for r in rows]
    ax.loglog(L, err, "o-", label="|y_L - y(T)| / |y(T)|  (RK4 reference)")
    d2 = [(r["depth"], r["distance_to_2L"]) for r in rows if "distance_to_2L" in r]
    ax.loglog(*zip(*d2, strict=True), "s--", label="|y_L - y_2L| / |y(T)|")
    ax.loglog(L, [err[0] * L[0] / x for x in L], "k:", label="slope -1 (Euler is O(tau))")
    ax.set_xlabel("layers L (tau = T/L)")
    ax.set_ylabel("relative distance")
    ax.set_title("residual nets with tau = T/L converge to the ODE")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def plot_tau_gradients(
    rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "ode_tau_grad.png"
) -> Path:
    fig, axes = new_figure(size=(5.2, 3.6))
    ax = axes[0][0]
    for act in sorted({r["activation"] for r in rows}):
        sel = [r for r in rows if r["activation"] == act]
        ax.loglog(
            [r["tau"] for r in sel],
            [r["block_ratio"] or float("nan") for r in sel],
            "o-",
            label=f"{act}: |dL/dx_1| / |dL/dx_L|",
        )
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("tau")
    ax.set_ylabel("gradient ratio, first/last unit")
    ax.set_title(f"dense residual net, L = {rows[0]['depth']}, at init")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def plot_learned_tau(
    result: dict[str, Any], out_dir: Path, name: str = "ode_tau_learned.png"
) -> Path:
    fig, axes = new_figure(size=(5.2, 3.6))
    ax = axes[0][0]
    for mode in ("fixed", "learnable", "fixed_matched_T"):
        r = result[mode]
        ax.plot(
            range(1, len(r["taus"]) + 1),
            r["taus"],
            "o-",
            label=f"{mode}: test acc {100 * (r['test_accuracy'] or 0):.1f}%",
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("tau after training")
    ax.set_title(f"dense residual net, L = {result['depth']}, {result['iters']} iterations")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    data: str | None = None,
    seed: int = 0,
    iters: int | None = None,
) -> dict[str, Any]:
    """``reslab analyze ode``: Euler convergence, tau vs gradients, learnable vs fixed tau."""
    from reslab.analysis.common import format_table, load_splits
    from reslab.record import run_record, write_json

    depths = (
        (2, 4, 8, 16, 32, 64, 128, 256) if quick else (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    )
    euler = euler_convergence(depths, seed=seed)
    taus = (0.01, 0.1, 0.3, 1.0) if quick else (0.01, 0.03, 0.1, 0.3, 1.0, 2.0)
    tau_rows = tau_gradient_sweep(taus, depth=100, seed=seed)
    figures = [plot_euler(euler, out_dir), plot_tau_gradients(tau_rows, out_dir)]
    data = data or "digits"
    splits = load_splits(data, seed=seed)
    learned = learnable_vs_fixed_tau(splits, iters=iters or (300 if quick else 1500), seed=seed)
    figures.append(plot_learned_tau(learned, out_dir))
    payload = {  # device: the training arms' ("auto"); the sweeps run in float64 on the CPU
        "meta": run_record("auto", experiment="ode", quick=quick, data=data, seed=seed),
        "euler": euler,
        "tau_gradients": tau_rows,
        "learnable_vs_fixed": learned,
    }
    path = write_json(Path(out_dir) / "ode.json", payload)
    rows = [
        {
            "part": "euler",
            "setting": f"L={r['depth']}",
            "value": r["relative_error_to_ode"],
            "what": "rel. distance to ODE solution",
        }
        for r in euler
    ]
    rows += [
        {
            "part": "tau-grad",
            "setting": f"{r['activation']} tau={r['tau']:g}",
            "value": r["block_ratio"],
            "what": "|dL/dx_1|/|dL/dx_L|, L=100",
        }
        for r in tau_rows
    ]
    rows += [
        {
            "part": "digits",
            "setting": f"tau {m}",
            "value": learned[m]["test_accuracy"],
            "what": "test accuracy",
        }
        for m in ("fixed", "learnable", "fixed_matched_T")
    ]
    table = format_table(rows, ["part", "setting", "value", "what"])
    return {"json": path, "figures": figures, "table": table, "data": payload}
