"""Export a trained checkpoint to ONNX or a ``torch.export`` program (``.pt2``), checked against
the eager network in the same call (as timm's ``onnx_export``/``onnx_validate`` pair, one step).

The exported graph is :class:`~reslab.deploy.graph.InferenceModel`: it takes raw pixels (uint8
0..255, or float 0..1) of the checkpoint's input size with a dynamic batch dimension, normalises
them inside, and returns logits. Resizing stays outside, described by the metadata. BatchNorm
folding (``fold_bn``) and int8 (``int8``: torchao's pt2e flow, calibrated on the run's training
images) are options. The metadata (:func:`build_metadata`) is embedded: ONNX ``metadata_props``,
and for ``.pt2`` an extra file in the archive plus a JSON sidecar ``NAME.json``.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab._io import atomic_path
from reslab.deploy.checkpoint import Trained, load_trained
from reslab.deploy.graph import INPUT_DTYPES, InferenceModel, fold_batchnorm
from reslab.deploy.inputs import InputSpec

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "ExportOptions",
    "ExportResult",
    "build_metadata",
    "calibration_images",
    "example_input",
    "export_model",
    "sidecar_path",
]

FORMATS = ("onnx", "pt2")
METADATA_KEY = "reslab"  # ONNX metadata_props key / .pt2 extra file stem of the JSON metadata
METADATA_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass(frozen=True)
class ExportOptions:
    """How to export. ``data``: the int8 calibration data (default: the run's, from its
    config.json); ``calibration_images``: how many of its training images calibrate."""

    format: str = "onnx"
    fold_bn: bool = False
    int8: bool = False
    input_dtype: str = "float"  # "float" (0..1) or "uint8" (0..255)
    image_size: int | None = None  # only where the checkpoint does not fix the size
    data: str | None = None
    calibration_images: int = 512
    check_images: int = 1000  # held-out images the int8 check runs (at most)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown export format {self.format!r}; valid choices: onnx, pt2")
        if self.input_dtype not in INPUT_DTYPES:
            raise ValueError(f"unknown input dtype {self.input_dtype!r}; valid: float, uint8")
        if self.calibration_images < 1 or self.check_images < 1:
            raise ValueError(
                "calibration_images and check_images must be >= 1, got "
                f"{self.calibration_images} and {self.check_images}"
            )


@dataclass
class ExportResult:
    """Where the model went and how closely it matches the eager network: ``max_abs_diff`` of
    the logits (fp32) or ``top1_agreement`` with the fp32 network (int8), on ``check_images``
    images (``check`` says which, or why the check did not run)."""

    path: Path
    metadata: dict[str, Any]
    sidecar: Path | None = None
    max_abs_diff: float | None = None
    max_abs_logit: float | None = None
    top1_agreement: float | None = None
    check_images: int = 0
    check: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def sidecar_path(path: Path) -> Path:
    """``model.pt2`` -> ``model.json``: the metadata beside a .pt2 program."""
    return path.with_suffix(".json")


def example_input(spec: InputSpec, input_dtype: str, batch: int = 2, seed: int = 0) -> Tensor:
    """Random pixels in the dtype and range the exported graph takes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, spec.channels, spec.height, spec.width), generator=g)
    return x.to(torch.uint8) if input_dtype == "uint8" else x.float() / 255


def build_metadata(trained: Trained, options: ExportOptions, spec: InputSpec) -> dict[str, Any]:
    """Everything a consumer needs to feed the graph and read its output, JSON-ready."""
    from reslab import __version__
    from reslab.deploy.quantize import SCHEME
    from reslab.models.weights import file_sha256

    uint8 = options.input_dtype == "uint8"
    # outside the graph: resize every image to height x width first
    resize = {
        "height": spec.height,
        "width": spec.width,
        "interpolation": spec.interpolation,
        "fixed": spec.fixed_size,
        # the evaluation view: shorter side to this, then the centre crop; null: straight
        "shorter_side": spec.resize,
    }
    int8 = None
    if options.int8:
        int8 = {
            "scheme": SCHEME,
            "calibration_images": options.calibration_images,
            "calibration_data": _data_spec(trained, options),
        }
    return {
        "metadata_version": METADATA_VERSION,
        "reslab_version": __version__,
        "torch_version": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "format": options.format,
        "source": str(trained.path),
        "source_sha256": file_sha256(trained.path),
        "model_name": trained.run.get("model_name"),
        "model_kind": trained.meta.get("model_kind", "resnet"),
        "model_config": trained.meta.get("model_config"),
        "classes": trained.classes,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8" if uint8 else "float32",
            "layout": "NCHW",
            "shape": ["batch", spec.channels, spec.height, spec.width],
            "value_range": [0, 255] if uint8 else [0.0, 1.0],
            "resize": resize,
        },
        "normalization": {  # inside the graph: (x / range - mean) / std
            "mode": spec.normalization,
            "mean": spec.mean.tolist(),
            "std": spec.std.tolist(),
            "in_graph": True,
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(trained.classes)], "kind": "logits"},
        "fold_bn": options.fold_bn,
        "int8": int8,
    }


def _data_spec(trained: Trained, options: ExportOptions) -> str | None:
    return options.data or trained.run.get("data_spec")


def calibration_images(
    trained: Trained, options: ExportOptions, spec: InputSpec
) -> tuple[Tensor, Tensor]:
    """(calibration, check): ``options.calibration_images`` random training images of the
    run's data and up to ``options.check_images`` held-out ones (validation split, else test)
    to measure top-1 agreement on, uint8 at the export's input size."""

    from reslab.data import load_data

    spec_data = _data_spec(trained, options)
    if spec_data is None:
        raise ValueError(
            f"int8 calibration needs the run's training images and {trained.path.parent} has "
            "no config.json naming them: pass --data"
        )
    seed = int((trained.meta.get("train_config") or {}).get("seed", 0))
    if options.data is None:  # the run's own split: its classes and validation size
        classes, val_size = trained.meta.get("classes"), trained.run.get("val_size")
    else:  # other images: only their pixel statistics matter
        classes, val_size = None, None
    splits = load_data(spec_data, seed=seed, classes=classes, val_size=val_size)
    if splits.in_channels != spec.channels:
        raise ValueError(
            f"{spec_data} has {splits.in_channels}-channel images; the network takes "
            f"{spec.channels}"
        )
    size = (splits.train.images.shape[-2], splits.train.images.shape[-1])
    if size != (spec.height, spec.width) and not spec.fixed_size and options.image_size is None:
        # the checkpoint does not record its training size (a per-channel normalisation): the
        # default would calibrate, and export, a network for images it never saw at that size
        raise ValueError(
            f"{spec_data} has {size[0]}x{size[1]} images but the checkpoint records no input "
            f"size (the default is {spec.height}x{spec.width}): pass --image-size {size[0]}"
        )
    g = torch.Generator().manual_seed(options.seed)
    pick = torch.randperm(len(splits.train), generator=g)[: options.calibration_images]
    held = splits.val if len(splits.val) else splits.test

    view = spec.input_config().eval_transform()  # as evaluation brings images to the input

    def sized(x: Tensor) -> Tensor:
        return x if tuple(x.shape[-2:]) == (spec.height, spec.width) else view(x)

    return sized(splits.train.images[pick]), sized(held.images[: options.check_images])


def _as_input(x: Tensor, input_dtype: str) -> Tensor:
    return x if input_dtype == "uint8" else x.float() / 255


def _graph(trained: Trained, options: ExportOptions, spec: InputSpec) -> tuple[nn.Module, Any]:
    """The module to export, and (for int8) the held-out images to check agreement on."""
    model: nn.Module = InferenceModel(trained.net, spec, options.input_dtype).eval()
    example = example_input(spec, options.input_dtype)
    if options.fold_bn:
        model = fold_batchnorm(model, example)
    if not options.int8:
        return model, None
    from reslab.deploy.quantize import quantize_int8

    calibration, held = calibration_images(trained, options, spec)
    return quantize_int8(model, _as_input(calibration, options.input_dtype)), held


def _export_program(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _write_onnx(model: nn.Module, example: Tensor, path: Path, meta: dict[str, Any]) -> None:
    import onnx

    # The TorchDynamo-based exporter (dynamo=True, needs onnxscript): the TorchScript one is
    # deprecated in torch 2.9+ and cannot translate the pt2e int8 graph.
    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(None):  # its progress lines are not ours to print
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), verbose=False,
        )  # fmt: skip
    assert program is not None
    proto = program.model_proto
    flat = {
        METADATA_KEY: json.dumps(meta),
        "classes": json.dumps(meta["classes"]),
        "input_dtype": meta["input"]["dtype"],
        "input_size": "x".join(map(str, meta["input"]["shape"][1:])),
        "mean": json.dumps(meta["normalization"]["mean"]),
        "std": json.dumps(meta["normalization"]["std"]),
        "reslab_version": meta["reslab_version"],
    }
    del proto.metadata_props[:]
    for key, value in flat.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "reslab export: raw NCHW pixels in, logits out; see metadata 'reslab'"
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))


def _write_pt2(model: nn.Module, example: Tensor, path: Path, meta: dict[str, Any]) -> Path:
    program = _export_program(model, example)
    text = json.dumps(meta, indent=1)
    sidecar = sidecar_path(path)
    with atomic_path(path) as tmp, atomic_path(sidecar) as tmp_json:
        with open(tmp, "wb") as f:  # a file object: the temporary name does not end in .pt2
            torch.export.save(program, f, extra_files={f"{METADATA_KEY}.json": text})
        tmp_json.write_text(text + "\n")
    return sidecar


def default_out(trained: Trained, source: Path, options: ExportOptions) -> Path:
    """``RUN/model[-folded][-int8].FORMAT`` for a run folder, ``CKPT[...].FORMAT`` beside a file."""
    tags = ("-folded" if options.fold_bn else "") + ("-int8" if options.int8 else "")
    stem = "model" if source.is_dir() else trained.path.stem
    return trained.path.parent / f"{stem}{tags}.{options.format}"


def export_model(
    source: str | Path, out: str | Path | None = None, options: ExportOptions = ExportOptions()
) -> ExportResult:
    """Export the checkpoint (or run folder) ``source`` to ``out`` (default: beside it) and
    check the written file against the eager network (ONNX under ONNX Runtime when installed;
    ``.pt2`` reloaded with ``torch.export.load``). Writing is atomic: a failure leaves no file.
    """
    from reslab.deploy.runtime import require

    if options.format == "onnx":
        for module in ("onnx", "onnxscript"):
            require(module, "ONNX export")
    if options.int8:
        require("torchao", "int8 quantisation")
    trained = load_trained(source, image_size=options.image_size)
    spec = trained.spec
    path = Path(out) if out is not None else default_out(trained, Path(source), options)
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; name the file to write")
    meta = build_metadata(trained, options, spec)
    model, held = _graph(trained, options, spec)
    example = example_input(spec, options.input_dtype)
    sidecar = None
    if options.format == "onnx":
        _write_onnx(model, example, path, meta)
    else:
        sidecar = _write_pt2(model, example, path, meta)
    result = ExportResult(path, meta, sidecar)
    _check(result, trained, spec, options, held)
    return result


def _check(
    result: ExportResult,
    trained: Trained,
    spec: InputSpec,
    options: ExportOptions,
    held: Tensor | None,
) -> None:
    """The written model against the eager fp32 network (normalisation as the trainer does)."""
    from reslab.deploy.runtime import RuntimeUnavailable, load_exported

    try:
        exported = load_exported(result.path)
    except RuntimeUnavailable as exc:
        result.check = f"not checked: {exc}"
        return
    reference = InferenceModel(trained.net, spec, "uint8").eval()
    images = held if held is not None else example_input(spec, "uint8", batch=8, seed=1)
    with torch.no_grad():
        want = torch.cat([reference(images[i : i + 256]) for i in range(0, len(images), 256)])
    got = torch.cat([exported(images[i : i + 256]) for i in range(0, len(images), 256)])
    result.check_images = len(images)
    if options.int8:
        result.top1_agreement = float((got.argmax(1) == want.argmax(1)).float().mean())
        result.check = f"top-1 agreement with fp32 on {len(images)} held-out images"
    else:
        result.max_abs_diff = float((got - want).abs().max())
        result.max_abs_logit = float(want.abs().max())
        result.check = f"max |logit difference| vs eager on {len(images)} random images"
