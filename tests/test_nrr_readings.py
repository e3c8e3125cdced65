"""NRR-DD readings (issue 16): beta follows the resolution as RDED's factor, the CAM-critical
crop is the most concentrated one (mean CAM, not CAM mass), "lowest confidence" ranks by
true-class CE (Alg. 1 line 8) or max-probability, and label refinement (Eq. 11-12) acts.

Each mechanism is checked on a constructed case whose right answer is known and which fails
when the mechanism is switched off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.methods.nrr.cidd import cidd_candidates, cidd_select, crop_confidence, crop_scores, resolve_beta
from dd_assets.methods.nrr.refine import NRRConfig, refine
from dd_assets.methods.rded.crops import class_generator, sample_crop_boxes
from tests.test_nrr import _Brightness, staged_cidd

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def tiles_per_side(method: str, block: dict, ipc: int, size: int) -> int:
    """Tiles per side of entry ``method`` (its plugin's ``tiles``) at parameters ``block``."""
    from dd_assets.methods.entries import entry_config, plugin_of

    return plugin_of(method, block).tiles(entry_config(method, block), ipc, size)


# ---------------------------------------------------------------------------- beta (Sec. 3.2)


def test_beta_auto_follows_rded_factor() -> None:
    # RDED: factor 1 up to 64 px (CIFAR, Tiny-ImageNet), 2 above (ImageNet scale)
    assert resolve_beta("auto", 32) == 1 and resolve_beta(None, 32) == 1
    assert resolve_beta("auto", 64) == 1 and resolve_beta("auto", 65) == 4
    assert resolve_beta("auto", 224) == 4  # the paper's beta = 4 at 224 px
    # an explicit integer wins at any size
    assert resolve_beta(4, 32) == 4 and resolve_beta(1, 224) == 1 and resolve_beta(9, 32) == 9
    assert resolve_beta(np.int64(4), 32) == 4
    assert tiles_per_side("nrr", {"beta": "auto"}, 10, 32) == 1
    assert tiles_per_side("nrr", {"beta": "auto"}, 10, 224) == 2
    assert tiles_per_side("nrr", {"beta": 4}, 10, 32) == 2
    assert tiles_per_side("nrr", {"beta": 1}, 10, 224) == 1


@pytest.mark.parametrize("bad", [3, 0, -4, 2.5, "four", True])
def test_beta_not_square_is_refused_naming_the_entry(bad) -> None:
    with pytest.raises(ValueError, match=r"methods\.nrr_x\.beta"):
        resolve_beta(bad, 224, "methods.nrr_x.beta")
    with pytest.raises(ValueError, match=r"methods\.nrr\.beta"):
        tiles_per_side("nrr", {"beta": bad}, 10, 32)


def test_beta_checked_when_definitions_load(tmp_path) -> None:
    from dd_assets.config import load_params
    from dd_assets.defs.methods.nrr import check_entries
    from tests.conftest import write_params

    ok = load_params(write_params(tmp_path, "default_all"))
    assert check_entries(ok) == ["nrr", "nrr_dbr"]
    with pytest.raises(ValueError, match=r"methods\.nrr_b\.beta = 2"):
        check_entries(load_params(write_params(tmp_path, "default_all", {"methods.nrr_b": {"method": "nrr", "beta": 2}})))
    # an unknown crop_score is refused naming the entry (when params.yaml loads, or by the piece)
    with pytest.raises(ValueError, match=r"methods\.nrr_c\.crop_score"):
        check_entries(load_params(write_params(tmp_path, "default_all",
                                               {"methods.nrr_c": {"method": "nrr", "crop_score": "max"}})))


def test_cidd_scores_shared_by_variants_with_the_same_cidd_parameters(tmp_path) -> None:
    """The sharing rule (entries.owner_entry on CIDD_KEYS): label/refinement variants read
    ``cidd_scores``; a variant with other CIDD parameters gets its own asset and version
    (it used to be refused)."""
    from dd_assets.config import load_params
    from dd_assets.defs.methods import nrr
    from dd_assets.defs.methods._sharing import owners, scoring_version
    from tests.conftest import write_params

    p = load_params(write_params(tmp_path, "default_all", {
        "methods.nrr_big": {"method": "nrr", "mipc": 50}, "methods.nrr_big_dbr": {"method": "nrr", "mipc": 50,
                                                                                 "labels": "dbr"}}))
    assert [nrr.candidates_asset(p, e) for e in ("nrr", "nrr_dbr", "nrr_big", "nrr_big_dbr")] == [
        "cidd_scores", "cidd_scores", "nrr_big_cidd_scores", "nrr_big_cidd_scores"]
    assert owners(p, "nrr", nrr.CIDD_KEYS) == ["nrr", "nrr_big"]
    assert scoring_version(p, "nrr", "cidd_scores", nrr.CIDD_KEYS) != scoring_version(
        p, "nrr_big", "cidd_scores", nrr.CIDD_KEYS)
    from dd_assets.storage import layout

    assert layout.owned_scores("cidd_scores", "cidd_scores", "cidd", 3) == layout.scores("cidd", 3)
    assert layout.owned_scores("nrr_big_cidd_scores", "cidd_scores", "cidd", 3) == \
        "scores/nrr_big_cidd_scores/class=0003.parquet"


@pytest.mark.parametrize("size, tiles", [(32, 1), (224, 4)])
def test_staged_cidd_auto_beta_tiles(monkeypatch, size: int, tiles: int) -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (8, 3, size, size), generator=g, dtype=torch.uint8)
    out, lineage, _ = staged_cidd(monkeypatch, _Brightness(size), imgs, np.arange(8), ipc=2, beta="auto", size=size,
                                  num_crop=2)
    assert out.shape == (2, 3, size, size) and np.bincount(np.asarray(lineage["image_index"])).tolist() == [tiles, tiles]


# ---------------------------------------------------------------------------- CAM-critical crop (Alg. 1 line 5)

S = 32
BLOCK = (4, 20, 14, 30)  # (x0, y0, x1, y1): the one high-CAM block (10 x 10 px)


def _block_image(n: int = 1) -> torch.Tensor:
    """Black image, a bright 10 x 10 block (CAM 1 under :class:`_Brightness`) and two larger
    grey distractors (CAM ~0.35)."""
    x = torch.zeros(n, 3, S, S, dtype=torch.uint8)
    x0, y0, x1, y1 = BLOCK
    x[..., y0:y1, x0:x1] = 255
    x[..., 0:14, 0:14] = 90
    x[..., 0:12, 18:32] = 90
    return x


def _iou(box) -> float:
    bx0, by0, bx1, by1 = BLOCK
    x0, y0, x1, y1 = (int(v) for v in box)
    inter = max(0, min(x1, bx1) - max(x0, bx0)) * max(0, min(y1, by1) - max(y0, by0))
    return inter / ((x1 - x0) * (y1 - y0) + (bx1 - bx0) * (by1 - by0) - inter)


def test_crop_scores_prefer_the_concentrated_crop() -> None:
    cam = torch.zeros(S, S)
    x0, y0, x1, y1 = BLOCK
    cam[y0:y1, x0:x1] = 1.0
    cam[0:14, 0:14] = 0.35
    cam[0:12, 18:32] = 0.35
    boxes = np.array([
        [0, 0, 32, 32],     # the whole image: the most CAM mass of any crop
        [4, 20, 14, 30],    # exactly the block
        [0, 0, 16, 16],     # a distractor
        [14, 0, 32, 18],    # the other distractor
        [0, 14, 18, 32],    # the block with black margins
    ])
    mean, mass = crop_scores(cam, boxes, "mean"), crop_scores(cam, boxes, "sum")
    assert int(np.argmax(mean)) == 1 and mean[1] == pytest.approx(1.0)
    assert int(np.argmax(mass)) == 0  # the sum rule keeps the largest crop
    assert crop_scores(cam, boxes).tolist() == mean.tolist()  # the default is the mean
    with pytest.raises(ValueError, match="methods.nrr.crop_score"):
        crop_scores(cam, boxes, "max")


def test_cidd_keeps_the_crop_on_the_block() -> None:
    """End to end: the kept crop is the drawn crop that best covers the block; the old sum
    rule keeps the largest drawn crop (the whole image)."""
    model, k = _Brightness(S), 40
    drawn = sample_crop_boxes(S, S, k, class_generator(0, 0))
    kw = dict(num_crop=k, out_size=S, mean=MEAN, std=STD, seed=0, class_index=0)
    new = cidd_candidates(model, _block_image(), np.zeros(1), np.array([0]), **kw)
    old = cidd_candidates(model, _block_image(), np.zeros(1), np.array([0]), crop_score="sum", **kw)
    best = drawn[int(np.argmax([_iou(b) for b in drawn]))]
    assert new.boxes[0].tolist() == best.tolist() and _iou(new.boxes[0]) > 0.8
    areas = (drawn[:, 2] - drawn[:, 0]) * (drawn[:, 3] - drawn[:, 1])
    assert old.boxes[0].tolist() == drawn[int(np.argmax(areas))].tolist() == [0, 0, S, S]
    assert _iou(old.boxes[0]) < 0.11


def test_cidd_crops_overlap_the_block_more_than_random() -> None:
    """The issue's held-out check on a constructed pool: at the default k = 5 crops per
    image, mean-CAM crops overlap the block clearly more than the sum rule's, and the sum
    rule is no better than a random drawn crop."""
    n, k = 40, 5
    imgs, ids = _block_image(n), np.arange(n)
    kw = dict(num_crop=k, out_size=S, mean=MEAN, std=STD, seed=3, class_index=0)
    new = cidd_candidates(_Brightness(S), imgs, np.zeros(n), ids, **kw)
    old = cidd_candidates(_Brightness(S), imgs, np.zeros(n), ids, crop_score="sum", **kw)
    g = class_generator(3, 0)
    rand = [sample_crop_boxes(S, S, k, g)[0] for _ in range(n)]  # first drawn crop of each image
    iou_new, iou_old = np.mean([_iou(b) for b in new.boxes]), np.mean([_iou(b) for b in old.boxes])
    iou_rand = np.mean([_iou(b) for b in rand])
    assert iou_new > 1.5 * iou_old, (iou_new, iou_old)
    assert abs(iou_old - iou_rand) < 0.05, (iou_old, iou_rand)


# ---------------------------------------------------------------------------- lowest confidence (Alg. 1 lines 8-9)


class _ColorNet(nn.Module):
    """Global-average-pool head on the normalized pixels: logits = 4 * channel means, so a
    constant-colour image has the same logits in every crop."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.fc.weight.copy_(4.0 * torch.eye(3))
            self.fc.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def _constant(means: list[tuple[float, float, float]], s: int = 8) -> torch.Tensor:
    px = [[round(255 * (m * 0.5 + 0.5)) for m in rgb] for rgb in means]
    return torch.tensor(px, dtype=torch.uint8)[:, :, None, None].expand(-1, -1, s, s).contiguous()


def test_confidence_rules_disagree_and_each_keeps_its_least_confident() -> None:
    """Two class-0 images: A is ambiguous between classes 0 and 1 (p = .45/.45/.10), B is
    confidently wrong (p(1) = .95, p(0) = .05).  Max-probability calls A the least
    confident; the true-class CE of Alg. 1 calls B the least confident (CE 3.0 vs 0.8)."""
    net = _ColorNet()
    imgs = _constant([(0.5, 0.5, 0.125), (0.0, 0.75, -1.0)])  # logits ~(2, 2, .5), (0, 3, -4)
    with torch.no_grad():
        p = F.softmax(net(imgs.float() / 127.5 - 1.0), 1)
    boxes = np.array([[[0, 0, 8, 8]], [[2, 2, 6, 6]]])
    labels = np.zeros(2, np.int64)
    mp = crop_confidence(net, imgs, boxes, 8, MEAN, STD, confidence="max_prob")[:, 0]
    ce = crop_confidence(net, imgs, boxes, 8, MEAN, STD, labels=labels, confidence="true_class_ce")[:, 0]
    assert mp == pytest.approx(p.max(1).values.numpy(), abs=1e-5)
    assert ce == pytest.approx((-p[:, 0].log()).numpy(), abs=1e-4)
    assert mp[0] < mp[1] and ce[1] > ce[0]  # the two rules disagree
    assert cidd_select(mp, 1, confidence="max_prob").tolist() == [0]
    assert cidd_select(ce, 1, confidence="true_class_ce").tolist() == [1]
    # through cidd_candidates, the default is the true-class CE
    kw = dict(num_crop=2, out_size=8, mean=MEAN, std=STD, seed=0, class_index=0)
    c_default = cidd_candidates(net, imgs, labels, np.array([10, 11]), **kw)
    c_mp = cidd_candidates(net, imgs, labels, np.array([10, 11]), confidence="max_prob", **kw)
    assert c_default.score == pytest.approx(ce, abs=1e-4) and c_mp.score == pytest.approx(mp, abs=1e-5)
    assert c_default.source_id[cidd_select(c_default, 1)].tolist() == [11]
    assert c_mp.source_id[cidd_select(c_mp, 1, confidence="max_prob")].tolist() == [10]
    with pytest.raises(ValueError, match="methods.nrr.confidence"):
        cidd_candidates(net, imgs, labels, np.array([10, 11]), confidence="entropy", **kw)


# ---------------------------------------------------------------------------- label refinement (Eq. 11-12)


class _SignNet(nn.Module):
    """An identity BatchNorm (running mean 0, var 1), then logits ``[a m, -a m]`` with ``m``
    the mean normalized pixel: bright images are class 0, dark ones class 1."""

    def __init__(self, a: float = 5.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3, eps=0.0)
        self.a = a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.bn(x).mean((1, 2, 3))
        return torch.stack([self.a * m, -self.a * m], 1)


def test_label_refinement_pulls_the_mix_towards_the_partner_class() -> None:
    """Two identical bright images labelled 0 and 1, paired with each other.  Eq. 2 alone
    (CE) brightens image 0 (more class 0).  With Eq. 11-12, the mixed view of image 0 and its
    class-1 partner is still pure class 0, so ``max(0, d_aug - r)`` dominates and pulls image 0
    towards class 1: it gets darker.  Image 1 darkens either way."""
    n = 2
    imgs = torch.full((n, 3, 16, 16), 204, dtype=torch.uint8)  # normalized 0.6: p(class 0) ~ .998
    labels = np.array([0, 1])
    cam = torch.zeros(n, 16, 16)  # nothing critical: every pixel free (M = eps)
    # refine draws each step's pairing first (rng.permutation): pick a seed that pairs 0 <-> 1
    seed = next(s for s in range(100) if np.random.default_rng(s).permutation(n).tolist() == [1, 0])
    cfg = NRRConfig(iterations=1, alpha_bn=0.0, mix="mixup", seed=seed)
    net = _SignNet()
    parts: list[dict] = []
    plain = refine(imgs, labels, net, cam, cfg, MEAN, STD).astype(int)
    lr = refine(imgs, labels, net, cam, cfg, MEAN, STD, label_refine=True,
                on_step=lambda b, i, p: parts.append(p)).astype(int)
    src = imgs.numpy().astype(int)
    assert (plain[0] > src[0]).all() and (plain[1] < src[1]).all()
    assert (lr[0] < src[0]).all() and (lr[1] < src[1]).all()
    # the reported objective is Eq. 11: L_org + alpha_lr * L_lr, with L_lr ~ d_aug - r ~ 6 - .4
    (p,) = parts
    assert p["loss"] == pytest.approx(p["ce"] + cfg.alpha_bn * p["bn"] + cfg.alpha_lr * p["lr"], rel=1e-5)
    assert p["lr"] == pytest.approx(np.log1p(np.exp(2 * 5.0 * 0.6)) - cfg.r, abs=0.02)
    # alpha_lr = 0 switches the term off again: the plain result
    off = refine(imgs, labels, net, cam, NRRConfig(iterations=1, alpha_bn=0.0, mix="mixup", seed=seed, alpha_lr=0.0),
                 MEAN, STD, label_refine=True).astype(int)
    assert np.array_equal(off, plain)
