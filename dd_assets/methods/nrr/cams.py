"""NRR-DD: the class activation map (Eq. 1) of every real or synthetic image for its label.

:func:`raw_image_cams` is what the ``cam_maps`` asset stores (the teacher's feature
resolution); :func:`upsample_cams` brings stored maps to the image size and normalizes them;
:func:`image_cams` does both (used by CIDD, :mod:`dd_assets.methods.nrr.cidd`, and by the
refinement, :mod:`dd_assets.methods.nrr.refine`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.cam import normalize_minmax, raw_class_activation_maps
from dd_assets.core.device_loops import upload
from dd_assets.core.imaging import as_tensor, resize_float, to_model_input


def raw_image_cams(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    model_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Un-normalized CAM of each image for its label at the teacher's feature resolution
    (Eq. 1, :func:`dd_assets.core.cam.raw_class_activation_maps`) -- what the
    ``cam_maps`` asset stores (small at any image size).  Images are resized to
    ``model_size`` when their size differs (a flattened-head ConvNet only accepts its
    training size).  The model runs in eval mode without gradients; the maps stay on the
    device until the loop ends and come back in one transfer.

    Args:
        images: uint8 ``[N, C, H, W]``; labels: ``[N]``.

    Returns:
        float32 ``[N, h, w]`` on CPU.
    """
    imgs = as_tensor(images)
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    h, w = imgs.shape[-2:]
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, imgs.shape[0], batch_size):
                x = to_model_input(upload(imgs[start : start + batch_size], device), mean, std, device)
                if (h, w) != (model_size, model_size):
                    x = resize_float(x, (model_size, model_size))
                y = upload(lab[start : start + batch_size], x.device)
                out.append(raw_class_activation_maps(model, x, y))
    finally:
        model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty((0, 1, 1))


def upsample_cams(raw: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Raw ``[N, h, w]`` CAMs -> ``[N, H, W]`` in [0, 1]: bilinear upsampling
    (``align_corners=False``), then per-image min-max normalization -- exactly the steps of
    :func:`dd_assets.core.cam.class_activation_maps`."""
    cam = torch.as_tensor(np.asarray(raw) if not isinstance(raw, torch.Tensor) else raw, dtype=torch.float32)
    cam = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return normalize_minmax(cam)


def image_cams(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    model_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Normalized CAM of each image for its label, at the image's own resolution
    (:func:`raw_image_cams` then :func:`upsample_cams`).

    Args:
        images: uint8 ``[N, C, H, W]``; labels: ``[N]``.

    Returns:
        float32 ``[N, H, W]`` in [0, 1] on CPU.
    """
    imgs = as_tensor(images)
    raw = raw_image_cams(model, imgs, labels, model_size, mean, std, batch_size, device)
    return upsample_cams(raw, tuple(imgs.shape[-2:])) if len(raw) else torch.empty((0, *imgs.shape[-2:]))

