"""Model zoo: the DD ConvNets, small-input timm variants, and self-describing checkpoints."""

from __future__ import annotations

from dd_assets.models.convnet import ConvNet
from dd_assets.models.factory import (
    MODEL_REGISTRY,
    create_model,
    load_checkpoint,
    model_names,
    penultimate,
    save_checkpoint,
)

__all__ = [
    "MODEL_REGISTRY",
    "ConvNet",
    "create_model",
    "load_checkpoint",
    "model_names",
    "penultimate",
    "save_checkpoint",
]
