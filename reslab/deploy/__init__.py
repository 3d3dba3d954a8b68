"""Deployment: export a trained checkpoint (ONNX, ``torch.export``, int8) and predict with it.

- :mod:`.inputs`: what a network expects of an image (:func:`input_spec`, the one function of
  a checkpoint that says so) and how an image file becomes that input;
- :mod:`.graph`: the deployed network (normalisation inside, BatchNorm folded);
- :mod:`.quantize`: int8 through torchao's PyTorch 2 export flow;
- :mod:`.export`: ``reslab export`` as a function, with a parity check;
- :mod:`.runtime`: run an exported file (ONNX Runtime, ``torch.export.load``);
- :mod:`.predict`: streaming top-k predictions over files, folders and globs.
"""

from reslab.deploy.checkpoint import Trained, load_trained
from reslab.deploy.export import ExportOptions, ExportResult, export_model
from reslab.deploy.graph import InferenceModel, fold_batchnorm
from reslab.deploy.inputs import InputSpec, input_spec, read_image
from reslab.deploy.runtime import ExportedModel, load_exported

__all__ = [
    "ExportOptions",
    "ExportResult",
    "ExportedModel",
    "InferenceModel",
    "InputSpec",
    "Trained",
    "export_model",
    "fold_batchnorm",
    "input_spec",
    "load_exported",
    "load_trained",
    "read_image",
]
