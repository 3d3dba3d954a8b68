"""Transfer learning: load trusted weights safely, adapt the first and last layer, fine-tune.

Seed 000 ("Transfer Learning"): take a network trained on a large data set, adapt its first layer
when the input differs and its last layer when the labels differ, initialise the rest from the
pretrained weights, and train. Reading weight files and adapting them to a model live in
:mod:`reslab.models.weights` (safe reading, key mapping) and :mod:`reslab.models.pretrained`
(adaptation and the load report), so ``create_model(name, pretrained=PATH)`` needs nothing above
the model layer; they are re-exported here. :mod:`.freeze`: freezing, unfreezing schedules,
parameter groups.
"""

from reslab.models.pretrained import LoadReport, adapt_input_conv, load_pretrained
from reslab.models.weights import (
    UnsafeWeightsError,
    Weights,
    file_sha256,
    read_weights,
    to_reslab_names,
)
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

__all__ = [
    "FinetuneOptions",
    "LoadReport",
    "UnsafeWeightsError",
    "Weights",
    "adapt_input_conv",
    "check_freeze_point",
    "file_sha256",
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
