"""Run an exported model: ONNX under ONNX Runtime, ``.pt2`` with ``torch.export.load``.

Both take uint8 images at the size their metadata names and return logits, so ``reslab
predict`` treats a checkpoint and an exported model alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reslab.deploy.inputs import InputSpec

__all__ = [
    "EXPORTED_SUFFIXES",
    "ExportedModel",
    "RuntimeUnavailable",
    "load_exported",
    "read_metadata",
    "require",
]

EXPORTED_SUFFIXES = (".onnx", ".pt2")


class RuntimeUnavailable(ImportError, ValueError):
    """A package of the optional extra ``reslab[export]`` is not installed (a ValueError too,
    so the command line reports it in one line)."""


def require(module: str, purpose: str) -> None:
    """Raise :class:`RuntimeUnavailable` naming ``purpose`` if ``module`` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RuntimeUnavailable(f"{purpose} needs {module}: pip install reslab[export]")


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata ``reslab export`` embedded in ``path`` (ONNX ``metadata_props['reslab']``;
    for ``.pt2`` the archive's ``reslab.json``, else the sidecar ``NAME.json``)."""
    from reslab.deploy.export import METADATA_KEY, sidecar_path

    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    text = None
    if path.suffix == ".onnx":
        try:
            import onnx
        except ImportError as exc:
            raise RuntimeUnavailable(
                "reading ONNX files needs onnx: pip install reslab[export]"
            ) from exc
        try:
            proto = onnx.load_model(str(path), load_external_data=False)
        except Exception as exc:  # DecodeError and friends: not an ONNX file
            raise ValueError(f"corrupt or unreadable ONNX file {path}: {exc}") from exc
        text = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    else:
        extra = {f"{METADATA_KEY}.json": ""}
        _load_pt2(path, extra)
        text = extra[f"{METADATA_KEY}.json"] or None
        if text is None and sidecar_path(path).is_file():
            text = sidecar_path(path).read_text()
    if not text:
        raise ValueError(f"{path} carries no reslab metadata: export it with `reslab export`")
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable reslab metadata ({exc})") from exc
    return meta


def _load_pt2(path: Path, extra: dict[str, str]) -> Any:
    try:
        return torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # a zip that is not an exported program, a truncated file
        raise ValueError(f"corrupt or unreadable .pt2 program {path}: {exc}") from exc


def spec_from_metadata(meta: dict[str, Any]) -> InputSpec:
    inp, norm = meta["input"], meta["normalization"]
    channels, height, width = (int(v) for v in inp["shape"][1:])
    return InputSpec(
        channels, height, width,
        torch.tensor(norm["mean"], dtype=torch.float32),
        torch.tensor(norm["std"], dtype=torch.float32),
        str(norm.get("mode", "none")), bool(inp["resize"].get("fixed", True)),
        str(inp["resize"].get("interpolation", "bilinear")), inp["resize"].get("shorter_side"),
    )  # fmt: skip


class ExportedModel:
    """An exported model as a function of uint8 (N, C, H, W) images -> float32 logits."""

    def __init__(self, path: Path, meta: dict[str, Any], run: Any, device: str) -> None:
        self.path, self.meta, self._run, self.device = path, meta, run, device
        self.spec = spec_from_metadata(meta)
        self.classes: list[str] = [str(c) for c in meta["classes"]]
        self.input_dtype = "uint8" if meta["input"]["dtype"] == "uint8" else "float"

    def __call__(self, images: Tensor) -> Tensor:
        x = images if self.input_dtype == "uint8" else images.float() / 255
        return self._run(x)

    def run_graph(self, x: Tensor) -> Tensor:
        """The graph on inputs already in its own dtype and range (float 0..1 or uint8)."""
        return self._run(x)


def load_exported(path: str | Path, *, device: str = "cpu") -> ExportedModel:
    """An exported ``.onnx`` or ``.pt2`` file, ready to run on ``device`` ("cpu" or "cuda")."""
    path = Path(path)
    meta = read_metadata(path)
    if path.suffix == ".onnx":
        require("onnxruntime", "running ONNX files")
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as torch, not every core
        session = ort.InferenceSession(str(path), options, providers=providers)
        name = session.get_inputs()[0].name

        def run_onnx(x: Tensor) -> Tensor:
            (logits,) = session.run(None, {name: x.cpu().numpy()})
            return torch.from_numpy(logits)

        return ExportedModel(path, meta, run_onnx, device)
    module = _load_pt2(path, {}).module().to(device)

    @torch.no_grad()
    def run_pt2(x: Tensor) -> Tensor:
        return module(x.to(device)).float().cpu()

    return ExportedModel(path, meta, run_pt2, device)
