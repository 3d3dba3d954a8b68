"""Seed 000's toy example: one node per layer, three layers, weights only.

    plain:     y_l = sigma(W_{l-1} y_{l-1})
    residual:  y_l = y_{l-1} + sigma(W_{l-1} y_{l-1})

Seed 000 (Herberg 2023, eq. "ResNetder") writes the gradient as a product,

    dL/dW_l = dL/dy_L * prod_{j=L}^{l+2} (I + da_j/dy_{j-1}) * dy_{l+1}/dW_l,

and without the ``I`` for the plain net. Here the product is evaluated term by term and compared
with autograd on :func:`reslab.models.seed_example`. The same chain with L layers shows the
vanishing product of the plain net and the product of ``1 + ...`` factors of the residual one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reslab.analysis.common import new_figure, save_figure
from reslab.models import DenseConfig, DenseResNet
from reslab.models.dense import ACTIVATIONS, seed_example

__all__ = ["chain_gradients", "formula_gradients", "seed_toy"]


def _act_and_derivative(activation: str, z: Tensor) -> tuple[Tensor, Tensor]:
    z = z.detach().requires_grad_(True)
    a = ACTIVATIONS[activation]()(z)
    (d,) = torch.autograd.grad(a, z)
    return a.detach(), d


def formula_gradients(
    weights: Sequence[float], y0: float, *, activation: str, residual: bool, target: float = 0.0
) -> dict[str, Any]:
    """The seed's product formula for ``L = (y_L - target)^2 / 2``, evaluated term by term."""
    dtype = torch.float64
    ys = [torch.tensor(y0, dtype=dtype)]
    da_dy, dy_dw = [], []  # da_l/dy_{l-1} = sigma'(W y) W ;  da_l/dW_{l-1} = sigma'(W y) y
    for w in weights:
        a, d = _act_and_derivative(activation, w * ys[-1])
        da_dy.append(d * w)
        dy_dw.append(d * ys[-1])
        ys.append(ys[-1] + a if residual else a)
    dl_dy = ys[-1] - target
    grads, factors = [], []
    L = len(weights)
    for ell in range(L):
        # prod over j = L .. ell+2 of (1 + da_j/dy_{j-1}); layers are 1-based in the seed.
        chain = [(1.0 if residual else 0.0) + da_dy[j - 1] for j in range(L, ell + 1, -1)]
        prod = torch.prod(torch.stack(chain)) if chain else torch.tensor(1.0, dtype=dtype)
        grads.append(float(dl_dy * prod * dy_dw[ell]))
        factors.append([float(c) for c in chain])
    return {
        "y": [float(y) for y in ys],
        "dL_dy_L": float(dl_dy),
        "factors": factors,  # the chain factors for dL/dW_0, dL/dW_1, ...
        "grad": grads,
    }


def _set_chain(model: DenseResNet, weights: Sequence[float]) -> None:
    with torch.no_grad():
        for layer, w in zip(model.dense_layers(), weights, strict=True):
            layer.linear.weight.fill_(w)


def autograd_gradients(model: DenseResNet, y0: float, target: float = 0.0) -> list[float]:
    model = model.double()
    y = model(torch.tensor([[y0]], dtype=torch.float64))
    loss = 0.5 * (y.squeeze() - target) ** 2
    grads = torch.autograd.grad(loss, [layer.linear.weight for layer in model.dense_layers()])
    return [float(g.squeeze()) for g in grads]


def seed_toy(
    weights: Sequence[float] = (0.8, -1.5, 1.2),
    y0: float = 1.0,
    *,
    activation: str = "sigmoid",
    target: float = 0.0,
) -> dict[str, Any]:
    """Autograd next to the seed's formula for the 3-layer plain and residual toy nets."""
    out: dict[str, Any] = {
        "weights": list(weights),
        "y0": y0,
        "activation": activation,
        "loss": "(y3 - target)^2 / 2",
        "target": target,
    }
    for residual in (False, True):
        model = seed_example(activation=activation, residual=residual).double()
        _set_chain(model, weights)
        auto = autograd_gradients(model, y0, target)
        form = formula_gradients(
            weights, y0, activation=activation, residual=residual, target=target
        )
        out["residual" if residual else "plain"] = {
            **form,
            "autograd": auto,
            "max_abs_diff": max(abs(a - b) for a, b in zip(auto, form["grad"], strict=True)),
        }
    return out


def chain_gradients(
    depths: Sequence[int], *, weight: float = 1.0, y0: float = 1.0, activation: str = "sigmoid"
) -> list[dict[str, Any]]:
    """``|dL/dW_0|`` of the 1-node chain with ``L`` layers (all weights equal), both ways."""
    rows = []
    for L in depths:
        row: dict[str, Any] = {"depth": L}
        for residual in (False, True):
            cfg = DenseConfig(
                widths=(1,) * (L + 1),
                num_classes=0,
                activation=activation,
                residual=residual,
                bias=False,
            )
            model = DenseResNet(cfg).double()
            _set_chain(model, [weight] * L)
            auto = autograd_gradients(model, y0, target=0.0)
            form = formula_gradients([weight] * L, y0, activation=activation, residual=residual)
            key = "residual" if residual else "plain"
            row[f"{key}_autograd"] = auto[0]
            row[f"{key}_formula"] = form["grad"][0]
        rows.append(row)
    return rows


def plot_chain(rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "toy_chain.png") -> Path:
    fig, axes = new_figure(size=(5.2, 3.6))
    ax = axes[0][0]
    depths = [r["depth"] for r in rows]
    for key, style in (("plain", "s--"), ("residual", "o-")):
        ax.plot(depths, [abs(r[f"{key}_autograd"]) for r in rows], style, label=f"{key} (autograd)")
        ax.plot(depths, [abs(r[f"{key}_formula"]) for r in rows], "k:", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("layers L (one node each, all W = 1, sigmoid)")
    ax.set_ylabel("|dL/dW_0|")
    ax.set_title("seed 000 chain: product formula (dotted) = autograd")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def run(out_dir: Path, *, quick: bool = False, activation: str = "sigmoid") -> dict[str, Any]:
    """The toy experiment: JSON, one figure, and a table of autograd vs formula."""
    from reslab.analysis.common import format_table
    from reslab.record import run_record, write_json

    toy = seed_toy(activation=activation)
    chain = chain_gradients((1, 2, 3, 5, 10, 20, 30, 50), activation=activation)
    fig = plot_chain(chain, out_dir)
    meta = run_record("cpu", experiment="toy", quick=quick)  # float64 on the CPU
    path = write_json(Path(out_dir) / "toy.json", {"meta": meta, "seed_toy": toy, "chain": chain})
    rows = []
    for kind in ("plain", "residual"):
        for i in range(3):
            rows.append(
                {
                    "net": kind,
                    "grad": f"dL/dW{i}",
                    "autograd": toy[kind]["autograd"][i],
                    "formula": toy[kind]["grad"][i],
                    "|diff|": abs(toy[kind]["autograd"][i] - toy[kind]["grad"][i]),
                }
            )
    table = format_table(rows, ["net", "grad", "autograd", "formula", "|diff|"])
    return {"json": path, "figures": [fig], "table": table, "data": toy}
