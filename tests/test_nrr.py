"""NRR-DD core: CAM (Eq. 1), CIDD, non-critical mask (Eq. 4), BN loss (Eq. 3),
masked refinement (Eq. 2-5, 11-12) and DBR labels (Eq. 6-10)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core import cam as cam_mod
from dd_assets.core.cam import class_activation_maps, raw_class_activation_maps
from dd_assets.core.dbr import DBRLabels, ce_distances, dbr_loss, sce_loss, student_loss, teacher_dbr_labels
from dd_assets.core.imaging import crop_resize, to_model_input
from dd_assets.methods.nrr.cams import image_cams, raw_image_cams, upsample_cams
from dd_assets.methods.nrr.cidd import beta_to_factor, cam_mass, cidd_candidates, cidd_select
from dd_assets.methods.nrr.refine import NO_BN_MESSAGE, NRRConfig, bn_statistics_loss, nrr_mask, refine
from dd_assets.methods.rded.crops import class_generator, sample_crop_boxes
from dd_assets.methods import registry
from dd_assets.core.soft_labels import render_views, sample_views
from dd_assets.core.types import CandidateCrops
from dd_assets.models import ConvNet, create_model

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def _bn_convnet(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet_d3", num_classes, image_size=16, norm="batch", width=8)


def _images(n: int, s: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)


def test_registered() -> None:
    plugin = registry.get("nrr")
    assert plugin.kind == "select" and plugin.candidates == "cidd_scores" and plugin.refine is not None
    assert "labels" in plugin.label_keys and "alpha_dbr" in plugin.defaults


# ---------------------------------------------------------------------------- mask (Eq. 4)


def test_mask_zero_exactly_where_cam_reaches_eps() -> None:
    c = torch.tensor([[0.0, 0.2, 0.4999, 0.5], [0.5001, 0.7, 1.0, 0.25]])
    m = nrr_mask(c, eps=0.5)
    assert m.dtype == torch.float32 and m.shape == c.shape
    assert torch.equal(m == 0, c >= 0.5)
    below = c < 0.5
    assert torch.allclose(m[below], 0.5 - c[below], atol=0, rtol=1e-6)
    assert m[0, 0] == 0.5 and (m >= 0).all()
    # other eps, numpy input
    m2 = nrr_mask(np.array([0.1, 0.3, 0.31]), eps=0.3)
    assert m2.tolist() == pytest.approx([0.2, 0.0, 0.0])


# ---------------------------------------------------------------------------- CAM (Eq. 1)


def _identity_convnet(num_classes: int = 2) -> ConvNet:
    """ConvNet-D1, 8 px, width 2, no norm: each feature channel = avgpool(relu(sum of RGB))."""
    net = ConvNet(num_classes, image_size=8, depth=1, width=2, norm="none")
    with torch.no_grad():
        conv = net.features[0]
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = 1.0  # centre tap of every input channel
        conv.bias.zero_()
        net.classifier.weight.zero_()
        net.classifier.bias.fill_(0.3)
    return net


def test_cam_peaks_where_the_input_drives_the_class() -> None:
    net = _identity_convnet()
    with torch.no_grad():
        net.classifier.weight[0] = 1.0  # class 0: uniform weight over the whole map
    x = torch.zeros(1, 3, 8, 8)
    x[:, :, :4, :4] = 1.0  # bright top-left quadrant -> feature cells (0..1, 0..1) = 3
    cam = class_activation_maps(net, x, torch.tensor([0]))
    assert cam.shape == (1, 8, 8) and cam.dtype == torch.float32
    # bilinear (align_corners=False) upsampling of the 2x2 block keeps pixels 0..2 at the max
    assert torch.equal(cam[0, :3, :3], torch.ones(3, 3))
    assert torch.equal(cam[0, 5:, :], torch.zeros(3, 8)) and torch.equal(cam[0, :, 5:], torch.zeros(8, 3))
    assert cam[0, 3, 3] == pytest.approx(0.75**2)  # one step into the bilinear ramp
    r, c = divmod(int(cam[0].argmax()), 8)
    assert r < 4 and c < 4


def test_cam_flattened_head_uses_spatial_weights() -> None:
    """Uniform features: only the spatially resolved classifier row can make a peak."""
    net = _identity_convnet()
    with torch.no_grad():
        w = net.classifier.weight[1].view(2, 4, 4)
        w[0, 1, 2] = 2.0  # class 1 looks at feature cell (row 1, col 2), channel 0
        w[1, 1, 2] = 1.0
    x = torch.ones(1, 3, 8, 8)
    raw = raw_class_activation_maps(net, x, torch.tensor([1]))
    expected_raw = torch.zeros(1, 4, 4)
    expected_raw[0, 1, 2] = (2.0 + 1.0) * 3.0
    assert torch.allclose(raw, expected_raw)
    cam = class_activation_maps(net, x, torch.tensor([1]))
    assert torch.equal(cam[0, 2:4, 4:6], torch.ones(2, 2))  # pixels of feature cell (1, 2)
    assert cam[0].max() == 1.0 and cam[0].min() == 0.0
    assert cam[0, 6:, :].abs().max() == 0 and cam[0, :, :2].abs().max() == 0


def test_cam_matches_manual_computation_on_bn_convnet() -> None:
    net = _bn_convnet()
    net.train()
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 1])
    cam = class_activation_maps(net, x, y)
    assert net.training  # mode restored
    net.eval()
    with torch.no_grad():
        feat = net.forward_features(x)  # [4, 8, 2, 2]
        wts = net.classifier.weight[y].view(4, 8, 2, 2)
        raw = (wts * feat).sum(1)
        # the spatial CAM is an exact decomposition of the logit (bias excluded)
        logits = net(x)
        assert torch.allclose(raw.sum((1, 2)), logits[torch.arange(4), y] - net.classifier.bias[y], atol=1e-5)
        up = F.interpolate(raw[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        lo = up.amin((1, 2), keepdim=True)
        hi = up.amax((1, 2), keepdim=True)
        manual = (up - lo) / (hi - lo)
    assert torch.allclose(cam, manual, atol=1e-6)
    assert torch.allclose(cam.amin((1, 2)), torch.zeros(4)) and torch.allclose(cam.amax((1, 2)), torch.ones(4))


class _GapNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))


def test_cam_gap_head_is_classic_cam() -> None:
    net = _GapNet()
    x = torch.randn(2, 3, 6, 6)
    y = torch.tensor([3, 0])
    raw = raw_class_activation_maps(net, x, y)
    with torch.no_grad():
        feat = net.forward_features(x)
        classic = torch.einsum("bk,bkij->bij", net.fc.weight[y], feat)
        assert torch.allclose(raw, classic, atol=1e-6)
        assert torch.allclose(raw.mean((1, 2)), net(x)[torch.arange(2), y] - net.fc.bias[y], atol=1e-5)
    cam = class_activation_maps(net, x, y, size=(12, 12))
    assert cam.shape == (2, 12, 12)


def test_cam_constant_map_is_zero_and_bad_head_raises() -> None:
    net = _identity_convnet()  # all-zero classifier -> constant CAM
    cam = class_activation_maps(net, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    assert torch.equal(cam, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="get_classifier"):
        cam_mod.raw_class_activation_maps(nn.Conv2d(3, 3, 1), torch.rand(1, 3, 8, 8), torch.tensor([0]))


# ---------------------------------------------------------------------------- BN loss (Eq. 3)


def test_bn_loss_hand_computed_single_layer() -> None:
    bn = nn.BatchNorm2d(2)
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    x = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[4.0, 6.0]], [[3.0, 3.0]]]])  # [2, 2, 1, 2]
    mu = np.array([3.0, 2.0])
    var = np.array([np.var([0, 2, 4, 6]), np.var([1, 1, 3, 3])])  # biased: 5, 1
    expected = np.linalg.norm(mu - [1.0, -1.0]) + np.linalg.norm(var - [2.0, 0.5])
    assert float(bn_statistics_loss(nn.Sequential(bn), x)) == pytest.approx(expected, rel=1e-6)


def test_bn_loss_zero_at_running_stats_positive_otherwise() -> None:
    net = _bn_convnet()
    x = torch.randn(8, 3, 16, 16)
    layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    net.eval()
    # set each layer's running stats to its batch stats, in forward order (eval-mode BN
    # of earlier layers changes the inputs of later ones)
    for layer in layers:
        seen: dict[str, torch.Tensor] = {}

        def grab(m: nn.Module, i: tuple[torch.Tensor, ...], o: torch.Tensor) -> None:
            seen["x"] = i[0].detach().clone()  # (a hook returning a value would replace the output)

        h = layer.register_forward_hook(grab)
        with torch.no_grad():
            net(x)
        h.remove()
        layer.running_mean.copy_(seen["x"].mean((0, 2, 3)))
        layer.running_var.copy_(seen["x"].var((0, 2, 3), unbiased=False))
    net.train()
    before = [m.running_mean.clone() for m in layers]
    assert float(bn_statistics_loss(net, x).detach()) < 1e-4
    assert net.training and all(torch.equal(b, m.running_mean) for b, m in zip(before, layers))
    x2 = x.detach().clone().requires_grad_(True)
    loss = bn_statistics_loss(net, x2 * 2.0 + 1.0)
    assert float(loss.detach()) > 0.5
    loss.backward()
    assert x2.grad is not None and x2.grad.abs().sum() > 0


def test_no_bn_teacher_raises_clear_error() -> None:
    net = create_model("convnet_d3", 3, image_size=16, norm="instance", width=8)
    with pytest.raises(ValueError, match="NRR needs a batch-norm teacher: set teacher.arch_kwargs.norm: batch"):
        bn_statistics_loss(net, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="set teacher.arch_kwargs.norm: batch"):
        refine(_images(2), np.zeros(2), net, None, NRRConfig(iterations=1), MEAN, STD)
    assert "teacher.arch_kwargs.norm" in NO_BN_MESSAGE


# ---------------------------------------------------------------------------- refine (Eq. 2-5)


def _refine_case() -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    imgs = _images(4, seed=2)
    labels = np.array([0, 1, 2, 0])
    cam = torch.zeros(4, 16, 16)
    cam[:, :, :8] = 1.0  # left half critical
    cam[:, 0, 8:] = 0.5  # exactly eps: critical too
    cam[:, 1:, 8:] = torch.linspace(0.0, 0.45, 8)  # graded, all below eps
    return imgs, labels, cam


@pytest.mark.parametrize("mask_on", ["grad", "step"])
@pytest.mark.parametrize("label_refine", [False, True])
def test_refine_freezes_critical_pixels_and_moves_others(mask_on: str, label_refine: bool) -> None:
    imgs, labels, cam = _refine_case()
    net = _bn_convnet()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = NRRConfig(iterations=4, batch_size=3, mask_on=mask_on, seed=1)
    out = refine(imgs, labels, net, cam, cfg, MEAN, STD, label_refine=label_refine)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (4, 3, 16, 16)
    frozen = (nrr_mask(cam, cfg.eps) == 0)[:, None].expand(-1, 3, -1, -1).numpy()
    src = imgs.numpy()
    assert np.array_equal(out[frozen], src[frozen])  # bit-identical
    free = ~frozen
    moved = out[free] != src[free]
    assert moved.mean() > 0.5, moved.mean()
    # teacher untouched
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    again = refine(imgs, labels, net, cam, cfg, MEAN, STD, label_refine=label_refine)
    assert np.array_equal(out, again)


def test_refine_zero_iterations_round_trips_and_step_mode_is_graded() -> None:
    imgs, labels, cam = _refine_case()
    net = _bn_convnet()
    same = refine(imgs, labels, net, cam, NRRConfig(iterations=0), MEAN, STD)
    assert np.array_equal(same, imgs.numpy())
    # mask_on="step": the update is scaled by M (Eq. 5), so M = 0.5 pixels move far more
    # than M = 0.01 pixels
    cam2 = torch.full((4, 16, 16), 0.49)
    cam2[:, :, 8:] = 0.0
    out = refine(imgs, labels, net, cam2, NRRConfig(iterations=4, mask_on="step"), MEAN, STD)
    diff = np.abs(out.astype(int) - imgs.numpy().astype(int))
    assert diff[..., 8:].mean() > 5 * max(diff[..., :8].mean(), 0.1)


def test_refine_computes_cam_when_not_given() -> None:
    imgs, labels, _ = _refine_case()
    net = _bn_convnet()
    cfg = NRRConfig(iterations=2)
    cam = image_cams(net, imgs, labels, 16, MEAN, STD)
    a = refine(imgs, labels, net, None, cfg, MEAN, STD)
    b = refine(imgs, labels, net, cam, cfg, MEAN, STD)
    assert np.array_equal(a, b)


def test_refine_reduces_the_objective() -> None:
    imgs, labels, _ = _refine_case()
    net = _bn_convnet()
    cam = torch.zeros(4, 16, 16)  # nothing critical: M = eps everywhere
    losses: list[float] = []
    refine(imgs, labels, net, cam, NRRConfig(iterations=15, lr=0.05), MEAN, STD,
           on_step=lambda b, i, p: losses.append(p["loss"]))
    assert len(losses) == 15 and losses[-1] < losses[0]


# ---------------------------------------------------------------------------- CIDD (Sec. 3.2)


def test_cidd_select_lowest_confidence() -> None:
    scores = np.array([0.9, 0.2, 0.5, 0.2, 0.7], dtype=np.float32)  # max-probabilities
    assert cidd_select(scores, 3, confidence="max_prob").tolist() == [1, 3, 2]
    cands = CandidateCrops(0, np.arange(5), np.tile([0, 0, 4, 4], (5, 1)), scores)
    assert cidd_select(cands, 1, confidence="max_prob").tolist() == [1]
    assert cidd_select(cands, 5, confidence="max_prob").tolist() == [1, 3, 2, 4, 0]
    # the same numbers read as true-class CEs (the default): highest CE first, ties by index
    assert cidd_select(cands, 5).tolist() == [0, 4, 2, 1, 3]
    with pytest.raises(ValueError, match="fewer than n=6"):
        cidd_select(cands, 6)
    with pytest.raises(ValueError, match="methods.nrr.confidence"):
        cidd_select(cands, 1, confidence="entropy")


def test_cam_mass_counts_cam_inside_box() -> None:
    c = torch.zeros(8, 8)
    c[2:5, 3:7] = 1.0  # 3 x 4 block
    boxes = np.array([[0, 0, 8, 8], [3, 2, 7, 5], [0, 0, 4, 4], [6, 4, 8, 8]])
    assert cam_mass(c, boxes).tolist() == [12.0, 12.0, 2.0, 1.0]
    assert cam_mass(c, boxes, "mean").tolist() == pytest.approx([12 / 64, 1.0, 2 / 16, 1 / 8])


class _Brightness(nn.Module):
    """K = 1 feature map = channel mean; flattened head ``[a m, -a m]`` on the mean ``m``.

    CAM of class 0 = brightness; confidence ``sigmoid(2 a |m|)`` is lowest for mid-grey.
    """

    def __init__(self, s: int = 16, a: float = 3.0) -> None:
        super().__init__()
        self.fc = nn.Linear(s * s, 2)
        with torch.no_grad():
            self.fc.weight[0] = a / (s * s)
            self.fc.weight[1] = -a / (s * s)
            self.fc.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).flatten(1))


def test_cidd_candidates_keep_most_cam_crop_and_score_max_prob() -> None:
    """The ablation options (crop_score sum, confidence max_prob) recomputed by hand."""
    imgs = _images(5, seed=4)
    labels = np.zeros(5, dtype=np.int64)
    ids = np.array([40, 10, 30, 20, 50])
    model = _Brightness()
    cands = cidd_candidates(model, imgs, labels, ids, num_crop=4, out_size=16, mean=MEAN, std=STD,
                            seed=7, class_index=0, top_t=2, crop_score="sum", confidence="max_prob")
    assert cands.source_id.tolist() == [10, 10, 20, 20, 30, 30, 40, 40, 50, 50]
    assert cands.boxes.dtype == np.int32 and cands.score.dtype == np.float32
    # recompute by hand
    order = np.argsort(ids)
    g = class_generator(7, 0)
    boxes = [sample_crop_boxes(16, 16, 4, g) for _ in range(5)]
    for rank, j in enumerate(order):
        x = to_model_input(imgs[j : j + 1], MEAN, STD)
        brightness = x.mean(1)[0]
        cam = (brightness - brightness.min()) / (brightness.max() - brightness.min())
        mass = [float(cam[b[1] : b[3], b[0] : b[2]].sum()) for b in boxes[rank]]
        best2 = np.argsort(-np.array(mass), kind="stable")[:2]
        assert cands.boxes[2 * rank : 2 * rank + 2].tolist() == boxes[rank][best2].tolist()
        for t in range(2):
            crop = crop_resize(imgs[j].float() / 255, boxes[rank][best2[t]], (16, 16))
            xc = (crop[None] - 0.5) / 0.5
            p = F.softmax(model(xc), 1).max().item()
            assert cands.score[2 * rank + t] == pytest.approx(p, abs=1e-6)
    # input order does not matter
    perm = np.array([3, 0, 4, 1, 2])
    again = cidd_candidates(model, imgs[torch.from_numpy(perm)], labels, ids[perm], 4, 16, MEAN, STD, 7, 0, top_t=2,
                            crop_score="sum", confidence="max_prob")
    assert np.array_equal(again.boxes, cands.boxes) and np.array_equal(again.score, cands.score)


def test_cidd_candidates_from_stored_raw_cams_equal_recomputed() -> None:
    """cidd_scores reads the cam_maps asset (raw CAMs at feature resolution): upsampling
    and normalizing them later gives the very same candidates as computing CAMs inline."""
    model = _bn_convnet(seed=3)
    imgs = _images(6, seed=9)
    labels = np.array([1] * 6)
    ids = np.array([5, 3, 9, 1, 7, 2])
    raw = raw_image_cams(model, imgs, labels, 16, MEAN, STD)
    assert raw.shape == (6, 2, 2)  # ConvNet-3 at 16 px: 16 / 2**3
    assert torch.equal(upsample_cams(raw, (16, 16)), image_cams(model, imgs, labels, 16, MEAN, STD))
    a = cidd_candidates(model, imgs, labels, ids, 4, 16, MEAN, STD, seed=1, class_index=1, top_t=2)
    b = cidd_candidates(model, imgs, labels, ids, 4, 16, MEAN, STD, seed=1, class_index=1, top_t=2, raw_cams=raw.numpy())
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.score, b.score)
    with pytest.raises(ValueError, match="raw_cams"):
        cidd_candidates(model, imgs, labels, ids, 4, 16, MEAN, STD, seed=1, class_index=1, raw_cams=raw[:3])


def staged_cidd(monkeypatch, model: nn.Module, imgs: torch.Tensor, ids: np.ndarray, ipc: int, beta: int | str,
                size: int, num_crop: int, confidence: str = "true_class_ce"):
    """The asset graph's CIDD chain without storage (class 0): ``cidd_candidates`` (the
    ``cidd_scores`` asset's table), read back by the NRR-DD piece's ``load_candidates``, then
    ``candidates.select_rows_pl`` (the plugin's ``select``: RDED's interleaved order) and
    ``composition.compose_method`` with the plugin's ``tiles`` (beta) on it.
    Returns ``(images, lineage, candidates)``."""
    from dd_assets.defs import candidates, composition
    from dd_assets.defs.methods import nrr as piece
    from dd_assets.methods.entries import entry_config

    cands = cidd_candidates(model, imgs, np.zeros(len(ids)), ids, num_crop, size, MEAN, STD, seed=0, class_index=0,
                            confidence=confidence)
    table = pd.DataFrame({"source_id": cands.source_id, "class_index": 0, "x0": cands.boxes[:, 0],
                          "y0": cands.boxes[:, 1], "x1": cands.boxes[:, 2], "y1": cands.boxes[:, 3],
                          "score": cands.score.astype(np.float32)})
    pix = {int(i): np.asarray(imgs[j]) for j, i in enumerate(ids)}
    monkeypatch.setattr(piece, "read_table_pl", lambda root, key: pl.from_pandas(table))
    monkeypatch.setattr(composition, "load_rows", lambda rows, data: [pix[int(i)] for i in rows["source_id"]])
    plugin = registry.get("nrr")
    cfg = entry_config("nrr", {"beta": beta, "confidence": confidence, "num_crop": num_crop})
    data = {"image_size": size}
    sel = candidates.select_rows_pl(plugin, cfg, ipc, None, ["c"], size, "cidd_scores")
    man = pl.DataFrame({"source_id": np.asarray(ids, np.int64), "class_name": "c", "path": [f"{i}.png" for i in ids],
                        "sha256": "", "width": size, "height": size})
    images, _, lineage = composition.compose_method(sel, man, data, plugin.tiles(cfg, ipc, size))
    return images, lineage, cands


def test_staged_cidd_composes_lowest_confidence_crops(monkeypatch) -> None:
    imgs = _images(6, seed=5)
    ids = np.arange(100, 106)
    out, lineage, cands = staged_cidd(monkeypatch, _Brightness(), imgs, ids, ipc=1, beta=4, size=16, num_crop=3,
                                      confidence="max_prob")
    assert out.shape == (1, 3, 16, 16) and out.dtype == np.uint8 and len(lineage) == 4
    lowest = np.sort(cands.score)[:4]
    assert sorted(lineage["score"]) == pytest.approx(lowest.tolist())
    # default confidence: true-class CE, the four highest CEs
    _, lineage, cands = staged_cidd(monkeypatch, _Brightness(), imgs, ids, ipc=1, beta=4, size=16, num_crop=3)
    assert sorted(lineage["score"]) == pytest.approx(np.sort(cands.score)[-4:].tolist())
    with pytest.raises(ValueError, match="perfect square"):
        beta_to_factor(3)


# ---------------------------------------------------------------------------- DBR (Eq. 6-10)


def test_dbr_stores_two_floats_per_view() -> None:
    views = sample_views(6, 3, 16, seed=0)
    lab = DBRLabels(views, np.ones((6, 3), np.float32), np.full((6, 3), 2.0, np.float32))
    assert lab.label_nbytes() == 6 * 3 * 2 * 4
    assert lab.nbytes() == views.nbytes() + 144
    back = DBRLabels.from_arrays(lab.to_arrays())
    assert back.nbytes() == lab.nbytes()
    assert np.array_equal(back.d_org, lab.d_org) and np.array_equal(back.views.partner, views.partner)
    with pytest.raises(ValueError, match="disagree"):
        DBRLabels(views, np.ones((6, 2), np.float32), np.ones((6, 3), np.float32))


def test_dbr_loss_and_objective_hand_computed() -> None:
    d_s_org, d_s_aug = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 2.0])
    d_t_org, d_t_aug = torch.tensor([0.7, 0.2]), torch.tensor([1.0, 1.5])
    # |0.3| + |0.5| = 0.8 ; |0| + |0.5| = 0.5 -> mean 0.65
    assert float(dbr_loss(d_s_org, d_s_aug, d_t_org, d_t_aug)) == pytest.approx(0.65)
    # (0.6 + 0.1) ; (0 + 1.6) -> mean 1.15
    assert float(sce_loss(d_s_org, d_s_aug, r=0.4)) == pytest.approx(1.15)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    d_o, d_a = ce_distances(logits, torch.tensor([0]), torch.tensor([1]))
    assert float(d_o) == pytest.approx(-math.log(0.5)) and float(d_a) == pytest.approx(-math.log(0.3))
    loss, parts = student_loss(logits, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5]),
                               torch.tensor([1.0]), r=0.4, alpha_dbr=2.0)
    sce = (-math.log(0.5) - 0.4) + (-math.log(0.3) - 0.4)
    dbrv = abs(-math.log(0.5) - 0.5) + abs(-math.log(0.3) - 1.0)
    assert float(loss) == pytest.approx(sce + 2.0 * dbrv, rel=1e-6)
    assert parts == pytest.approx({"sce": sce, "dbr": dbrv}, rel=1e-6)


def test_teacher_dbr_labels_match_manual_views() -> None:
    torch.manual_seed(0)
    teacher = create_model("convnet_d3", 4, image_size=16, norm="batch", width=8)
    imgs = _images(5, seed=9)
    labels = np.array([0, 1, 2, 3, 1])
    views = sample_views(5, 2, 16, seed=3)
    lab = teacher_dbr_labels(teacher, imgs, labels, views, MEAN, STD, batch_size=2)
    assert lab.d_org.shape == (5, 2) and lab.d_org.dtype == np.float32
    teacher.eval()
    for i, e in [(0, 0), (3, 1), (4, 0)]:
        x = render_views(imgs, views, e, [i], MEAN, STD)
        with torch.no_grad():
            logp = F.log_softmax(teacher(x), 1)[0]
        p = int(views.partner[i, e])
        assert lab.d_org[i, e] == pytest.approx(-float(logp[labels[i]]), abs=1e-5)
        assert lab.d_aug[i, e] == pytest.approx(-float(logp[labels[p]]), abs=1e-5)
    y_org, y_aug, d_o, d_a = lab.batch_targets(1, [3, 4], labels)
    assert y_org.tolist() == [3, 1] and y_aug.tolist() == [labels[views.partner[3, 1]], labels[views.partner[4, 1]]]
    assert d_o.tolist() == lab.d_org[[3, 4], 1].tolist() and d_a.tolist() == lab.d_aug[[3, 4], 1].tolist()
