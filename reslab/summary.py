"""Per-stage tables of a network, in the layout of He et al. 2015 Table 1.

Multiply-adds are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts
the FLOPs of convolutions and matrix products (2 per multiply-add); normalisation, activations and
pooling are not counted, as in the paper's Table 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from reslab.models.dense import DenseResNet
from reslab.models.resnet import ResNet

__all__ = ["ModelSummary", "StageSummary", "count_macs", "format_summary", "summarize"]


@dataclass
class StageSummary:
    name: str
    output_size: list[int]  # (C, H, W) of the stage output, batch dimension dropped
    block: str  # e.g. "[3x3, 64; 3x3, 64] x 2"
    params: int
    macs: int


@dataclass
class ModelSummary:
    model: str
    input_size: list[int]
    params: int
    macs: int
    stages: list[StageSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_macs(fn: Callable[..., Any], *args: Tensor) -> tuple[int, Any]:
    """Multiply-adds of ``fn(*args)`` (FLOPs / 2) and its result."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return counter.get_total_flops() // 2, out


def _params(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


Forward = Callable[[Tensor], Tensor]
Row = tuple[str, str, list[nn.Module | None], Forward]  # name, block spec, modules, forward


def _unit_spec(unit: nn.Module) -> str:
    convs = [m for n, m in unit.named_children() if n.startswith("conv")]
    return "; ".join(
        f"{c.kernel_size[0]}x{c.kernel_size[1]}, {c.out_channels}"
        for c in convs
        if isinstance(c, nn.Conv2d)
    )


def _stage_forward(model: ResNet, stage: nn.Module, *, pool: bool, final: bool) -> Forward:
    def forward(x: Tensor) -> Tensor:
        x = stage(model.maxpool(x) if pool else x)
        return model.final(x) if final else x

    return forward


def _resnet_rows(model: ResNet) -> list[Row]:
    stem = model.conv1
    rows: list[Row] = [
        (
            "conv1",
            f"{stem.kernel_size[0]}x{stem.kernel_size[1]}, {stem.out_channels}, "
            f"stride {stem.stride[0]}",
            [model.conv1, model.bn1],
            model.stem,
        )
    ]
    last = len(model.stage_names) - 1
    for i, name in enumerate(model.stage_names):
        stage = model.get_submodule(name)
        units = list(stage.children())
        spec = f"[{_unit_spec(units[0])}] x {len(units)}"
        pool = i == 0 and isinstance(model.maxpool, nn.MaxPool2d)
        if pool:  # Table 1 lists the max-pool in the conv2_x row
            spec = "3x3 max pool, stride 2; " + spec
        # the final pre-activation (pre-activation nets) belongs to the last stage's row
        modules = [stage, model.final_bn if i == last else None]
        rows.append(
            (
                f"conv{i + 2}_x",
                spec,
                modules,
                _stage_forward(model, stage, pool=pool, final=i == last),
            )
        )
    return rows


def _stages(model: nn.Module) -> list[Row]:
    """(name, block spec, modules, forward) for each row of the table."""
    if isinstance(model, ResNet):
        return _resnet_rows(model)
    if isinstance(model, DenseResNet):
        return [
            (
                f"layer{i + 1}",
                f"{layer.linear.in_features}->{layer.linear.out_features}",
                [layer],
                layer,
            )
            for i, layer in enumerate(model.dense_layers())
        ]
    raise TypeError(f"cannot summarise {type(model).__name__}")


@torch.no_grad()
def summarize(model: nn.Module, input_size: tuple[int, ...], name: str = "") -> ModelSummary:
    """Run one sample of ``input_size`` (C, H, W) through ``model`` stage by stage."""
    if not isinstance(model, ResNet | DenseResNet):
        raise TypeError(f"cannot summarise {type(model).__name__}")
    if not input_size or any(int(d) < 1 for d in input_size):
        raise ValueError(f"input size must be positive (C, H, W), got {tuple(input_size)}")
    if isinstance(model, DenseResNet) and math.prod(input_size) != model.config.widths[0]:
        # the stages below are called one by one, past the model's own input check
        raise ValueError(
            f"{name or 'this dense net'} reads {model.config.widths[0]} values per sample; input "
            f"size {tuple(input_size)} has {math.prod(input_size)}"
        )
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, *input_size)
        if isinstance(model, DenseResNet):
            x = torch.flatten(x, 1)  # dense nets read images as vectors
        summary = ModelSummary(name or type(model).__name__, list(input_size), 0, 0)
        for stage_name, spec, modules, fwd in _stages(model):
            macs, x = count_macs(fwd, x)
            summary.stages.append(
                StageSummary(stage_name, list(x.shape[1:]), spec, _params(*modules), macs)
            )
        macs, x = count_macs(model.forward_head, x)
        head = model.get_classifier()
        spec = f"{head.out_features}-d fc" if isinstance(head, nn.Linear) else "no classifier"
        if isinstance(model, ResNet):
            spec = f"average pool, {spec}"
        summary.stages.append(StageSummary("fc", list(x.shape[1:]), spec, _params(head), macs))
        summary.params = _params(model)
        summary.macs = sum(s.macs for s in summary.stages)
        return summary
    finally:
        model.train(was_training)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_summary(s: ModelSummary) -> str:
    """The table as text: one row per stage, totals at the bottom."""
    rows = [("stage", "output size", "block", "params", "mult-adds")]
    for st in s.stages:
        size = "x".join(str(v) for v in st.output_size[1:]) or str(st.output_size[0])
        if len(st.output_size) == 3:
            size = f"{st.output_size[1]}x{st.output_size[2]}, {st.output_size[0]}"
        rows.append((st.name, size, st.block, f"{st.params:,}", _human(st.macs)))
    rows.append(("total", "", "", f"{s.params:,}", _human(s.macs)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"{s.model}  (input {'x'.join(map(str, s.input_size))})"]
    for k, r in enumerate(rows):
        if k in (1, len(rows) - 1):
            lines.append("  ".join("-" * w for w in widths))
        lines.append(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)
