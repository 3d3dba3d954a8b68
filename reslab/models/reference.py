"""Figures the papers print for the registered models (None: the paper gives none).

``params`` in millions, ``macs`` in 10^9 multiply-adds at 224x224 (the paper calls them FLOPs).
He et al. 2015 (arXiv:1512.03385): Table 1 (ImageNet) and Table 6 (CIFAR-10).
He et al. 2016 (arXiv:1603.05027): Tables 3-4 (CIFAR pre-activation nets).
The CIFAR papers' parameter counts leave out BatchNorm; Table 1 rounds loosely.
"""

from __future__ import annotations

PAPER: dict[str, tuple[float | None, float | None, str]] = {
    "resnet18": (None, 1.8, "2015 Table 1"),
    "resnet34": (None, 3.6, "2015 Table 1"),
    "resnet50": (None, 3.8, "2015 Table 1"),
    "resnet101": (None, 7.6, "2015 Table 1"),
    "resnet152": (None, 11.3, "2015 Table 1"),
    "plain34": (None, 3.6, "2015 Fig. 3"),
    "cifar_resnet20": (0.27, None, "2015 Table 6"),
    "cifar_resnet32": (0.46, None, "2015 Table 6"),
    "cifar_resnet44": (0.66, None, "2015 Table 6"),
    "cifar_resnet56": (0.85, None, "2015 Table 6"),
    "cifar_resnet110": (1.7, None, "2015 Table 6"),
    "cifar_resnet1202": (19.4, None, "2015 Table 6"),
    "cifar_preact_resnet110": (1.7, None, "2016 Table 3"),
    "cifar_preact_resnet164": (1.7, None, "2016 Table 3"),
    "cifar_preact_resnet1001": (10.2, None, "2016 Table 3"),
}
