"""The training recipe as one frozen dataclass; presets ``paper``, ``fast``, ``digits`` and
``imagenet``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from reslab.data.training import AUGMENTS

__all__ = ["PRESETS", "TrainConfig"]

SCHEDULES = ("step", "onecycle")
WARMUPS = ("none", "error", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
NORMALIZE = ("pixel", "channel")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: torch.compile modes that replay forward and backward as CUDA graphs themselves
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N" for one GPU of several


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(valid)}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how a network is trained. Defaults are He et al. 2015, §4.2."""

    recipe: str = "paper"  # name of the preset these values started from
    # -- length: iters wins; with iters=None the run lasts `epochs` passes over the train split
    iters: int | None = 64_000  # optimiser steps ("terminate training at 64k iterations")
    epochs: float | None = None  # passes over the training split
    batch_size: int = 128  # images per optimiser step, summed over all DDP ranks
    # -- optimiser: SGD
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4  # L2 coefficient, per step
    decay_all: bool = True  # True: every parameter (paper); False: skip BN and biases (rank < 2)
    label_smoothing: float = 0.0  # Szegedy et al. 2016; 0 = plain cross-entropy
    # -- schedule (a pure function of the step, reslab.train.schedule.learning_rate)
    schedule: str = "step"  # "step": x lr_decay at each milestone; "onecycle": linear up, down to 0
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the run: 32k and 48k of 64k
    lr_decay: float = 0.1  # "divide it by 10"
    warmup: str = "auto"  # "error": warmup_lr until train error < warmup_error; "auto": that
    #                       for nets of depth >= 110 (He et al. 2015, §4.2); "none"
    warmup_lr: float = 0.01
    warmup_error: float = 0.8  # fraction of the batch misclassified ("below 80%")
    warmup_fraction: float = 0.0  # onecycle: share of the run rising linearly from 0 to lr
    # -- data
    augment: bool = True  # False: no augmentation at all (the evaluation view)
    # "cifar": pad + random crop + horizontal flip (He et al. 2015, §4.2); "photo":
    # RandomResizedCrop + flip; "imagenet": shorter side in [256, 480], 224 crop, flip, PCA colour
    # noise (§3.4); "auto": "cifar" for inputs up to 96 px, "photo" above (reslab.data.training)
    augmentation: str = "auto"
    pad: int = 4  # pixels of zero padding on each side before the crop ("cifar")
    flip: bool = True  # horizontal mirror with probability 1/2
    normalize: str = "pixel"  # "pixel": subtract the per-pixel mean (paper); "channel": mean/std
    # progressive resizing (fast.ai DAWNBench 2018; Touvron et al. 2019 "FixRes"): (fraction of
    # the run, side in pixels) pairs; from each fraction on, training batches are resized to that
    # side. The sides are relative to the last one, which stands for the data's own input size:
    # (16, 24, 32) trains 32-px data at 16, 24, 32 px and 224-px data at 112, 168, 224 px.
    # () = always the data's own size. Convolution cost falls with the pixel count.
    resolutions: tuple[tuple[float, int], ...] = ()
    eval_flip: bool = False  # evaluate on the image and its mirror, averaging the two softmaxes
    # -- numerics and speed
    precision: str = "fp32"  # "bf16"/"fp16": autocast of forward and loss; weights stay fp32
    channels_last: bool = False  # NHWC memory layout (faster convolutions on CPU and tensor cores)
    compile: bool = False  # torch.compile the model
    # recompute each residual unit's activations in the backward pass instead of storing them
    # (model.set_grad_checkpointing): for very deep nets such as ResNet-1001; same gradients
    grad_checkpointing: bool = False
    # torch.compile's mode: "reduce-overhead" replays the compiled forward and backward as CUDA
    # graphs, which is what a small CIFAR network needs on a GPU, where eager steps are bound by
    # the CPU launching hundreds of tiny kernels (docs/results.md)
    compile_mode: str = "default"
    # the whole training step (forward, backward, SGD update, bookkeeping) captured once as a
    # CUDA graph and replayed every step (reslab.train.captured); on a CPU the same step runs
    # eagerly. Excludes compile_mode's own graphs (reduce-overhead, max-autotune).
    cuda_graphs: bool = False
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda"
    sync_bn: bool = False  # DDP: BatchNorm statistics over the global batch
    threads: int | None = None  # CPU threads per process (torch.set_num_threads); None: torch's
    # -- bookkeeping
    seed: int = 0
    eval_every: int = 2000  # optimiser steps between evaluations/checkpoints; 0 = once per epoch
    eval_test: bool = True  # also log test error (the Fig. 6 curves); never used to select
    eval_batch_size: int = 512
    # the run folder also gets TensorBoard event files (when the tensorboard package is
    # installed: pip install "reslab[tensorboard]"); metrics.jsonl is written either way
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _check("schedule", self.schedule, SCHEDULES)
        _check("warmup", self.warmup, WARMUPS)
        _check("precision", self.precision, PRECISIONS)
        _check("normalize", self.normalize, NORMALIZE)
        _check("compile_mode", self.compile_mode, COMPILE_MODES)
        _check("augmentation", self.augmentation, AUGMENTS)
        if self.cuda_graphs and self.compile and self.compile_mode in GRAPH_COMPILE_MODES:
            raise ValueError(
                f"cuda_graphs captures the whole step itself; compile_mode {self.compile_mode!r} "
                "captures forward and backward as graphs of its own: use one of them (with "
                "cuda_graphs, compile_mode 'default' or 'max-autotune-no-cudagraphs')"
            )
        if self.iters is None and self.epochs is None:
            raise ValueError("set iters or epochs")
        if self.batch_size < 1 or (self.iters is not None and self.iters < 1):
            raise ValueError("batch_size and iters must be >= 1")
        fractions = [f for f, _ in self.resolutions]
        if fractions != sorted(fractions) or any(not 0 <= f < 1 for f in fractions):
            raise ValueError(
                f"resolutions must be increasing fractions in [0, 1): {self.resolutions}"
            )
        if any(side < 1 for _, side in self.resolutions):
            raise ValueError(f"resolutions need sides >= 1 pixel: {self.resolutions}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"unknown device {self.device!r}; valid choices: auto, cpu, cuda")

    def total_steps(self, train_size: int) -> int:
        """Optimiser steps of the whole run for a training split of ``train_size`` images."""
        return self.run_steps(self.steps_per_epoch(train_size))

    def run_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of the whole run when one epoch is ``steps_per_epoch`` steps."""
        if self.iters is not None:
            return self.iters
        assert self.epochs is not None
        return max(1, round(self.epochs * steps_per_epoch))

    def steps_per_epoch(self, train_size: int) -> int:
        """Full batches per pass; the last partial batch is dropped (a new permutation follows)."""
        return max(1, train_size // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        if "resolutions" in d:  # JSON turns tuples into lists
            d["resolutions"] = tuple((float(f), int(s)) for f, s in d["resolutions"])
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named recipe with ``overrides`` applied (``iters=None`` to train by ``epochs``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown recipe {name!r}; valid choices: {', '.join(PRESETS)}")
        base = {**PRESETS[name], **overrides}
        if "epochs" in overrides and "iters" not in overrides:
            base["iters"] = None  # a requested epoch count replaces the preset's iteration count
        return cls.from_dict({"recipe": name, **base})


PRESETS: dict[str, dict[str, Any]] = {
    # He et al. 2015, §4.2: SGD, momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10
    # at 32k and 48k iterations, stopped at 64k, per-pixel mean, pad-4 crop + flip; warm-up at 0.01
    # for ResNet-110/1202. He et al. 2016 (pre-activation) uses the same schedule.
    "paper": {},
    # The most accuracy in ~25 min on a 2-core CPU (docs/training.md): the paper's SGD and
    # augmentation, a one-cycle schedule, and cheaper early epochs at lower resolution.
    "fast": {
        "iters": None,
        # Budget (measured, docs/training.md): one epoch of 45k images at 32 px costs ~120-130 s
        # on the 2-core CPU (fp32: no native bf16 here); 24 px 1.7-1.9x and 16 px 3.7-3.9x less.
        # 19 epochs with the resolution schedule below: 1,438 s of steps, 25.7 min wall in all
        # (docs/results.md); 17 epochs gave 86.2%, 19 gave 86.7% (image + mirror).
        "epochs": 19,
        "batch_size": 256,  # lr scaled with it (Goyal et al. 2017)
        "lr": 0.4,  # 0.1 per 128 images x 2, as a one-cycle peak; 0.2 was worse in 4 epochs
        "nesterov": True,
        "weight_decay": 5e-4,  # a short run wants stronger regularisation per step
        "decay_all": False,  # no decay on BN scales/shifts and biases
        "label_smoothing": 0.1,  # Szegedy et al. 2016
        "schedule": "onecycle",  # linear warm-up then linear decay to 0 (Smith & Topin 2019)
        "warmup": "none",
        "warmup_fraction": 0.2,
        # progressive resizing: 40% of the steps at 16 px, 30% at 24 px, the last 30% at full
        # size so the network ends on the test set's scale (equal-time 4-epoch comparison:
        # 80.3% vs 77.0% single-view test accuracy, docs/training.md)
        "resolutions": ((0.0, 16), (0.4, 24), (0.7, 32)),
        "normalize": "channel",
        "eval_flip": True,  # image + mirror at the end (+1.1 points in that comparison)
        "precision": "fp32",  # bf16 only on CPUs with AVX-512-BF16/AMX, or on GPUs: --precision
        "channels_last": True,  # NHWC: ~1.3x faster oneDNN convolutions at 2 threads (fp32)
        "compile": False,  # on top of channels_last it gained nothing at 2 threads; costs ~1 min
        "eval_every": 1000,  # 3 evaluations of val + test on the way (~15 s each)
        "eval_test": True,
    },
    # He et al. 2015, §3.4 (ImageNet): "SGD with a mini-batch size of 256. The learning rate
    # starts from 0.1 and is divided by 10 when the error plateaus, and the models are trained for
    # up to 60 x 10^4 iterations. We use a weight decay of 0.0001 and a momentum of 0.9." The
    # plateaus become fixed milestones at 150k, 300k and 450k iterations: epochs 30, 60 and 90 at
    # 5,005 iterations per epoch of 1.28M images, where the paper's Fig. 4 curves drop, and the
    # schedule of the Torch re-implementation (fb.resnet.torch) the paper points to; 600k
    # iterations are ~120 epochs. Augmentation: shorter side random in [256, 480], a random 224
    # crop, flip, per-pixel mean subtracted, AlexNet's PCA colour noise; no warm-up.
    "imagenet": {
        "iters": 600_000,
        "batch_size": 256,
        "lr": 0.1,
        "milestones": (0.25, 0.5, 0.75),
        "warmup": "none",
        "augmentation": "imagenet",
        "normalize": "pixel",
        "eval_every": 5000,  # ~1 epoch
        "eval_batch_size": 256,
    },
    # The default job: a small CIFAR-style ResNet on the 8x8 scikit-learn digits, ~1 min on a CPU.
    "digits": {
        "iters": None,
        "epochs": 20,
        "batch_size": 64,
        "lr": 0.1,
        "nesterov": True,
        "weight_decay": 5e-4,
        "decay_all": False,
        "label_smoothing": 0.0,
        "schedule": "onecycle",
        "warmup": "none",
        "warmup_fraction": 0.2,
        # 8x8 convolutions are too small to share: a second thread only waits, and on a busy
        # machine that waiting made steps 40x slower (35 ms -> 1.5 s per batch of 64, measured).
        "threads": 1,
        "pad": 1,  # 1 pixel on an 8x8 image is 4 on 32x32
        "flip": False,  # a mirrored digit is another symbol
        "normalize": "channel",
        "eval_every": 0,
    },
}
