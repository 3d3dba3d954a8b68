"""reslab: residual networks as the papers describe them — build, train, analyse, transfer."""

from reslab.models import (
    DenseConfig,
    ResNetConfig,
    build_model,
    create_model,
    get_config,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "DenseConfig",
    "ResNetConfig",
    "__version__",
    "build_model",
    "create_model",
    "get_config",
    "list_models",
]
