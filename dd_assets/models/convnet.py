"""ConvNet-D{depth} of the dataset-distillation literature (DC / DSA / DM / MTT / RDED).

``depth`` blocks of ``conv3x3(width) -> norm -> ReLU -> AvgPool2d(2)``, then flatten and a
linear classifier.  ``norm="instance"`` is ``nn.GroupNorm(width, width, affine=True)``, i.e.
instance norm with a learned affine, exactly as in the DC/MTT reference code.

The module follows timm's interface so feature extraction code can treat it like any
timm model: ``forward_features`` -> ``[N, width, h, w]``, ``forward_head(feat, pre_logits)``,
``num_features`` (length of the penultimate vector) and ``get_classifier()``.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("instance", "batch", "none")
POOLINGS = ("avg", "max")


def _norm_layer(norm: str, width: int) -> nn.Module:
    if norm == "instance":
        return nn.GroupNorm(width, width, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(width)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def _pool_layer(pooling: str) -> nn.Module:
    if pooling == "avg":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if pooling == "max":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


class ConvNet(nn.Module):
    """ConvNet-D{depth}: input ``[N, in_channels, image_size, image_size]`` -> logits ``[N, num_classes]``.

    The last feature map is ``[N, width, h, h]`` with ``h = image_size // 2**depth``
    (floor at every pooling); ``num_features = width * h * h``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int = 3,
        width: int = 128,
        norm: str = "instance",
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        h = image_size
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            if h < 2:
                raise ValueError(
                    f"image_size={image_size} is too small for depth={depth} (each block halves it)"
                )
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                _norm_layer(norm, width),
                nn.ReLU(inplace=True),
                _pool_layer(pooling),
            ]
            channels = width
            h //= 2
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.feature_channels = width
        self.feature_size = h
        self.num_features = width * h * h
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, S, S]`` -> last feature map ``[N, width, h, h]``."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map ``[N, width, h, h]`` -> logits ``[N, num_classes]``, or the flattened
        penultimate vector ``[N, num_features]`` when ``pre_logits``."""
        x = torch.flatten(x, 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, S, S]`` -> logits ``[N, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh ``Linear(num_features, num_classes)``."""
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes)
