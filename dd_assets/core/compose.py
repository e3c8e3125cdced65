"""Compose distilled images from scored crops: a ``factor x factor`` grid of tiles.

With ``factor = 1`` and full-image boxes this is just "resize the chosen real image to
``out_size``", so the same code serves the whole-image baselines (random, herding,
k-means) and RDED.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dd_assets.core.imaging import crop_resize, to_uint8
from dd_assets.core.types import Box, CandidateCrops, Tile

BoxLike = Box | Sequence[int] | np.ndarray


def _box(b: BoxLike) -> Box:
    if isinstance(b, Box):
        return b
    x0, y0, x1, y1 = (int(v) for v in b)
    return Box(x0, y0, x1, y1)


def tile_layout(out_size: int, factor: int) -> list[Box]:
    """Destination boxes of a ``factor x factor`` grid over an ``out_size`` square, row-major.

    Tiles are ``out_size // factor`` pixels; when ``out_size % factor = r != 0`` the first
    ``r`` rows and the first ``r`` columns are one pixel larger (as RDED's ``mix_images``),
    e.g. ``out_size=33, factor=2`` -> rows/cols of 17 then 16 pixels.

    Returns:
        ``factor**2`` boxes ``(x0, y0, x1, y1)``, tile ``t`` at row ``t // factor``,
        column ``t % factor``.
    """
    if factor < 1 or out_size < factor:
        raise ValueError(f"cannot split {out_size} px into {factor} tiles per side")
    base, rem = divmod(out_size, factor)
    edges = [0]
    for i in range(factor):
        edges.append(edges[-1] + base + (1 if i < rem else 0))
    return [
        Box(edges[c], edges[r], edges[c + 1], edges[r + 1])
        for r in range(factor)
        for c in range(factor)
    ]


def compose_images(
    sources: Sequence[torch.Tensor | np.ndarray],
    boxes: Sequence[BoxLike],
    out_size: int,
    factor: int,
    source_ids: Sequence[int],
    scores: Sequence[float] | None = None,
) -> tuple[torch.Tensor, list[Tile]]:
    """Stitch ``factor**2`` crops into one image.

    Tile ``t`` is crop ``boxes[t]`` of ``sources[t]`` (uint8 ``[C, H, W]``, torch or
    numpy) converted to float [0, 1], resized with ``imaging.crop_resize`` to the size of
    destination box ``tile_layout(out_size, factor)[t]``, converted back with
    ``imaging.to_uint8``.

    Returns:
        ``(image, tiles)``: uint8 ``[C, out_size, out_size]`` and the lineage
        ``Tile(source_id, box, dest, score)`` per tile (row-major).
    """
    dests = tile_layout(out_size, factor)
    n = len(dests)
    if not (len(sources) == len(boxes) == len(source_ids) == n):
        raise ValueError(
            f"factor {factor} needs {n} tiles; got {len(sources)} sources, "
            f"{len(boxes)} boxes, {len(source_ids)} source_ids"
        )
    if scores is not None and len(scores) != n:
        raise ValueError(f"factor {factor} needs {n} scores, got {len(scores)}")
    srcs = [torch.as_tensor(s) for s in sources]
    channels = srcs[0].shape[0]
    image = torch.zeros((channels, out_size, out_size), dtype=torch.uint8)
    tiles: list[Tile] = []
    for t, (src, b, dest) in enumerate(zip(srcs, boxes, dests, strict=True)):
        if src.dtype != torch.uint8 or src.ndim != 3 or src.shape[0] != channels:
            raise ValueError(
                f"tile {t}: expected uint8 [{channels}, H, W], got {src.dtype} {tuple(src.shape)}"
            )
        box = _box(b)
        patch = crop_resize(src.float().div(255.0), box.as_tuple(), (dest.height, dest.width))
        image[:, dest.y0 : dest.y1, dest.x0 : dest.x1] = to_uint8(patch)
        score = float("nan") if scores is None else float(scores[t])
        tiles.append(Tile(source_id=int(source_ids[t]), box=box, dest=dest, score=score))
    return image, tiles
