"""Top-k predictions over image files, folders and globs, streamed in batches.

Images are decoded and resized by DataLoader workers while the network runs on the previous
batch; nothing holds more than a few batches at once. The model is a reslab checkpoint (or run
folder) or an exported ``.onnx``/``.pt2`` file; either way the input (size, normalisation)
comes from what the model carries (:func:`reslab.deploy.inputs.input_spec`, or the exported
metadata).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from reslab.data.images import IMAGE_SUFFIXES
from reslab.deploy.inputs import InputSpec, read_image

__all__ = ["Prediction", "Predictor", "expand_images", "load_predictor", "predict"]

GLOB_CHARS = frozenset("*?[")


@dataclass
class Prediction:
    """One image's ``top`` (class name, class index, probability), most likely first; or, for
    an image skipped as unreadable, the ``error`` and no ``top``."""

    image: str
    top: list[tuple[str, int, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {
            "image": self.image,
            "top": [{"class": c, "index": i, "probability": p} for c, i, p in self.top],
        }


@dataclass
class Predictor:
    """A function of uint8 (N, C, H, W) images -> logits, with the input it expects."""

    run: Callable[[Tensor], Tensor]
    spec: InputSpec
    classes: list[str]
    source: Path


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; valid choices: auto, cpu, cuda, cuda:N")
    return device


def load_predictor(
    source: str | Path, *, device: str = "auto", image_size: int | None = None
) -> Predictor:
    """A checkpoint, run folder, or exported ``.onnx``/``.pt2`` file, ready to predict."""
    from reslab.deploy.runtime import EXPORTED_SUFFIXES, load_exported

    device = resolve_device(device)
    path = Path(source)
    if path.suffix in EXPORTED_SUFFIXES and not path.is_dir():
        exported = load_exported(path, device=device)
        spec = exported.spec
        if image_size is not None and (image_size, image_size) != (spec.height, spec.width):
            raise ValueError(
                f"{path} was exported for {spec.height}x{spec.width} images (its graph's input "
                f"size): pass no --image-size, or export again with --image-size {image_size}"
            )
        return Predictor(exported, spec, exported.classes, path)
    from reslab.deploy.checkpoint import load_trained
    from reslab.deploy.graph import InferenceModel

    trained = load_trained(path, image_size=image_size)
    model = InferenceModel(trained.net, trained.spec, "uint8").eval().to(device)

    @torch.no_grad()
    def run(x: Tensor) -> Tensor:
        return model(x.to(device, non_blocking=True)).float().cpu()

    return Predictor(run, trained.spec, trained.classes, trained.path)


def expand_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted), and glob patterns
    (``**`` recursive) expanded; a path or pattern that names nothing is an error."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not found:
                raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {path}")
            out += found
        elif path.exists() or not GLOB_CHARS & set(str(item)):
            if not path.exists():
                raise FileNotFoundError(f"no such image file or folder: {path}")
            out.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise ValueError(f"no files match {item}")
            out += files
    return out


class _ImageFiles(Dataset[tuple[int, Tensor | None, str | None]]):
    """(index, uint8 image or None, error or None): a bad file is data here, not an exception
    in a worker process, so the caller can name it, skip it, or stop."""

    def __init__(self, files: Sequence[Path], spec: InputSpec) -> None:
        self.files, self.spec = files, spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        try:
            return i, read_image(self.files[i], self.spec), None
        except (ValueError, OSError) as exc:
            return i, None, str(exc)


def _collate(
    items: list[tuple[int, Tensor | None, str | None]],
) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, x, err in items if x is None and err is not None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, bad


def predict(
    predictor: Predictor,
    files: Sequence[Path],
    *,
    topk: int = 5,
    batch_size: int = 64,
    workers: int | None = None,
    skip_unreadable: bool = False,
    progress: bool | None = None,
) -> Iterator[Prediction]:
    """Predictions for ``files`` in order, yielded batch by batch as they are computed.

    An unreadable image raises ``ValueError`` naming it, or with ``skip_unreadable`` is
    yielded as a :class:`Prediction` with its ``error``. ``workers``: DataLoader processes
    decoding images (default: up to 4, none for a single batch). ``progress``: a tqdm bar on
    stderr (default: when stderr is a terminal and there is more than one batch).
    """
    import sys

    from tqdm import tqdm

    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    several = len(files) > batch_size
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if several else 0
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    loader = DataLoader(
        _ImageFiles(files, predictor.spec),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers else None,
    )
    show = several and sys.stderr.isatty() if progress is None else progress
    k = min(topk, len(predictor.classes))
    with tqdm(total=len(files), unit="img", disable=not show, leave=False) as bar:
        for indices, batch, bad in loader:
            if bad and not skip_unreadable:
                raise ValueError(bad[0][1])
            results: dict[int, Prediction] = {
                i: Prediction(str(files[i]), error=err) for i, err in bad
            }
            if batch is not None:
                probs = torch.softmax(predictor.run(batch).float(), dim=1)
                values, top = probs.topk(k, dim=1)
                for i, vs, ix in zip(indices, values.tolist(), top.tolist(), strict=True):
                    results[i] = Prediction(
                        str(files[i]),
                        [(predictor.classes[c], c, v) for v, c in zip(vs, ix, strict=True)],
                    )
            bar.update(len(results))
            yield from (results[i] for i in sorted(results))
