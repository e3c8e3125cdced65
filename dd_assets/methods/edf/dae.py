"""Discriminative Area Enhancement (EDF Sec. 2.2, Eq. 3-5), pure torch/numpy.

Grad-CAM maps ``M`` of the synthetic images from a model ``G`` trained on real data (Eq. 3,
:func:`synthetic_cams` over :func:`dd_assets.core.cam.grad_cam`), recomputed every ``K``
iterations; the pixel gradient is multiplied element-wise by ``F(M, beta)`` = 1 below the
image's mean activation, ``beta + M`` at or above it (Eq. 4-5) -> :func:`dae_weights`;
:func:`discriminative_share` is the Sec. 5 / Fig. 5b statistic.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dd_assets.core.cam import grad_cam
from dd_assets.core.imaging import resize_float


def synthetic_cams(
    cam_model: nn.Module,
    images: torch.Tensor,
    cam_idx: np.ndarray | torch.Tensor,
    cam_image_size: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Grad-CAM maps ``M [N, H, W]`` in [0, 1] of normalized float ``images [N, C, H, W]``
    for CAM-model classes ``cam_idx [N]`` (Eq. 3), batched; images are resized to
    ``cam_image_size`` for the model when given and the maps returned at ``(H, W)``."""
    n, _, h, w = images.shape
    idx = torch.as_tensor(np.asarray(cam_idx) if not isinstance(cam_idx, torch.Tensor) else cam_idx,
                          dtype=torch.long).reshape(-1)
    if idx.shape[0] != n:
        raise ValueError(f"{n} images but {idx.shape[0]} CAM class indices")
    out = []
    for s in range(0, n, batch_size):
        xb = images[s : s + batch_size].detach()
        if cam_image_size is not None:
            xb = resize_float(xb, (cam_image_size, cam_image_size))
        out.append(grad_cam(cam_model, xb, idx[s : s + batch_size], size=(h, w)))
    return torch.cat(out) if out else images.new_zeros((0, h, w))


def dae_weights(cam: torch.Tensor, beta: float, threshold: float | None = None) -> torch.Tensor:
    """``F(M, beta)`` of Eq. 4, broadcastable over channels.

    ``F(M^i_hw) = 1`` if ``M^i_hw < thr_i`` and ``beta + M^i_hw`` if ``M^i_hw >= thr_i``,
    where ``thr_i = mean(M^i)`` (per image; Eq. 4) or the fixed ``threshold``.

    Args:
        cam: ``[N, H, W]`` activation maps in [0, 1].

    Returns:
        float32 ``[N, 1, H, W]``; Eq. 5 is ``grad * F`` (element-wise, every channel).
    """
    if cam.ndim != 3:
        raise ValueError(f"cam must be [N, H, W], got {tuple(cam.shape)}")
    if beta < 0:
        raise ValueError(f"beta (enhancement factor) must be >= 0, got {beta}")
    m = cam.float()
    thr = m.mean(dim=(1, 2), keepdim=True) if threshold is None else torch.full_like(m[:, :1, :1], float(threshold))
    return torch.where(m >= thr, beta + m, torch.ones_like(m))[:, None]


def discriminative_share(cam: torch.Tensor) -> torch.Tensor:
    """Per-image share of pixels at or above the image's mean activation (Sec. 5 /
    Fig. 5b statistic); ``cam [N, H, W]`` -> ``[N]``."""
    return (cam >= cam.mean(dim=(1, 2), keepdim=True)).float().mean(dim=(1, 2))
