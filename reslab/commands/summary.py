"""``reslab summary`` and ``reslab list``."""

from __future__ import annotations

import argparse
import json

from torch import nn

from reslab.commands.options import image_side, positive_int
from reslab.models import DenseResNet, ResNet, ResNetConfig, create_model, list_models
from reslab.models.layers import SHORTCUT_PADS
from reslab.models.reference import PAPER
from reslab.summary import format_summary, summarize


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-stage table: output sizes, params, multiply-adds")
    p.add_argument("model", help="a registered model name (see `reslab list`)")
    p.add_argument(
        "--input-size",
        type=image_side,
        default=None,
        help="image side in pixels (default: 224 for ImageNet stems, 32 for CIFAR)",
    )
    p.add_argument("--num-classes", type=positive_int, default=None)
    p.add_argument("--in-channels", type=positive_int, default=None)
    p.add_argument("--stride-in", choices=("1x1", "3x3"), default=None)
    p.add_argument(
        "--shortcut-pad",
        choices=tuple(SHORTCUT_PADS),
        default=None,
        help="option A: zero channels after the identity's (default) or split before and after",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_summary)

    p = sub.add_parser("list", help="registered models")
    p.add_argument("pattern", nargs="?", default=None, help="wildcard, e.g. 'cifar_*'")
    p.add_argument(
        "--details", action="store_true", help="a Markdown table with parameters and multiply-adds"
    )
    p.set_defaults(func=run_list)


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """The model's own input size (``pretrained_cfg``); dense nets read flattened 8x8 digits."""
    if isinstance(model, ResNet):
        return tuple(model.pretrained_cfg["input_size"])
    return (1, 8, 8)


def run_summary(args: argparse.Namespace) -> int:
    overrides = {
        k: v
        for k, v in (
            ("num_classes", args.num_classes),
            ("in_channels", args.in_channels),
            ("stride_in", args.stride_in),
            ("shortcut_pad", args.shortcut_pad),
        )
        if v is not None
    }
    model = create_model(args.model, **overrides)
    size = default_input_size(model)
    if args.input_size is not None:
        size = (size[0], args.input_size, args.input_size)
    summary = summarize(model, size, name=args.model)
    if args.json:
        print(json.dumps({**summary.to_dict(), "shortcut": shortcut_kind(model)}, indent=2))
    else:
        kind = shortcut_kind(model)
        print(format_summary(summary) + (f"\nshortcut: {kind}" if kind else ""))
    return 0


def shortcut_kind(model: object) -> str:
    """The shortcut option, and for option A where its zero channels go (``"A (after)"``)."""
    config = getattr(model, "config", None)
    if not isinstance(config, ResNetConfig):
        return ""
    if config.shortcut == "A":
        return f"A ({config.shortcut_pad})"
    return config.shortcut


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:g}"


def model_table(pattern: str | None = None) -> str:
    """Markdown table of every registered model next to the paper's figures."""
    lines = [
        "| model | depth | input | shortcut | params (M) | paper | mult-adds (G) | paper "
        "| source |",
        "|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for name in list_models(pattern):
        model = create_model(name)
        size = default_input_size(model)
        depth = model.config.depth if isinstance(model, ResNet | DenseResNet) else ""
        s = summarize(model, size, name=name)
        p_params, p_macs, source = PAPER.get(name, (None, None, ""))
        lines.append(
            f"| `{name}` | {depth} | {'x'.join(map(str, size))} "
            f"| {shortcut_kind(model) or '-'} "
            f"| {s.params / 1e6:.2f} | {_fmt(p_params)} | {s.macs / 1e9:.2f} | {_fmt(p_macs)} "
            f"| {source} |"
        )
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    if args.details:
        print(model_table(args.pattern))
    else:
        print("\n".join(list_models(args.pattern)))
    return 0
