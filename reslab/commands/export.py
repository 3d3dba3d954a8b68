"""``reslab export``: a checkpoint to ONNX or ``.pt2``, checked against the eager network. A thin
wrapper around :func:`reslab.deploy.export.export_model`."""

from __future__ import annotations

import argparse
from pathlib import Path

from reslab.commands.options import image_side, positive_int

__all__ = ["add_parser", "run_export"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX or torch.export (.pt2), optionally int8",
        description="Write the network of a checkpoint or run folder as an ONNX file or a "
        "torch.export program. The graph takes raw NCHW pixels (dynamic batch) at the "
        "checkpoint's input size and normalises them inside; resizing stays outside and is "
        "described, with the class names, in the embedded metadata (a NAME.json sidecar too "
        "for .pt2). The written file is checked against the eager network.",
    )
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="default onnx")
    p.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold each BatchNorm into the convolution before it (same outputs, fewer passes)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="int8 via torchao's PyTorch 2 export quantisation, calibrated on training images",
    )
    p.add_argument(
        "--input",
        dest="input_dtype",
        choices=("float", "uint8"),
        default="float",
        help="graph input: float32 pixels in 0..1 (default) or uint8 0..255",
    )
    p.add_argument("--out", type=Path, metavar="FILE", help="default: beside the checkpoint")
    p.add_argument(
        "--image-size",
        type=image_side,
        help="input side where the checkpoint does not fix it (default: its training size)",
    )
    p.add_argument(
        "--data",
        help="calibration data for --int8 (default: the run's, from its config.json)",
    )
    p.add_argument(
        "--calibration-images",
        type=positive_int,
        default=512,
        help="training images that calibrate --int8 (default 512)",
    )
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from reslab.deploy.export import ExportOptions, export_model

    options = ExportOptions(
        format=args.format,
        fold_bn=args.fold_bn,
        int8=args.int8,
        input_dtype=args.input_dtype,
        image_size=args.image_size,
        data=args.data,
        calibration_images=args.calibration_images,
    )
    if args.data is not None and not args.int8:
        raise ValueError("--data is the int8 calibration data: it needs --int8")
    result = export_model(args.checkpoint, args.out, options)
    inp = result.metadata["input"]
    extras = [s for s, on in (("BatchNorm folded", args.fold_bn), ("int8", args.int8)) if on]
    shape = "x".join(map(str, inp["shape"]))
    extra = "".join("; " + e for e in extras)
    print(
        f"wrote {result.path} ({args.format}; {inp['dtype']} input {shape}, "
        f"normalisation inside{extra})"
    )
    if result.sidecar is not None:
        print(f"metadata: {result.sidecar} (also inside the file)")
    if result.top1_agreement is not None:
        print(f"check: {100 * result.top1_agreement:.2f}% {result.check}")
    elif result.max_abs_diff is not None:
        print(
            f"check: {result.max_abs_diff:.2e} {result.check} (largest logit "
            f"{result.max_abs_logit:.3g})"
        )
    else:
        print(f"check: {result.check}")
    return 0
