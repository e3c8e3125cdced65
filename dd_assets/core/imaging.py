"""Pixel helpers shared by all stages (uint8 ``[N, C, H, W]`` in, see ``types``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dd_assets.core.device_loops import upload


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
    """uint8 ``[N, C, H, W]`` -> normalized float32 ``[N, C, H, W]`` on ``device``.

    Host data goes up with :func:`dd_assets.core.device_loops.upload` (no stream sync per call
    on CUDA; the same values)."""
    t = upload(as_tensor(images), device)
    m = upload(torch.tensor(mean, dtype=torch.float32), t.device).view(1, -1, 1, 1)
    s = upload(torch.tensor(std, dtype=torch.float32), t.device).view(1, -1, 1, 1)
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


def to_unit_float(images: torch.Tensor | np.ndarray, name: str = "images") -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 in [0, 1]; a float tensor/array is taken as already in
    [0, 1] pixel units (not checked, not clamped).  ``name`` names the parameter in errors."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor) or t.ndim != 4:
        shape = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
        raise ValueError(f"{name} must be [N, C, H, W] images, got {shape}")
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be uint8 or float pixels in [0, 1], got dtype {t.dtype}")
    return t.float()


class Normalizer:
    """Per-channel ``(x - mean) / std`` for ``[N, C, H, W]`` float pixels in [0, 1] and its inverse.

    ``mean=None`` means 0 and ``std=None`` means 1 for every channel (identity).
    """

    def __init__(
        self,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        channels: int,
        device: torch.device | str = "cpu",
    ) -> None:
        m = [0.0] * channels if mean is None else [float(v) for v in mean]
        s = [1.0] * channels if std is None else [float(v) for v in std]
        if len(m) != channels:
            raise ValueError(f"mean has {len(m)} values but the images have {channels} channels")
        if len(s) != channels:
            raise ValueError(f"std has {len(s)} values but the images have {channels} channels")
        if any(v <= 0 for v in s):
            raise ValueError(f"std must be positive, got {s}")
        self.mean = torch.tensor(m, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(s, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """pixels ``[N, C, H, W]`` -> model input (differentiable)."""
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """model input ``[N, C, H, W]`` -> pixels (differentiable)."""
        return x * self.std + self.mean
