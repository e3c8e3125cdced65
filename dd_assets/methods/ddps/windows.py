"""DDPS candidate windows (Stage I, Sec. 3.2, supp. 6): the square patches of an image
(:func:`candidate_boxes`), the resize to the diffusion model's input (:func:`prepare_images`),
and pixel boxes mapped to map cells (:func:`boxes_to_cells`) and averaged over
(:func:`box_means`), the average pooling behind ``R(p|c)``
(:func:`dd_assets.methods.ddps.representativeness.patch_scores`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dd_assets.core.imaging import resize_float


def candidate_boxes(
    height: int,
    width: int,
    patch_size: int | None,
    stride: int = 8,
    mode: str = "grid",
    num: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Candidate square patches of one ``height x width`` image (model pixels).

    ``mode="grid"`` (the paper: ``R`` of *all* patches by average pooling, supp. 6): every
    window position ``0, stride, 2*stride, ...`` per axis, plus the flush position
    ``side - patch_size`` when the stride does not reach it; deterministic.  ``mode="random"``
    (*ours*, an alternative): ``num`` uniformly placed windows from
    ``np.random.default_rng(seed)``.  ``patch_size=None`` gives the whole image.

    Returns:
        ``[K, 4] int32`` ``(x0, y0, x1, y1)``, grid row-major (``y`` outer).
    """
    if patch_size is None:
        return np.array([[0, 0, width, height]], dtype=np.int32)
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch_size={patch_size} must be in [1, min(height, width)={min(height, width)}]")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")

    def starts(side: int) -> list[int]:
        s = list(range(0, side - patch_size + 1, stride))
        if s[-1] != side - patch_size:
            s.append(side - patch_size)
        return s

    if mode == "grid":
        pos = [(x, y) for y in starts(height) for x in starts(width)]
    elif mode == "random":
        if num is None or num < 1:
            raise ValueError(f"mode='random' needs num >= 1, got {num}")
        rng = np.random.default_rng(seed)
        pos = list(zip(rng.integers(0, width - patch_size + 1, num).tolist(),
                       rng.integers(0, height - patch_size + 1, num).tolist(), strict=True))
    else:
        raise ValueError(f"unknown mode {mode!r}; use 'grid' or 'random'")
    return np.array([(x, y, x + patch_size, y + patch_size) for x, y in pos], dtype=np.int32)


def prepare_images(images: torch.Tensor, image_size: int | None) -> tuple[torch.Tensor, float]:
    """uint8 ``[N, C, H, W]`` -> float ``[N, C, h, w]`` in [-1, 1] with the shortest edge
    resized to ``image_size`` (aspect kept, antialiased bilinear), and the scale ``h / H``."""
    x = images.float().div(255.0)
    h, w = x.shape[-2:]
    scale = 1.0
    if image_size is not None and min(h, w) != image_size:
        scale = image_size / min(h, w)
        size = (image_size, round(w * scale)) if h <= w else (round(h * scale), image_size)
        x = resize_float(x, size)
        scale = x.shape[-2] / h
    return x * 2.0 - 1.0, scale


def boxes_to_cells(boxes: np.ndarray, cell: float, rows: int, cols: int) -> np.ndarray:
    """Pixel boxes ``[..., 4]`` -> boxes on a grid of ``cell``-pixel cells (``rows x cols``):
    edges rounded to the nearest cell edge, clipped, at least one cell wide."""
    b = np.floor(np.asarray(boxes, dtype=np.float64) / cell + 0.5).astype(np.int64)
    x0 = np.clip(b[..., 0], 0, cols - 1)
    y0 = np.clip(b[..., 1], 0, rows - 1)
    x1 = np.clip(np.maximum(b[..., 2], x0 + 1), 1, cols)
    y1 = np.clip(np.maximum(b[..., 3], y0 + 1), 1, rows)
    return np.stack([x0, y0, x1, y1], axis=-1)


def box_means(maps: torch.Tensor | np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Average of each map over its boxes (integral image).

    Args:
        maps: ``[N, h, w]``; cells: ``[K, 4]`` (same boxes for every map) or ``[N, K, 4]``,
            in map cells.

    Returns:
        ``[N, K] float64``.
    """
    m = torch.as_tensor(maps).double().cpu()
    ii = F.pad(m.cumsum(1).cumsum(2), (1, 0, 1, 0)).numpy()  # [N, h+1, w+1]
    c = np.asarray(cells, dtype=np.int64)
    if c.ndim == 2:
        c = np.broadcast_to(c, (m.shape[0],) + c.shape)
    n = np.arange(m.shape[0])[:, None]
    x0, y0, x1, y1 = (c[..., i] for i in range(4))
    s = ii[n, y1, x1] - ii[n, y0, x1] - ii[n, y1, x0] + ii[n, y0, x0]
    return s / ((x1 - x0) * (y1 - y0))
