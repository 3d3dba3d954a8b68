"""Residual networks as data: configs, building blocks and the model registry."""

from reslab.models.blocks import BLOCKS, BasicBlock, Bottleneck, ResidualBlock
from reslab.models.config import ResNetConfig
from reslab.models.dense import DenseConfig, DenseResidualLayer, DenseResNet, seed_example
from reslab.models.layers import ORDERINGS, SHORTCUTS, STEMS, PadShortcut, ProjectionShortcut
from reslab.models.packed import PackedNet, build_packed, pack, unpack
from reslab.models.resnet import ResNet
from reslab.models.zoo import MODELS, build_model, create_model, get_config, list_models

__all__ = [
    "BLOCKS",
    "MODELS",
    "ORDERINGS",
    "SHORTCUTS",
    "STEMS",
    "BasicBlock",
    "Bottleneck",
    "DenseConfig",
    "DenseResNet",
    "DenseResidualLayer",
    "PadShortcut",
    "ProjectionShortcut",
    "ResNet",
    "ResNetConfig",
    "ResidualBlock",
    "build_model",
    "create_model",
    "get_config",
    "list_models",
    "seed_example",
]
__all__ += ["PackedNet", "build_packed", "pack", "unpack"]
