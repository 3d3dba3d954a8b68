"""Training: the paper's CIFAR protocol and a fast CPU recipe, with exact resume and DDP."""

from reslab.train.config import PRESETS, TrainConfig
from reslab.train.loop import (
    FitResult,
    NonFiniteLossError,
    TrainingInterrupted,
    evaluate,
    fit,
    resolve_device,
)
from reslab.train.packed import MemberBatches, MemberState, PackedSGD, packed_train_step
from reslab.train.schedule import learning_rate, train_resolution

__all__ = [
    "PRESETS",
    "FitResult",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainingInterrupted",
    "evaluate",
    "fit",
    "learning_rate",
    "resolve_device",
    "train_resolution",
]
__all__ += ["MemberBatches", "MemberState", "PackedSGD", "packed_train_step"]
