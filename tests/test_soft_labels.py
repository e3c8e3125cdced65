from __future__ import annotations

import numpy as np
import pytest
import torch

from dd_assets.core.imaging import crop_resize
from dd_assets.core.soft_labels import (
    SoftLabels,
    ViewParams,
    render_views,
    sample_views,
    teacher_soft_labels,
)
from dd_assets.models import ConvNet

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def _images(n: int = 6, s: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)


def test_sample_views_deterministic_and_valid() -> None:
    n, e, s = 50, 4, 16
    a = sample_views(n, e, s, seed=3)
    b = sample_views(n, e, s, seed=3)
    c = sample_views(n, e, s, seed=4)
    for name in ("crop", "flip", "partner", "mix_box", "lam"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.crop, c.crop)
    assert a.crop.dtype == np.int16 and a.mix_box.dtype == np.int16
    assert a.flip.dtype == bool and a.partner.dtype == np.int32 and a.lam.dtype == np.float32
    x0, y0, x1, y1 = np.moveaxis(a.crop.astype(int), -1, 0)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= s).all() and (y1 <= s).all()
    assert (x1 > x0).all() and (y1 > y0).all()
    area = (x1 - x0) * (y1 - y0) / s**2
    assert area.min() >= 0.04 and area.max() <= 1.0  # scale (0.08, 1) up to rounding
    assert (a.partner >= 0).all() and (a.partner < n).all()
    # lam is the kept area fraction after clipping
    bx0, by0, bx1, by1 = np.moveaxis(a.mix_box.astype(int), -1, 0)
    assert (bx0 >= 0).all() and (bx1 <= s).all() and (by0 >= 0).all() and (by1 <= s).all()
    np.testing.assert_allclose(a.lam, 1.0 - (bx1 - bx0) * (by1 - by0) / s**2, rtol=0, atol=1e-6)
    assert (a.lam < 1).any()
    # switching CutMix off keeps crops/flips/partners and blanks the boxes
    off = sample_views(n, e, s, seed=3, cutmix_prob=0.0)
    assert np.array_equal(off.crop, a.crop) and np.array_equal(off.flip, a.flip)
    assert (off.mix_box == 0).all() and (off.lam == 1).all()
    assert (sample_views(n, e, s, seed=3, cutmix_alpha=0.0).lam == 1).all()


def test_render_replays_bit_for_bit_independent_of_batch() -> None:
    imgs = _images()
    views = sample_views(6, 3, 16, seed=1)
    for e in range(3):
        full = render_views(imgs, views, e, torch.arange(6), MEAN, STD)
        again = render_views(imgs, views, e, torch.arange(6), MEAN, STD)
        assert full.shape == (6, 3, 16, 16) and full.dtype == torch.float32
        assert torch.equal(full, again)
        sub = render_views(imgs, views, e, torch.tensor([5, 2, 0]), MEAN, STD)
        assert torch.equal(sub, full[[5, 2, 0]])
        single = render_views(imgs.numpy(), views, e, [4], MEAN, STD)
        assert torch.equal(single[0], full[4])


def _manual_views() -> ViewParams:
    return ViewParams(
        crop=np.array([[[0, 0, 8, 8]], [[4, 2, 8, 6]]], np.int16),
        flip=np.array([[True], [True]]),
        partner=np.array([[1], [1]], np.int32),
        mix_box=np.array([[[2, 3, 5, 7]], [[0, 0, 0, 0]]], np.int16),
        lam=np.array([[1 - 12 / 64], [1.0]], np.float32),
    )


def test_render_crop_flip_cutmix_pixels() -> None:
    s = 8
    ramp = torch.arange(s, dtype=torch.uint8).mul(30).view(1, 1, s).expand(3, s, s)  # value grows with x
    other = (torch.arange(s * s, dtype=torch.uint8).view(1, s, s) * 3).expand(3, s, s)
    imgs = torch.stack([ramp, other]).contiguous()
    views = _manual_views()
    out = render_views(imgs, views, 0, [0, 1], (0, 0, 0), (1, 1, 1))

    # image 1: crop (4,2)-(8,6) resized to 8x8, flipped, no CutMix
    partner_view = crop_resize(imgs[1].float() / 255, (4, 2, 8, 6), (s, s)).flip(-1)
    assert torch.equal(out[1], partner_view)

    # image 0: full crop (identity) + flip, then partner's own view pasted at x 2:5, y 3:7
    expected = (imgs[0].float() / 255).flip(-1)
    assert torch.equal(expected[0, 0], torch.arange(s - 1, -1, -1).float() * 30 / 255)
    expected[:, 3:7, 2:5] = partner_view[:, 3:7, 2:5]
    assert torch.equal(out[0], expected)
    # kept area fraction
    assert views.lam[0, 0] == pytest.approx(1 - (3 * 4) / 64)

    # normalization
    normed = render_views(imgs, views, 0, [0], MEAN, STD)
    m = torch.tensor(MEAN).view(3, 1, 1)
    sd = torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(normed[0], (expected - m) / sd)


def test_dense_logits_and_nbytes() -> None:
    n, e, k, c = 5, 3, 4, 10
    views = sample_views(n, e, 8, seed=0)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(n, e, k)).astype(np.float16)
    indices = np.stack([rng.permutation(c)[:k] for _ in range(n * e)]).reshape(n, e, k).astype(np.int16)
    soft = SoftLabels(views=views, values=values, indices=indices, num_classes=c)
    dense = soft.dense_logits(2, torch.tensor([3, 1]))
    assert dense.shape == (2, c) and dense.dtype == torch.float32
    for row, i in enumerate([3, 1]):
        for j in range(k):
            assert dense[row, int(indices[i, 2, j])] == float(values[i, 2, j])
        others = sorted(set(range(c)) - set(indices[i, 2].tolist()))
        assert torch.isneginf(dense[row, others]).all()
        probs = dense[row].softmax(0)
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)

    expected = (
        n * e * k * 2  # values fp16
        + n * e * k * 2  # indices int16
        + n * e * 4 * 2  # crop int16
        + n * e * 1  # flip bool
        + n * e * 4  # partner int32
        + n * e * 4 * 2  # mix_box int16
        + n * e * 4  # lam float32
    )
    assert soft.nbytes() == expected == views.nbytes() + 2 * n * e * k * 2

    back = SoftLabels.from_arrays(soft.to_arrays())
    assert torch.equal(back.dense_logits(1, [0, 4]), soft.dense_logits(1, [0, 4]))


def test_teacher_soft_labels_match_manual_forward() -> None:
    torch.manual_seed(0)
    teacher = ConvNet(7, image_size=16, depth=2, width=8).train()
    imgs = _images(n=6, s=16)
    views = sample_views(6, 2, 16, seed=5)
    soft = teacher_soft_labels(teacher, imgs, views, topk=3, mean=MEAN, std=STD, batch_size=4)
    assert teacher.training  # mode restored
    assert soft.values.shape == (6, 2, 3) and soft.values.dtype == np.float16
    assert soft.indices.dtype == np.int16 and soft.num_classes == 7
    teacher.eval()
    with torch.no_grad():
        for e in range(2):
            logits = torch.cat(
                [teacher(render_views(imgs, views, e, torch.arange(s, min(s + 4, 6)), MEAN, STD)) for s in (0, 4)]
            )
            top = logits.topk(3, dim=1)
            assert np.array_equal(soft.values[:, e], top.values.numpy().astype(np.float16))
            assert np.array_equal(soft.indices[:, e], top.indices.numpy().astype(np.int16))
    # with k == C the dense logits are the (fp16-rounded) teacher logits
    full = teacher_soft_labels(teacher, imgs, views, topk=7, mean=MEAN, std=STD)
    with torch.no_grad():
        ref = teacher(render_views(imgs, views, 1, torch.arange(6), MEAN, STD))
    torch.testing.assert_close(full.dense_logits(1, torch.arange(6)), ref.half().float(), rtol=0, atol=1e-6)
