"""Heat-map overlays of CAM / attention maps."""

from __future__ import annotations

import numpy as np
import pytest

from dd_assets.pictures import heat_overlay, side_by_side, upsample_nearest


def test_overlay_is_hot_where_the_map_peaks_and_cold_elsewhere():
    images = np.full((1, 3, 8, 8), 128, np.uint8)
    maps = np.zeros((1, 2, 2), np.float32)
    maps[0, 1, 0] = 5.0  # bottom-left quarter is the peak (patch grid 2x2 on 8x8 pixels)
    out = heat_overlay(images, maps, alpha=1.0)
    assert out.shape == images.shape and out.dtype == np.uint8
    # jet-like colours: the peak block is dark red (128, 0, 0), zero is dark blue (0, 0, 128)
    assert (out[0, :, 4:, :4] == np.array([128, 0, 0], np.uint8)[:, None, None]).all()
    assert (out[0, :, :4, :] == np.array([0, 0, 128], np.uint8)[:, None, None]).all()
    assert (out[0, :, 4:, 4:] == np.array([0, 0, 128], np.uint8)[:, None, None]).all()
    half = heat_overlay(images, maps, alpha=0.5)
    assert half[0, 0, 6, 1] == 128 and half[0, 2, 6, 1] == 64


def test_upsample_nearest_keeps_blocks_and_bad_shapes_raise():
    m = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    up = upsample_nearest(m, (4, 6))
    assert up[0, :2, :3].tolist() == [[0, 0, 0]] * 2 and up[0, 2:, 3:].tolist() == [[3, 3, 3]] * 2
    with pytest.raises(ValueError, match="maps"):
        heat_overlay(np.zeros((2, 3, 4, 4), np.uint8), np.zeros((1, 2, 2)))
    pair = side_by_side(np.zeros((2, 3, 4, 4), np.uint8), np.ones((2, 3, 4, 4), np.uint8))
    assert [int(p.max()) for p in pair] == [0, 1, 0, 1]
