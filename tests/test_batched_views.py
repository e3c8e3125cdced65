"""Batched view rendering equals the exact per-image renderer up to float rounding.

Constructed cases: random uint8 images and views (RandomResizedCrop boxes of every size
including the whole image, flips, CutMix boxes and partners), and hand-made boxes whose
bilinear weights are known.  A wrong offset, a transposed weight, a missed flip or a missed
paste moves pixels by far more than the tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dd_assets.core.batched_views import render_views_batched, renderer
from dd_assets.core.soft_labels import ViewParams, render_views, sample_views

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.mark.parametrize("size,scale", [(32, (0.08, 1.0)), (17, (0.5, 1.0)), (32, (1.0, 1.0))])
def test_batched_equals_exact(size, scale):
    rng = np.random.default_rng(size)
    imgs = torch.from_numpy(rng.integers(0, 256, (24, 3, size, size), dtype=np.uint8))
    views = sample_views(24, 6, size, seed=3, scale=scale)
    for e in range(6):
        idx = np.random.default_rng(e).permutation(24)[:10]
        a = render_views(imgs, views, e, idx, MEAN, STD)
        b = render_views_batched(imgs, views, e, idx, MEAN, STD)
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5)


def test_known_weights_and_each_mechanism():
    """One 4-px image, a 2-px crop at (1, 1) upsampled to 4 px, flipped and with a pasted corner."""
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(2, 3, 1, 1) * 10
    img[1] = 255 - img[1]
    v = ViewParams(crop=np.array([[[1, 1, 3, 3]], [[0, 0, 4, 4]]], np.int16), flip=np.array([[True], [False]]),
                   partner=np.array([[1], [1]], np.int32), mix_box=np.array([[[0, 0, 1, 1]], [[0, 0, 0, 0]]], np.int16),
                   lam=np.ones((2, 1), np.float32))
    out = render_views_batched(img, v, 0, [0, 1], (0.0,) * 3, (1.0,) * 3) * 255
    # rows of the 2-px crop [[50, 60], [90, 100]] at scale 0.5: src = 0, 0.25, 0.75, 1 -> cols 50, 52.5, 57.5, 60
    row0 = torch.tensor([50.0, 52.5, 57.5, 60.0])
    want = torch.stack([row0, row0 + 10, row0 + 30, row0 + 40]).flip(-1)   # flipped
    want[0, 0] = 255.0   # pasted from the partner's (unflipped, whole) view: pixel (0, 0) of 255 - img
    torch.testing.assert_close(out[0, 0], want, rtol=0, atol=1e-3)
    torch.testing.assert_close(out[1, 0], (255.0 - img[0, 0].float()), rtol=0, atol=1e-3)


def test_randaugment_views_fall_back_to_exact():
    rng = np.random.default_rng(1)
    imgs = torch.from_numpy(rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8))
    views = sample_views(6, 2, 16, seed=1, randaugment=(2, 9))
    assert torch.equal(render_views_batched(imgs, views, 1, [0, 3, 5], MEAN, STD),
                       render_views(imgs, views, 1, [0, 3, 5], MEAN, STD))


def test_renderer_names():
    assert renderer("exact") is render_views and renderer("batched") is render_views_batched
    with pytest.raises(ValueError, match="render='fast'"):
        renderer("fast")
