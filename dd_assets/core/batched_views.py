"""Stored views rendered for a whole batch in a few tensor operations (issue 19, item 2).

:func:`~dd_assets.core.soft_labels.render_views` replays each image's view on its own (crop,
bilinear resize, flip, CutMix paste): a handful of kernel launches per image, which bounds a
GPU's throughput at CIFAR sizes.  :func:`render_views_batched` computes the same views for a
batch at once: a RandomResizedCrop box of ``h x w`` pixels resized to ``S x S`` is the
separable linear map ``W_y @ crop @ W_x^T`` whose rows hold PyTorch's bilinear
(``align_corners=False``) weights -- ``src = (h / S) * (i + 0.5) - 0.5`` clamped at 0, the
two neighbours ``floor(src)`` and ``min(floor(src) + 1, h - 1)`` -- placed at the box's
offset, so one batched matmul renders every crop from the full image; flips and the CutMix
paste are masks.  It equals ``render_views`` up to float rounding (the matmul sums the same
two products in another order; ``tests/test_batched_views.py``), not bit for bit, so the
stored labels of the pipeline keep the exact per-image renderer; bulk students and the GPU
benchmark may choose this one.  Views with RandAugment ops fall back to the exact renderer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dd_assets.core.imaging import as_tensor
from dd_assets.core.soft_labels import ViewParams, render_views

RENDERERS = ("exact", "batched")


def _resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, full: int) -> torch.Tensor:
    """``[B, size, full]`` weights mapping ``full`` input pixels to ``size`` outputs of crops
    ``[start, start + length)`` (bilinear, ``align_corners=False``; identity when ``length == size``)."""
    b = start.shape[0]
    dev = start.device
    i = torch.arange(size, device=dev, dtype=torch.float32).view(1, size)
    scale = length.to(torch.float32).view(b, 1) / size
    src = (scale * (i + 0.5) - 0.5).clamp(min=0.0)
    i0 = src.floor().to(torch.long)
    i1 = torch.minimum(i0 + 1, length.view(b, 1) - 1)
    l1 = src - i0.to(torch.float32)
    l0 = 1.0 - l1
    w = torch.zeros(b, size, full, device=dev, dtype=torch.float32)
    off = start.view(b, 1).to(torch.long)
    w.scatter_add_(2, (off + i0).unsqueeze(-1), l0.unsqueeze(-1))
    w.scatter_add_(2, (off + i1).unsqueeze(-1), l1.unsqueeze(-1))
    return w


def _crop_resize_flip(x: torch.Tensor, crop: np.ndarray, flip: np.ndarray) -> torch.Tensor:
    """float ``[B, C, S, S]`` images, ``crop [B, 4]`` boxes, ``flip [B]`` -> ``[B, C, S, S]`` views."""
    size = x.shape[-1]
    box = torch.as_tensor(np.asarray(crop, np.int64), device=x.device)
    wy = _resize_weights(box[:, 1], box[:, 3] - box[:, 1], size, x.shape[-2])
    wx = _resize_weights(box[:, 0], box[:, 2] - box[:, 0], size, x.shape[-1])
    out = wy.unsqueeze(1) @ x @ wx.transpose(1, 2).unsqueeze(1)
    flips = torch.as_tensor(np.asarray(flip, bool), device=x.device).view(-1, 1, 1, 1)
    return torch.where(flips, out.flip(-1), out)


def render_views_batched(
    images: np.ndarray | torch.Tensor,
    views: ViewParams,
    e: int,
    idx: torch.Tensor | Sequence[int] | np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """:func:`render_views`' views (same arguments, same ``[B, C, S, S]`` normalized float32
    result up to float rounding), computed for the whole batch at once."""
    imgs = as_tensor(images)
    if views.has_randaugment:
        return render_views(imgs, views, e, idx, mean, std, device=device)
    if imgs.shape[0] != views.num_images:
        raise ValueError(f"{imgs.shape[0]} images but views for {views.num_images}")
    if not 0 <= e < views.epochs:
        raise IndexError(f"view {e} out of range for {views.epochs} stored views")
    size = imgs.shape[-1]
    if imgs.shape[-2] != size:
        raise ValueError(f"batched rendering needs square images, got {tuple(imgs.shape[-2:])}")
    idx_np = np.asarray(torch.as_tensor(idx).cpu(), dtype=np.int64).reshape(-1)
    partner = views.partner[idx_np, e].astype(np.int64)
    rows = torch.as_tensor(np.concatenate([idx_np, partner]), device=imgs.device)
    x = imgs[rows].float() / 255.0
    both = np.concatenate([idx_np, partner])
    rendered = _crop_resize_flip(x, views.crop[both, e], views.flip[both, e])
    own, other = rendered[: len(idx_np)], rendered[len(idx_np):]
    mb = torch.as_tensor(views.mix_box[idx_np, e].astype(np.int64), device=imgs.device)
    ar = torch.arange(size, device=imgs.device)
    in_y = (ar.view(1, -1) >= mb[:, 1:2]) & (ar.view(1, -1) < mb[:, 3:4])
    in_x = (ar.view(1, -1) >= mb[:, 0:1]) & (ar.view(1, -1) < mb[:, 2:3])
    mask = (in_y.unsqueeze(2) & in_x.unsqueeze(1)).unsqueeze(1)
    out = torch.where(mask, other, own)
    m = torch.tensor(mean, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
    out = (out - m) / s
    return out if device is None else out.to(device)


def renderer(name: str):
    """``"exact"`` -> :func:`render_views` (bit-exact, per image), ``"batched"`` -> :func:`render_views_batched`."""
    if name == "exact":
        return render_views
    if name == "batched":
        return render_views_batched
    raise ValueError(f"render={name!r}: choose one of {', '.join(RENDERERS)}")
