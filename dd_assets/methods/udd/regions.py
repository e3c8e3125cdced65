"""UDD candidate regions (Sec. 2.2) and their differentiable crop + upsample (Sec. 2.4, Fig. 2).

Paper: /work/shared/papers/004_5acb7ff699889e9c.txt.  ``N = 12`` windows per synthetic image,
sizes ``H/3, H/2, 2H/3`` in the four corners (:func:`candidate_windows`); where each window
falls on a feature grid (:func:`footprint_weights`) and the mean of a response map over it
(:func:`window_means`); the chosen windows cropped and bilinearly upsampled to ``H x W``
(:func:`crop_upsample`) and joined to the originals, ``S_c^train = S_c + R*``
(:func:`training_batch`).  Which windows are chosen: :mod:`dd_assets.methods.udd.mining`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

WINDOW_FRACTIONS = (1.0 / 3.0, 1.0 / 2.0, 2.0 / 3.0)
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")

# ============================================================================ regions (Sec. 2.2)


def candidate_windows(height: int, width: int, fractions: Sequence[float] = WINDOW_FRACTIONS) -> np.ndarray:
    """The candidate regions of Sec. 2.2 for an ``height x width`` image.

    For every fraction ``f`` (default ``1/3, 1/2, 2/3``: small, medium, large) a window of
    ``round(f * H) x round(f * W)`` pixels (nearest integer, halves rounded up; at least 1)
    is placed in the top-left, top-right, bottom-left and bottom-right corner.

    Returns:
        int64 ``[4 * len(fractions), 4]`` half-open ``(x0, y0, x1, y1)`` boxes, size-major
        (all corners of the first fraction, then the next), corners in :data:`CORNERS` order.
        E.g. ``H = W = 12``: sizes 4, 6, 8; window 1 (small, top-right) is ``(8, 0, 12, 4)``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")
    if len(fractions) == 0:
        raise ValueError("window fractions must not be empty")
    out = []
    for f in fractions:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"window fractions must be in (0, 1], got {f}")
        sh = min(height, max(1, int(math.floor(height * float(f) + 0.5 + 1e-9))))
        sw = min(width, max(1, int(math.floor(width * float(f) + 0.5 + 1e-9))))
        out += [
            (0, 0, sw, sh),
            (width - sw, 0, width, sh),
            (0, height - sh, sw, height),
            (width - sw, height - sh, width, height),
        ]
    return np.asarray(out, dtype=np.int64)


def _cell_overlap(lo: float, hi: float, n_px: int, n_cells: int) -> np.ndarray:
    """Fraction of each of ``n_cells`` equal cells over ``[0, n_px)`` covered by ``[lo, hi)``."""
    step = n_px / n_cells
    edges = np.arange(n_cells + 1, dtype=np.float64) * step
    cover = np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1])
    return np.clip(cover, 0.0, None) / step


def footprint_weights(
    windows: np.ndarray, image_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Where each window falls on a ``gh x gw`` feature grid (Fig. 4b, "windows placed on the
    feature map, downsampled accordingly").

    Feature cell ``(i, j)`` is taken to cover pixels ``[i H/gh, (i+1) H/gh) x [j W/gw, (j+1) W/gw)``;
    a window's weight on a cell is the covered fraction of the cell's rows times that of its
    columns (exactly 0/1 when the window is aligned to the grid).

    Returns:
        ``(rows [N, gh], cols [N, gw])`` float64 coverage fractions.
    """
    h, w = image_hw
    gh, gw = grid_hw
    b = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    rows = np.stack([_cell_overlap(y0, y1, h, gh) for _, y0, _, y1 in b])
    cols = np.stack([_cell_overlap(x0, x1, w, gw) for x0, _, x1, _ in b])
    return rows, cols


def window_means(maps: torch.Tensor, windows: np.ndarray, image_hw: tuple[int, int]) -> torch.Tensor:
    """Mean of each map over each window's footprint (coverage-weighted, :func:`footprint_weights`).

    Args:
        maps: ``[B, gh, gw]`` response maps (one per image).
        windows: ``[N, 4]`` boxes in image pixels; image_hw: ``(H, W)`` of the image.

    Returns:
        ``[B, N]`` (same dtype/device as ``maps``).
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, gh, gw], got {tuple(maps.shape)}")
    rows, cols = footprint_weights(windows, image_hw, (maps.shape[-2], maps.shape[-1]))
    r = torch.as_tensor(rows, dtype=maps.dtype, device=maps.device)
    c = torch.as_tensor(cols, dtype=maps.dtype, device=maps.device)
    area = r.sum(1) * c.sum(1)  # [N]
    return torch.einsum("bhw,nh,nw->bn", maps, r, c) / area


# ============================================================================ crop + upsample (Sec. 2.4, Fig. 2)


def crop_upsample(x: torch.Tensor, windows: np.ndarray, choice: torch.Tensor) -> torch.Tensor:
    """Crop the chosen windows and bilinearly upsample them to the full size (Sec. 2.4, Fig. 2).

    Differentiable: gradients flow back to the pixels of ``x`` inside the chosen windows.
    Bilinear with ``align_corners=False`` and no antialiasing (windows are never larger than
    the image).

    Args:
        x: ``[B, C, H, W]``; windows: ``[N, 4]`` boxes; choice: int ``[B, P]`` window indices.

    Returns:
        ``[B * P, C, H, W]``, image-major (row ``i * P + j`` is window ``choice[i, j]`` of image ``i``).
    """
    b, _, h, w = x.shape
    choice = torch.as_tensor(choice, dtype=torch.long).cpu()
    if choice.ndim != 2 or choice.shape[0] != b:
        raise ValueError(f"choice must be [B={b}, P], got {tuple(choice.shape)}")
    p = choice.shape[1]
    if p == 0:
        return x[:0]
    flat = choice.reshape(-1)
    if int(flat.min()) < 0 or int(flat.max()) >= len(windows):
        raise ValueError(f"choice holds window indices outside [0, {len(windows)})")
    img_of = torch.arange(b).repeat_interleave(p)
    pieces, positions = [], []
    for n in torch.unique(flat).tolist():
        pos = torch.nonzero(flat == n).reshape(-1)
        x0, y0, x1, y1 = (int(v) for v in windows[n])
        patch = x[img_of[pos].to(x.device), :, y0:y1, x0:x1]
        pieces.append(F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False))
        positions.append(pos)
    order = torch.argsort(torch.cat(positions))
    return torch.cat(pieces)[order.to(x.device)]


def training_batch(x: torch.Tensor, windows: np.ndarray, choice: torch.Tensor) -> torch.Tensor:
    """``S^train`` of Fig. 2: the originals followed by their upsampled under-used regions.

    ``x [B, C, H, W]``, ``choice [B, P]`` -> ``[B * (1 + P), C, H, W]`` (differentiable).
    """
    return torch.cat([x, crop_upsample(x, windows, choice)])
