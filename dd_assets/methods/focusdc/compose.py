"""FocusDC step 5: information reconstruction (Eq. 8).

Each distilled image is a ``2 x 2`` grid: ``m = 3`` key patches + ``n = 1``
low-resolution view -> :func:`focus_composite`.  Students are then trained on
region-level soft labels (FKD; see ``dd_assets.core.soft_labels``).  In the asset graph
the selection table (``dd_assets.defs.chain._focusdc_rows``: key boxes, then whole-image
context boxes per image) is stitched by the shared ``dd_assets.core.compose.compose_images``,
the same call this function makes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dd_assets.core.compose import compose_images
from dd_assets.core.types import Box, Tile


def _factor(m: int, n: int) -> int:
    f = math.isqrt(m + n)
    if m < 0 or n < 0 or m + n < 1 or f * f != m + n:
        raise ValueError(f"m + n must be a positive square number, got m={m}, n={n}")
    return f


def focus_composite(
    key_patches: Sequence[tuple[torch.Tensor | np.ndarray, Box | Sequence[int]]],
    context: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    out_size: int,
    m: int = 3,
    n: int = 1,
    key_ids: Sequence[int] | None = None,
    context_ids: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
) -> tuple[torch.Tensor, list[Tile]]:
    """One distilled image: ``m`` key patches + ``n`` low-resolution whole-image views (Eq. 8).

    ``concat`` of Eq. 8 is a ``sqrt(m+n) x sqrt(m+n)`` grid (``compose.tile_layout``;
    default 2 x 2): tiles ``0..m-1`` (row-major) are the key patches ``x*`` (crop ``box``
    of the full-resolution source, resized to the tile), tiles ``m..m+n-1`` the
    low-resolution views ``x'`` (the WHOLE context image resized to the tile).  Pixels
    come from ``compose.compose_images``.

    Args:
        key_patches: ``m`` pairs ``(source uint8 [C, H, W], box (x0, y0, x1, y1))``.
        context: one uint8 ``[C, H, W]`` image (``n = 1``) or ``n`` of them.
        key_ids / context_ids: manifest ids for the lineage (default ``-1``).
        scores: ``m + n`` per-tile scores for the lineage (default NaN).

    Returns:
        ``(image uint8 [C, out_size, out_size], tiles)`` with ``m + n`` :class:`Tile`.
    """
    factor = _factor(m, n)
    ctx = [context] if (isinstance(context, (torch.Tensor, np.ndarray)) and context.ndim == 3) else list(context)
    if len(key_patches) != m or len(ctx) != n:
        raise ValueError(f"need {m} key patches and {n} context images, got {len(key_patches)}, {len(ctx)}")
    kids = [-1] * m if key_ids is None else [int(v) for v in key_ids]
    cids = [-1] * n if context_ids is None else [int(v) for v in context_ids]
    if len(kids) != m or len(cids) != n:
        raise ValueError("key_ids / context_ids lengths must be m / n")
    sources = [p[0] for p in key_patches] + ctx
    boxes = [p[1] for p in key_patches] + [
        Box(0, 0, int(c.shape[-1]), int(c.shape[-2])) for c in ctx
    ]
    return compose_images(sources, boxes, out_size, factor, kids + cids, scores)

