"""Feature levels of a convolutional ResNet, as timm describes and returns them.

Level 0 is the stem's output (before the max-pool), level ``i`` the output of stage ``i``; the
last level of a pre-activation net includes its final BN-ReLU, so it equals ``forward_features``.
:class:`FeatureInfo` gives each level's channels, reduction (output stride) and module name, with
timm's accessors; :class:`FeatureListNet` is the ``features_only=True`` network.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from torch import Tensor, fx, nn

from reslab.models.blocks import UnitLeafTracer
from reslab.models.layers import check_input, traced_for_script

if TYPE_CHECKING:
    from reslab.models.resnet import ResNet

__all__ = ["FeatureInfo", "FeatureListNet", "resolve_out_indices"]

fx.wrap("check_input")


def resolve_out_indices(
    out_indices: int | Sequence[int] | None, num_levels: int
) -> tuple[int, ...]:
    """Absolute, sorted level indices, as timm reads ``out_indices``: None takes every level, an
    int ``k`` the last ``k``, a sequence the levels named (negative counts from the end)."""
    if out_indices is None:
        return tuple(range(num_levels))
    if isinstance(out_indices, int):
        if not 0 < out_indices <= num_levels:
            raise ValueError(f"out_indices={out_indices} takes the last n of {num_levels} levels")
        return tuple(range(num_levels - out_indices, num_levels))
    taken = set()
    for i in out_indices:
        j = num_levels + i if i < 0 else i
        if not 0 <= j < num_levels:
            raise ValueError(
                f"out_indices {tuple(out_indices)}: {i} is not a level of this model, which has "
                f"{num_levels} (0: the stem, 1..{num_levels - 1}: the stages)"
            )
        taken.add(j)
    if not taken:
        raise ValueError("out_indices is empty; name at least one level")
    return tuple(sorted(taken))


class FeatureInfo:
    """Channels (``num_chs``), ``reduction`` and ``module`` of every feature level, with timm's
    accessors: ``channels()``, ``reduction()`` and ``module_name()`` answer for the levels in
    ``out_indices`` (or for ``idx``: one level, or a list of them); indexing and ``len`` cover
    every level, as a list of dicts would."""

    def __init__(self, levels: Sequence[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [{**level, "index": i} for i, level in enumerate(levels)]
        self.out_indices = tuple(out_indices)

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        return FeatureInfo(copy.deepcopy(self.info), out_indices)

    @overload
    def get(self, key: str, idx: None = None) -> list[Any]: ...
    @overload
    def get(self, key: str, idx: int) -> Any: ...
    @overload
    def get(self, key: str, idx: Sequence[int]) -> list[Any]: ...
    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def get_dicts(
        self, keys: Sequence[str] | None = None, idx: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        chosen = self.out_indices if idx is None else idx
        return [
            dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys}
            for i in chosen
        ]

    @overload
    def channels(self, idx: None = None) -> list[int]: ...
    @overload
    def channels(self, idx: int) -> int: ...
    @overload
    def channels(self, idx: Sequence[int]) -> list[int]: ...
    def channels(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        return self.get("num_chs", idx)

    @overload
    def reduction(self, idx: None = None) -> list[int]: ...
    @overload
    def reduction(self, idx: int) -> int: ...
    @overload
    def reduction(self, idx: Sequence[int]) -> list[int]: ...
    def reduction(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        return self.get("reduction", idx)

    @overload
    def module_name(self, idx: None = None) -> list[str]: ...
    @overload
    def module_name(self, idx: int) -> str: ...
    @overload
    def module_name(self, idx: Sequence[int]) -> list[str]: ...
    def module_name(self, idx: int | Sequence[int] | None = None) -> str | list[str]:
        return self.get("module", idx)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.info[i]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info}, out_indices={self.out_indices})"


class FeatureListNet(nn.ModuleDict):
    """``create_model(name, features_only=True, out_indices=...)``: the network without its head,
    returning the feature maps of the levels in ``out_indices`` as a list, in network order.

    It holds the model's own modules under their names (``conv1``, ``bn1``, ``layer1``, ...), up to
    the last level asked for, so its state dict is a subset of the model's. A
    :class:`~reslab.models.resnet.ResNet` registers its modules in forward order, which is what
    lets this run them one after another (torchvision's ``IntermediateLayerGetter`` relies on the
    same).
    """

    def __init__(self, model: ResNet, out_indices: int | Sequence[int] | None = None) -> None:
        take = resolve_out_indices(out_indices, len(model.feature_info))
        returned = [model.feature_info.module_name(i) for i in take]
        modules: dict[str, nn.Module] = {}
        for name, module in model.named_children():
            modules[name] = module
            if name == returned[-1]:
                break
        super().__init__(modules)
        self.return_layers = returned
        self.in_channels = model.config.in_channels
        self.config = model.config
        self.feature_info = model.feature_info.from_other(take)
        # timm drops what describes the classifier from a feature backbone's config
        self.pretrained_cfg = {
            k: v for k, v in model.pretrained_cfg.items() if k not in ("num_classes", "classifier")
        }
        self.default_cfg = self.pretrained_cfg

    def __prepare_scriptable__(self) -> nn.Module:
        """Script the traced graph, as ``ResNet`` does: its containers are new modules, so
        preparing the units for TorchScript leaves the model these modules came from alone."""
        return traced_for_script(self, UnitLeafTracer())

    def forward(self, x: Tensor) -> list[Tensor]:
        check_input(x, self.in_channels)
        features: list[Tensor] = []
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                features.append(x)
        return features
