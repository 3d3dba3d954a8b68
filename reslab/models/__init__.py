"""Residual networks as data: configs, building blocks and the model registry."""

from reslab.models.blocks import (
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    ResidualBlock,
)
from reslab.models.config import ResNetConfig
from reslab.models.dense import DenseConfig, DenseResidualLayer, DenseResNet, seed_example
from reslab.models.features import FeatureInfo, FeatureListNet
from reslab.models.layers import (
    NORMS,
    ORDERINGS,
    SHORTCUTS,
    STEMS,
    PadShortcut,
    ProjectionShortcut,
    make_shortcut,
)
from reslab.models.ordered import OrderedBasicBlock, OrderedBlock, OrderedBottleneck
from reslab.models.packed import PackedNet, build_packed, pack, unpack
from reslab.models.resnet import BLOCKS, ResNet, default_cfg, make_block
from reslab.models.zoo import (
    MODELS,
    build_model,
    cifar_config,
    create_model,
    get_config,
    list_models,
)

__all__ = [
    "BLOCKS",
    "MODELS",
    "NORMS",
    "ORDERINGS",
    "SHORTCUTS",
    "STEMS",
    "BasicBlock",
    "Bottleneck",
    "DenseConfig",
    "DenseResNet",
    "DenseResidualLayer",
    "FeatureInfo",
    "FeatureListNet",
    "OrderedBasicBlock",
    "OrderedBlock",
    "OrderedBottleneck",
    "PackedNet",
    "PadShortcut",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ProjectionShortcut",
    "ResNet",
    "ResNetConfig",
    "ResidualBlock",
    "build_model",
    "build_packed",
    "cifar_config",
    "create_model",
    "default_cfg",
    "get_config",
    "list_models",
    "make_block",
    "make_shortcut",
    "pack",
    "seed_example",
    "unpack",
]
