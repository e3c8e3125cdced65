"""RDED: crop sampling, crop scoring, per-image realism choice, lowest-CE selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from dd_assets.methods.rded import crops as rded
from dd_assets.core.imaging import crop_resize
from dd_assets.methods import registry
from dd_assets.methods.rded.crops import (
    class_generator,
    sample_crop_boxes,
    score_class,
    score_crops,
    select_lowest,
)
from dd_assets.core.types import CandidateCrops

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class MeanIntensity(nn.Module):
    """2-class logits ``[4 m, -4 m]`` from the mean ``m`` of the (normalized) input.

    Class 0's CE ``softplus(-8 m)`` falls as the input gets brighter.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([4 * m, -4 * m], dim=1)


class CountingModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.inner(x)


def _tiny_convnet(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )
    bn = net[1]
    bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    return net


def test_registered() -> None:
    plugin = registry.get("rded")
    assert plugin.kind == "select" and plugin.candidates == "rded_scores"


def test_rded_scores_shared_by_variants_with_the_same_scoring_parameters(tmp_path) -> None:
    """entries.owner_entry on SCORE_KEYS: a variant differing in scoring parameters (here the
    factor, which the observer reads) gets ``<entry>_rded_scores`` under its own path; one that
    agrees with an earlier entry reads that entry's scores; the code version hashes only the
    scoring parameters, recorded as reading ``methods.<owner>``."""
    from dd_assets.config import load_params
    from dd_assets.defs.common import blocks_read
    from dd_assets.defs.methods import rded as piece
    from dd_assets.defs.methods._sharing import owners, scoring_version
    from dd_assets.storage import layout
    from tests.conftest import write_params

    p = load_params(write_params(tmp_path, "default_all", {
        "methods.rded_f2": {"method": "rded", "factor": 2}, "methods.rded_f2b": {"method": "rded", "factor": 2},
        "methods.rded_same": {"method": "rded"}}))
    names = {e: piece.candidates_asset(p, e) for e in ("rded", "rded_f2", "rded_f2b", "rded_same")}
    assert names == {"rded": "rded_scores", "rded_f2": "rded_f2_rded_scores", "rded_f2b": "rded_f2_rded_scores",
                     "rded_same": "rded_scores"}
    assert owners(p, "rded", piece.SCORE_KEYS) == ["rded", "rded_f2"]
    v = scoring_version(p, "rded", "rded_scores", piece.SCORE_KEYS)
    assert v != scoring_version(p, "rded_f2", "rded_scores", piece.SCORE_KEYS)
    assert blocks_read(v) == ("methods.rded",)
    assert layout.owned_scores("rded_scores", "rded_scores", "rded", 0) == layout.scores("rded", 0)
    assert layout.owned_scores("rded_f2_rded_scores", "rded_scores", "rded", 0) == \
        "scores/rded_f2_rded_scores/class=0000.parquet"


def test_load_candidates_reads_the_scores_table(tmp_path) -> None:
    import pandas as pd

    from dd_assets.defs.methods import rded as piece
    from dd_assets.storage import DataRoot, layout
    from dd_assets.storage.tables import write_table

    root = DataRoot(str(tmp_path))
    df = pd.DataFrame({"source_id": [5, 3], "class_index": 1, "x0": [0, 1], "y0": [0, 2], "x1": [8, 9],
                       "y1": [8, 10], "score": [0.5, 0.25]})
    write_table(root, layout.owned_scores("rded_f2_rded_scores", "rded_scores", "rded", 1), df)
    c = piece.load_candidates(root, "rded_f2_rded_scores", 1, "cat", 16)
    assert c.class_index == 1 and c.class_name == "cat"
    assert c.source_id.dtype == np.int64 and c.boxes.dtype == np.int32 and c.score.dtype == np.float32
    assert c.boxes.tolist() == [[0, 0, 8, 8], [1, 2, 9, 10]] and c.score.tolist() == [0.5, 0.25]


def test_default_factor() -> None:
    assert rded.default_factor(32) == 1
    assert rded.default_factor(64) == 2
    assert rded.default_factor(224) == 2


# --- sample_crop_boxes ----------------------------------------------------------------


@pytest.mark.parametrize("hw", [(32, 32), (48, 64), (64, 40)])
def test_boxes_in_bounds_square_deterministic(hw: tuple[int, int]) -> None:
    h, w = hw
    b = sample_crop_boxes(h, w, 50, torch.Generator().manual_seed(3))
    assert b.dtype == np.int32 and b.shape == (50, 4)
    x0, y0, x1, y1 = b.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= w).all() and (y1 <= h).all()
    assert (x1 > x0).all() and np.array_equal(x1 - x0, y1 - y0)
    assert len(np.unique(x1 - x0)) > 5  # sizes actually vary
    again = sample_crop_boxes(h, w, 50, torch.Generator().manual_seed(3))
    assert b.tobytes() == again.tobytes()
    other = sample_crop_boxes(h, w, 50, torch.Generator().manual_seed(4))
    assert not np.array_equal(b, other)


def test_boxes_match_torchvision_rule() -> None:
    """Same draws as torchvision's RandomResizedCrop.get_params with ratio (1, 1)."""
    for (h, w), scale in [((32, 32), (0.08, 1.0)), ((40, 56), (0.08, 1.0)), ((4, 100), (0.5, 1.0))]:
        ours = sample_crop_boxes(h, w, 20, torch.Generator().manual_seed(11), scale)
        img = torch.zeros(3, h, w)
        with torch.random.fork_rng():
            torch.manual_seed(11)
            ref = []
            for _ in range(20):
                i, j, hh, ww = RandomResizedCrop.get_params(img, list(scale), [1.0, 1.0])
                ref.append((j, i, j + ww, i + hh))
        assert ours.tolist() == [list(r) for r in ref]


def test_boxes_fallback_is_central_square() -> None:
    # a 4 x 100 image with scale >= 0.5 never fits a square: all 10 tries fail
    b = sample_crop_boxes(4, 100, 3, torch.Generator().manual_seed(0), scale=(0.5, 1.0))
    assert b.tolist() == [[48, 0, 52, 4]] * 3


def test_generator_is_only_source_of_randomness() -> None:
    torch.manual_seed(0)
    a = sample_crop_boxes(32, 32, 5, class_generator(1, 2))
    torch.manual_seed(123)
    b = sample_crop_boxes(32, 32, 5, class_generator(1, 2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample_crop_boxes(32, 32, 5, class_generator(1, 3)))


# --- score_crops ----------------------------------------------------------------------


def _random_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def _manual_ce(model, images, labels, boxes, size, pad_to=None) -> np.ndarray:
    model.eval()
    m = torch.tensor(MEAN).view(3, 1, 1)
    s = torch.tensor(STD).view(3, 1, 1)
    out = np.zeros(boxes.shape[:2], np.float32)
    with torch.no_grad():
        for n in range(boxes.shape[0]):
            for k in range(boxes.shape[1]):
                crop = crop_resize(images[n].float() / 255.0, boxes[n, k], (size, size))
                x = ((crop - m) / s)[None]
                if pad_to is not None:
                    d = pad_to - size
                    x = F.pad(x, (d // 2, d - d // 2, d // 2, d - d // 2))
                logits = model(x)
                out[n, k] = -torch.log(torch.softmax(logits, 1)[0, labels[n]]).item()
    return out


@pytest.mark.parametrize("pad_to", [None, 24])
def test_score_crops_equals_manual_forward(pad_to: int | None) -> None:
    images = _random_images(5, 20, 28)
    labels = torch.tensor([0, 2, 1, 1, 0])
    g = torch.Generator().manual_seed(0)
    boxes = np.stack([sample_crop_boxes(20, 28, 4, g) for _ in range(5)])
    model = _tiny_convnet()
    model.train()
    counting = CountingModel(model)
    counting.train()
    ce = score_crops(counting, images, labels, boxes, 15, MEAN, STD, batch_size=7, pad_to=pad_to)
    assert counting.training and model.training  # training flag restored
    assert counting.batch_sizes == [7, 7, 6]  # 20 crops, batched across image boundaries
    assert ce.dtype == np.float32 and ce.shape == (5, 4)
    expected = _manual_ce(model, images, labels, boxes, 15, pad_to)
    np.testing.assert_allclose(ce, expected, rtol=1e-5, atol=1e-5)
    # eval mode matters: BatchNorm batch statistics would give different numbers
    assert np.abs(ce - ce.mean()).max() > 1e-4


def test_score_crops_batch_size_invariant_and_deterministic() -> None:
    images = _random_images(4, 16, 16, seed=2)
    labels = torch.zeros(4, dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    boxes = np.stack([sample_crop_boxes(16, 16, 3, g) for _ in range(4)])
    model = _tiny_convnet()
    a = score_crops(model, images, labels, boxes, 8, MEAN, STD, batch_size=256)
    b = score_crops(model, images, labels, boxes, 8, MEAN, STD, batch_size=1)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert a.tobytes() == score_crops(model, images, labels, boxes, 8, MEAN, STD).tobytes()


# --- score_class ----------------------------------------------------------------------


def _bright_in_smallest_box(
    ids: np.ndarray, size: int, num_crop: int, seed: int, class_index: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Dark images (in ``ids`` order) each bright exactly inside its smallest drawn box.

    Replays the generator in ascending-id order as ``score_class`` documents. Every other
    box of that image is larger or elsewhere, so it holds dark pixels; the smallest box is
    the unique all-bright, lowest-CE crop.
    """
    g = class_generator(seed, class_index)
    images = torch.zeros(len(ids), 3, size, size, dtype=torch.uint8)
    expected = np.zeros((len(ids), 4), np.int32)
    for sid in np.sort(ids):
        boxes = sample_crop_boxes(size, size, num_crop, g)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        best = boxes[int(np.argmin(area))]
        row = int(np.flatnonzero(ids == sid)[0])
        x0, y0, x1, y1 = best
        images[row, :, y0:y1, x0:x1] = 255
        expected[row] = best
    return images, expected


@pytest.mark.parametrize("factor", [1, 2])
def test_score_class_keeps_lowest_ce_crop(factor: int) -> None:
    ids = np.array([40, 10, 30, 20, 50, 60], dtype=np.int64)
    seed, cls, size, k = 5, 2, 32, 5
    images, expected = _bright_in_smallest_box(ids, size, k, seed, cls)
    labels = torch.zeros(len(ids), dtype=torch.int64)
    model = MeanIntensity()
    cands = score_class(model, images, labels, ids, k, size, factor, MEAN, STD, seed, cls)
    assert isinstance(cands, CandidateCrops) and cands.class_index == cls
    order = np.argsort(ids)
    assert cands.source_id.tolist() == sorted(ids.tolist())
    assert cands.boxes.dtype == np.int32 and cands.score.dtype == np.float32
    assert cands.boxes.tolist() == expected[order].tolist()
    # the kept score is the CE of the kept crop, scored at tile size (padded when factor 2)
    tile = size // factor
    pad_to = size if factor > 1 else None
    ce = score_crops(model, images[order], labels, cands.boxes[:, None, :], tile, MEAN, STD,
                     pad_to=pad_to)
    np.testing.assert_array_equal(cands.score, ce[:, 0])
    # all-bright crop: mean of normalized input = 1 * tile^2 / (padded size)^2
    m = (tile / size) ** 2 if factor > 1 else 1.0
    np.testing.assert_allclose(cands.score, np.log1p(np.exp(-8 * m)), rtol=1e-3)


def test_score_class_independent_of_input_order() -> None:
    ids = np.array([7, 3, 9, 1], dtype=np.int64)
    images = _random_images(4, 24, 24, seed=5)
    labels = torch.tensor([1, 1, 1, 1])
    model = _tiny_convnet()
    a = score_class(model, images, labels, ids, 3, 24, 2, MEAN, STD, seed=0, class_index=1)
    perm = np.array([2, 0, 3, 1])
    b = score_class(model, images[torch.from_numpy(perm)], labels, ids[perm], 3, 24, 2,
                    MEAN, STD, seed=0, class_index=1)
    assert a.source_id.tobytes() == b.source_id.tobytes()
    assert a.boxes.tobytes() == b.boxes.tobytes()
    assert a.score.tobytes() == b.score.tobytes()
    c = score_class(model, images, labels, ids, 3, 24, 2, MEAN, STD, seed=1, class_index=1)
    assert not np.array_equal(a.boxes, c.boxes)


def test_score_class_errors() -> None:
    images = _random_images(2, 8, 8)
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="duplicates"):
        score_class(MeanIntensity(), images, labels, np.array([1, 1]), 2, 8, 1, MEAN, STD, 0, 0)
    with pytest.raises(ValueError, match="source_ids"):
        score_class(MeanIntensity(), images, labels, np.array([1]), 2, 8, 1, MEAN, STD, 0, 0)


# --- select_lowest --------------------------------------------------------------------


def _cands(scores: list[float]) -> CandidateCrops:
    k = len(scores)
    return CandidateCrops(
        class_index=4,
        source_id=np.arange(100, 100 + k, dtype=np.int64),
        boxes=np.tile(np.array([0, 0, 8, 8], np.int32), (k, 1)),
        score=np.array(scores, np.float32),
    )


def test_select_lowest_order_and_ties() -> None:
    c = _cands([0.5, 0.1, 0.3, 0.1, 0.9])
    assert select_lowest(c, 3).tolist() == [1, 3, 2]
    assert select_lowest(c, 5).tolist() == [1, 3, 2, 0, 4]
    assert select_lowest(c, 1).dtype == np.int64


def test_select_lowest_errors() -> None:
    c = _cands([0.5, 0.1])
    with pytest.raises(ValueError, match="class 4 has 2 candidate crops, fewer than n=3"):
        select_lowest(c, 3)
    with pytest.raises(ValueError, match="n must be >= 1"):
        select_lowest(c, 0)


def test_score_then_select_picks_most_realistic_images() -> None:
    """Uniform images: brighter = lower CE under MeanIntensity, whatever the crop."""
    levels = [10, 200, 60, 250, 120]
    ids = np.array([5, 4, 3, 2, 1], dtype=np.int64)
    images = torch.stack([torch.full((3, 16, 16), v, dtype=torch.uint8) for v in levels])
    labels = torch.zeros(5, dtype=torch.int64)
    cands = score_class(MeanIntensity(), images, labels, ids, 3, 16, 1, MEAN, STD, 0, 0)
    chosen = select_lowest(cands, 2)
    assert cands.source_id[chosen].tolist() == [2, 4]  # levels 250 then 200
