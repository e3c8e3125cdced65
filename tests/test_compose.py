"""Tiling distilled images from crops, and the lineage records that describe them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dd_assets.core import compose
from dd_assets.core.compose import compose_images, tile_layout
from dd_assets.core.imaging import crop_resize, to_uint8
from dd_assets.core.types import Box, CandidateCrops

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
           (255, 0, 255), (128, 64, 32), (10, 200, 90)]


def _solid(colour: tuple[int, int, int], h: int = 20, w: int = 24) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, h, w).clone()


def test_tile_layout_even() -> None:
    assert tile_layout(32, 2) == [
        Box(0, 0, 16, 16), Box(16, 0, 32, 16), Box(0, 16, 16, 32), Box(16, 16, 32, 32)
    ]
    assert tile_layout(10, 1) == [Box(0, 0, 10, 10)]


def test_tile_layout_remainder_rows_first() -> None:
    boxes = tile_layout(33, 2)
    assert [b.height for b in boxes] == [17, 17, 16, 16]  # rows 17 + 16
    assert [b.width for b in boxes] == [17, 16, 17, 16]  # cols 17 + 16
    assert boxes[3] == Box(17, 17, 33, 33)
    # 3 tiles per side over 11 px: 4 + 4 + 3, and the grid covers the square exactly once
    b3 = tile_layout(11, 3)
    assert [b.width for b in b3[:3]] == [4, 4, 3]
    cover = np.zeros((11, 11), int)
    for b in b3:
        cover[b.y0:b.y1, b.x0:b.x1] += 1
    assert (cover == 1).all()


def test_tile_layout_errors() -> None:
    with pytest.raises(ValueError):
        tile_layout(3, 4)
    with pytest.raises(ValueError):
        tile_layout(8, 0)


@pytest.mark.parametrize("out_size", [32, 33])
def test_compose_solid_colours_land_at_lineage_dest(out_size: int) -> None:
    sources = [_solid(c) for c in COLOURS[:4]]
    boxes = [(0, 0, 24, 20), Box(2, 3, 12, 13), (5, 5, 20, 20), np.array([1, 1, 9, 9])]
    img, tiles = compose_images(sources, boxes, out_size, 2, [11, 12, 13, 14], [0.1, 0.2, 0.3, 0.4])
    assert img.dtype == torch.uint8 and img.shape == (3, out_size, out_size)
    assert [t.source_id for t in tiles] == [11, 12, 13, 14]
    assert [t.score for t in tiles] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert [t.dest for t in tiles] == tile_layout(out_size, 2)
    assert tiles[1].box == Box(2, 3, 12, 13) and tiles[3].box == Box(1, 1, 9, 9)
    paint = np.full((out_size, out_size), -1)
    for t in tiles:
        region = img[:, t.dest.y0:t.dest.y1, t.dest.x0:t.dest.x1]
        colour = COLOURS[t.source_id - 11]
        assert (region == torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)).all()
        paint[t.dest.y0:t.dest.y1, t.dest.x0:t.dest.x1] = t.source_id
    assert (paint >= 0).all()  # every pixel comes from some tile
    if out_size == 33:
        assert tiles[0].dest.height == 17 and tiles[2].dest.height == 16


def test_compose_tile_content_is_resized_crop() -> None:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (3, 30, 30), generator=g, dtype=torch.uint8)
    box = (4, 6, 24, 26)
    img, tiles = compose_images([src], [box], 16, 1, [7])
    expected = to_uint8(crop_resize(src.float() / 255.0, box, (16, 16)))
    assert torch.equal(img, expected)
    assert np.isnan(tiles[0].score)
    # an identity crop at the same size is copied exactly
    same, _ = compose_images([src], [(0, 0, 30, 30)], 30, 1, [7])
    assert torch.equal(same, src)


def test_compose_images_errors() -> None:
    with pytest.raises(ValueError, match="needs 4 tiles"):
        compose_images([_solid(COLOURS[0])], [(0, 0, 4, 4)], 8, 2, [1])
    with pytest.raises(ValueError, match="outside image"):
        compose_images([_solid(COLOURS[0])], [(0, 0, 40, 40)], 8, 1, [1])


def _cands(n: int) -> CandidateCrops:
    return CandidateCrops(
        class_index=3,
        source_id=np.arange(100, 100 + n, dtype=np.int64),
        boxes=np.tile(np.array([0, 0, 24, 20], np.int32), (n, 1)),
        score=np.linspace(0.0, 1.0, n).astype(np.float32),
    )
