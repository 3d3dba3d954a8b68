"""Transfer learning: load trusted weights safely, adapt the first and last layer, fine-tune.

Seed 000 ("Transfer Learning"): take a network trained on a large data set, adapt its first layer
when the input differs and its last layer when the labels differ, initialise the rest from the
pretrained weights, and train. Submodules: :mod:`.weights` (safe reading, key mapping),
:mod:`.load` (adaptation and the load report), :mod:`.freeze` (freezing, unfreezing schedules,
parameter groups).
"""

from reslab.transfer.finetune import (
    FinetuneOptions,
    finetune,
    pretrained_model,
    resume_finetune,
)
from reslab.transfer.freeze import (
    check_freeze_point,
    freezable_parts,
    freeze_until,
    param_groups,
    unfreeze_schedule,
)
from reslab.transfer.load import LoadReport, adapt_input_conv, load_pretrained
from reslab.transfer.weights import UnsafeWeightsError, Weights, read_weights, to_reslab_names

__all__ = [
    "FinetuneOptions",
    "LoadReport",
    "UnsafeWeightsError",
    "Weights",
    "adapt_input_conv",
    "check_freeze_point",
    "finetune",
    "freezable_parts",
    "freeze_until",
    "load_pretrained",
    "param_groups",
    "pretrained_model",
    "read_weights",
    "resume_finetune",
    "to_reslab_names",
    "unfreeze_schedule",
]
