"""Pixel helpers shared by all stages (uint8 ``[N, C, H, W]`` in, see ``types``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (numpy or torch) -> uint8 torch tensor, no copy when possible."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"expected uint8 [N, C, H, W] images, got {t.dtype} {tuple(t.shape)}")
    return t


def to_model_input(
    images: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> normalized float32 ``[N, C, H, W]`` on ``device``."""
    t = as_tensor(images).to(device)
    m = torch.tensor(mean, dtype=torch.float32, device=t.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=t.device).view(1, -1, 1, 1)
    return (t.float().div_(255.0) - m) / s


def resize_float(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of float ``[N, C, h, w]`` to ``size=(H, W)``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def crop_resize(image: torch.Tensor, box: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """Crop ``box=(x0, y0, x1, y1)`` of one float image ``[C, H, W]`` and resize to ``size``.

    Returns float ``[C, size[0], size[1]]``.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= image.shape[-1] and 0 <= y0 < y1 <= image.shape[-2]):
        raise ValueError(f"box {tuple(box)} outside image of shape {tuple(image.shape)}")
    patch = image[:, y0:y1, x0:x1].unsqueeze(0)
    return resize_float(patch, size)[0]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] -> uint8, rounding half away from zero deterministically."""
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def class_inputs(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    source_ids: np.ndarray,
    class_index: int,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Validate one class's scoring inputs: uint8 images ``[N, C, H, W]``, ``labels [N]`` and
    unique ``source_ids [N]``; returns ``(images, labels int64, source_ids int64)``."""
    imgs = as_tensor(images)
    ids = np.asarray(source_ids, dtype=np.int64).reshape(-1)
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).reshape(-1)
    n = imgs.shape[0]
    if len(ids) != n or len(lab) != n:
        raise ValueError(f"{n} images but {len(ids)} source_ids and {len(lab)} labels")
    if n == 0:
        raise ValueError(f"class {class_index}: no images")
    if len(np.unique(ids)) != n:
        raise ValueError(f"class {class_index}: source_ids contain duplicates")
    return imgs, lab, ids
