"""Training: the paper's CIFAR protocol and a fast CPU recipe, with exact resume and DDP."""

from reslab.train.captured import TrainStep
from reslab.train.config import PRESETS, TrainConfig
from reslab.train.ensemble import evaluate_ensemble
from reslab.train.evaluation import evaluate
from reslab.train.loop import FitResult, TrainingInterrupted, fit
from reslab.train.packed import MemberBatches, MemberState, PackedSGD
from reslab.train.schedule import learning_rate, train_resolution, train_size
from reslab.train.setup import resolve_device
from reslab.train.state import RunState
from reslab.train.step import NonFiniteLossError

__all__ = [
    "PRESETS",
    "FitResult",
    "MemberBatches",
    "MemberState",
    "NonFiniteLossError",
    "PackedSGD",
    "RunState",
    "TrainConfig",
    "TrainStep",
    "TrainingInterrupted",
    "evaluate",
    "evaluate_ensemble",
    "fit",
    "learning_rate",
    "resolve_device",
    "train_resolution",
    "train_size",
]
