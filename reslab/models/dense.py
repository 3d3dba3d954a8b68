"""Dense (fully connected) residual networks: the layer of seed 000 and its ODE view.

    y_l = P_l y_{l-1} + tau_l * sigma(W_l y_{l-1} + b_l)

(Herberg 2023, "Lecture Notes: Neural Network Architectures", §ResNet). ``P_l`` is the identity
when the widths match and a learned linear map otherwise (Antil, Díaz, Herberg 2022, §4). With
``tau_l = T / L`` the network is the forward-Euler discretisation of ``y' = sigma(W(t) y + b(t))``
on ``[0, T]`` (Haber & Ruthotto 2017). Learnable ``tau`` initialised at 0 is ReZero
(Bachlechner et al. 2020).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from reslab.models.layers import check_choice

__all__ = ["ACTIVATIONS", "DenseConfig", "DenseResNet", "DenseResidualLayer", "seed_example"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}

#: How ``tau`` is chosen: one fixed value, a fixed per-layer schedule, or learned per layer.
TAU_MODES = ("fixed", "schedule", "learnable")


@dataclass(frozen=True)
class DenseConfig:
    """A dense residual network as data."""

    widths: tuple[int, ...] = (64, 64, 64, 64, 64)  # n_0 (input, flattened) ... n_L
    num_classes: int = 10  # linear read-out after the last layer; 0 for none
    activation: str = "tanh"  # key of ACTIVATIONS
    residual: bool = True  # False: the plain twin y_l = sigma(W_l y_{l-1} + b_l)
    tau: float = 1.0  # step size when tau_mode is "fixed"; initial value when "learnable"
    tau_mode: str = "fixed"  # key of TAU_MODES
    tau_schedule: tuple[float, ...] = ()  # one tau per layer when tau_mode is "schedule"
    weight_outside: bool = False  # y + tau * W sigma(y) + b instead of y + tau * sigma(W y + b)
    bias: bool = True
    gain: float = 1.0  # scale of the default (Kaiming-uniform) weight initialisation

    def __post_init__(self) -> None:
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("tau_mode", self.tau_mode, TAU_MODES)
        if len(self.widths) < 2:
            raise ValueError(f"widths needs an input and at least one layer, got {self.widths}")
        if self.tau_mode == "schedule" and len(self.tau_schedule) != self.depth:
            raise ValueError(
                f"tau_schedule has {len(self.tau_schedule)} values for {self.depth} layers"
            )

    @property
    def depth(self) -> int:
        """Residual layers (the read-out is not counted)."""
        return len(self.widths) - 1

    def taus(self) -> list[float]:
        if self.tau_mode == "schedule":
            return list(self.tau_schedule)
        return [self.tau] * self.depth

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseConfig:
        return cls(**{**d, "widths": tuple(d["widths"]), "tau_schedule": tuple(d["tau_schedule"])})

    @classmethod
    def uniform(cls, in_features: int, width: int, depth: int, **kw: Any) -> DenseConfig:
        """``depth`` layers of ``width`` units after an input of ``in_features``."""
        return cls(widths=(in_features,) + (width,) * depth, **kw)


class DenseResidualLayer(nn.Module):
    """``y = P y + tau * sigma(W y + b)``; plain: ``y = sigma(W y + b)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        activation: str = "tanh",
        residual: bool = True,
        tau: float = 1.0,
        learn_tau: bool = False,
        weight_outside: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.residual, self.weight_outside = residual, weight_outside
        self.act = ACTIVATIONS[activation]()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        if weight_outside and in_features != out_features:
            raise ValueError("weight_outside needs equal widths (sigma acts on y itself)")
        # P: identity when widths match, a learned linear projection otherwise.
        self.proj = (
            nn.Linear(in_features, out_features, bias=False)
            if residual and in_features != out_features
            else nn.Identity()
        )
        t = torch.tensor(float(tau))
        if learn_tau:
            self.tau = nn.Parameter(t)
        else:
            self.register_buffer("tau", t)

    def branch(self, y: Tensor) -> Tensor:
        """The update direction: sigma(W y + b), or W sigma(y) + b for ``weight_outside``."""
        return self.linear(self.act(y)) if self.weight_outside else self.act(self.linear(y))

    def forward(self, y: Tensor) -> Tensor:
        if not self.residual:
            return self.branch(y)
        return self.proj(y) + self.tau * self.branch(y)

    def forward_without_branch(self, y: Tensor) -> Tensor:
        """``P y``: the layer with its update deleted (a lesion, Veit et al. 2016 §4). A plain
        layer leaves ``y``, which needs equal widths (:meth:`can_delete_branch`)."""
        if not self.can_delete_branch():
            raise ValueError(
                f"a plain layer from {self.linear.in_features} to {self.linear.out_features} "
                "features cannot be deleted: nothing would keep the shape"
            )
        return self.proj(y) if self.residual else y

    def can_delete_branch(self) -> bool:
        return self.residual or self.linear.in_features == self.linear.out_features


class DenseResNet(nn.Module):
    """A stack of :class:`DenseResidualLayer`; images are flattened first."""

    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.config = config
        learn = config.tau_mode == "learnable"
        self.layers: nn.ModuleList = nn.ModuleList(
            DenseResidualLayer(
                n_in,
                n_out,
                activation=config.activation,
                residual=config.residual,
                tau=tau,
                learn_tau=learn,
                weight_outside=config.weight_outside,
                bias=config.bias,
            )
            for n_in, n_out, tau in zip(
                config.widths[:-1], config.widths[1:], config.taus(), strict=True
            )
        )
        if config.gain != 1.0:
            with torch.no_grad():
                for layer in self.dense_layers():
                    layer.linear.weight.mul_(config.gain)
        self.in_features = config.widths[0]
        self.num_features = config.widths[-1]
        self.num_classes = config.num_classes
        self.fc: nn.Module = self._classifier(config.num_classes)

    def dense_layers(self) -> list[DenseResidualLayer]:
        """The residual layers, in forward order, typed."""
        return [layer for layer in self.layers if isinstance(layer, DenseResidualLayer)]

    def forward_features(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        check_features(x, self.in_features)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh read-out of ``num_classes`` outputs; 0 removes it (the model returns ``y_L``)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no read-out), got {num_classes}")
        w = next(self.parameters())  # the new head lives with the net, in its dtype (the old
        # head may be an Identity: num_classes=0, no read-out layer)
        self.fc = self._classifier(num_classes).to(device=w.device, dtype=w.dtype)
        self.num_classes = num_classes
        self.config = dataclasses.replace(self.config, num_classes=num_classes)


# fx.wrap: traced graphs keep the check as one call instead of tracing into its branches;
# has_side_effect: and graph clean-ups (create_feature_extractor's) keep that call, which returns
# nothing anyone reads
@fx.node.has_side_effect
@fx.wrap
def check_features(x: Tensor, in_features: int) -> None:
    """Raise a ``ValueError`` unless the flattened input ``x`` has ``in_features`` per sample."""
    if x.shape[1] != in_features:
        if torch.jit.is_scripting():
            raise ValueError(f"expected {in_features} input features per sample")
        raise ValueError(
            f"expected {in_features} input features per sample, got input of shape "
            f"{tuple(x.shape)} ({x.shape[1]} after flattening)"
        )


def seed_example(activation: str = "sigmoid", residual: bool = True) -> DenseResNet:
    """Seed 000's example: one node per layer, three layers, weights W0, W1, W2 and no biases.

    ``y1 = y0 + sigma(W0 y0)``, ``y2 = y1 + sigma(W1 y1)``, ``y3 = y2 + sigma(W2 y2)`` (residual)
    or ``y_l = sigma(W_{l-1} y_{l-1})`` (plain); the loss is taken of ``y3`` directly.
    """
    return DenseResNet(
        DenseConfig(
            widths=(1, 1, 1, 1),
            num_classes=0,
            activation=activation,
            residual=residual,
            bias=False,
        )
    )
