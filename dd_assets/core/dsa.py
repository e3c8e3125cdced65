"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen, ICML 2021), pure torch.

The augmentation MTT / DATM / EDF apply to every real batch of their experts and to every
synthetic batch of the trajectory-matching student (:mod:`dd_assets.methods.edf.experts`,
:mod:`dd_assets.methods.edf.student`): colour, crop, cutout, flip, scale and rotate with the
DSA code's magnitudes, each sample drawing its own parameters from one CPU generator, and
differentiable w.r.t. the pixels -> :class:`DSAConfig`, :func:`diff_augment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dd_assets.core.device_loops import upload


DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAConfig:
    """Differentiable Siamese Augmentation (Zhao & Bilen 2021) as in the MTT/DATM code.

    ``strategy``: ``"_"``-joined ops from :data:`DSA_OPS` (``"color"`` = brightness,
    saturation and contrast in turn).  ``mode``: ``"single"`` applies ONE op drawn uniformly
    per call (the MTT/DATM/EDF default, ``aug_mode='S'``); ``"multiple"`` applies all in
    order.  Magnitudes are the DSA defaults; every sample of a batch draws its own
    parameters.
    """

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    mode: str = "single"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def ops(self) -> list[str]:
        ops = [p for p in self.strategy.split("_") if p]
        bad = [p for p in ops if p not in DSA_OPS]
        if bad or not ops:
            raise ValueError(f"DSAConfig.strategy {self.strategy!r}: unknown ops {bad}; use '_'-joined {DSA_OPS}")
        if self.mode not in ("single", "multiple"):
            raise ValueError(f"DSAConfig.mode must be 'single' or 'multiple', got {self.mode!r}")
        return ops


def _u(n: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``[n]`` uniform [0, 1) draws from the CPU generator, moved to ``like``'s device/dtype."""
    return upload(torch.rand(n, generator=gen).to(dtype=like.dtype), like.device)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _shift(x: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor, pad: int) -> torch.Tensor:
    """Translate each image by integer ``(ty, tx)`` (|t| <= pad), zero fill; differentiable."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (pad - ty.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (pad - tx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows, cols]


def _apply_op(x: torch.Tensor, op: str, cfg: DSAConfig, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    if op == "flip":
        flip = upload(torch.rand(n, generator=gen) < cfg.prob_flip, x.device).view(n, 1, 1, 1)
        return torch.where(flip, x.flip(3), x)
    if op == "scale":
        r = cfg.ratio_scale
        sx = _u(n, gen, x) * (r - 1.0 / r) + 1.0 / r
        sy = _u(n, gen, x) * (r - 1.0 / r) + 1.0 / r
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 1, 1] = sx, sy
        return _affine(x, theta)
    if op == "rotate":
        ang = (_u(n, gen, x) - 0.5) * 2.0 * cfg.ratio_rotate / 180.0 * math.pi
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                             torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
        return _affine(x, theta)
    if op == "color":
        x = x + (_u(n, gen, x).view(n, 1, 1, 1) - 0.5) * cfg.brightness
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (_u(n, gen, x).view(n, 1, 1, 1) * cfg.saturation) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * (_u(n, gen, x).view(n, 1, 1, 1) + cfg.contrast) + m
    if op == "crop":
        pad = int(h * cfg.ratio_crop_pad + 0.5)
        if pad == 0:
            return x
        ty = upload(torch.randint(-pad, pad + 1, (n,), generator=gen), x.device)
        tx = upload(torch.randint(-pad, pad + 1, (n,), generator=gen), x.device)
        return _shift(x, ty, tx, pad)
    if op == "cutout":
        sh, sw = int(h * cfg.ratio_cutout + 0.5), int(w * cfg.ratio_cutout + 0.5)
        cy = upload(torch.randint(0, h, (n,), generator=gen), x.device).view(n, 1, 1)
        cx = upload(torch.randint(0, w, (n,), generator=gen), x.device).view(n, 1, 1)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = ((rows >= cy - sh // 2) & (rows < cy - sh // 2 + sh)
                  & (cols >= cx - sw // 2) & (cols < cx - sw // 2 + sw))
        return x * (~inside).to(x.dtype)[:, None]
    raise ValueError(f"unknown DSA op {op!r}")


def diff_augment(x: torch.Tensor, cfg: DSAConfig | None, gen: torch.Generator) -> torch.Tensor:
    """DSA of a normalized float batch ``x [B, C, H, W]``, differentiable w.r.t. ``x``.

    Every random number comes from the CPU generator ``gen`` (device-independent, so a run
    is reproducible from its seed).  ``cfg=None`` returns ``x`` unchanged.

    Returns:
        ``[B, C, H, W]`` augmented batch (same device/dtype).
    """
    if cfg is None:
        return x
    ops = cfg.ops()
    if cfg.mode == "single":
        ops = [ops[int(torch.randint(0, len(ops), (1,), generator=gen))]]
    for op in ops:
        x = _apply_op(x, op, cfg, gen)
    return x.contiguous()
