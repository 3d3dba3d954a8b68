"""Moved to :mod:`reslab.models.weights` (the model layer reads weight files itself); this
module keeps the old import path working."""

from reslab.models.weights import (
    UnsafeWeightsError,
    Weights,
    detect_format,
    file_sha256,
    read_weights,
    to_reslab_names,
)

__all__ = [
    "UnsafeWeightsError",
    "Weights",
    "detect_format",
    "file_sha256",
    "read_weights",
    "to_reslab_names",
]
