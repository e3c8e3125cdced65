"""UDD core: candidate regions (Sec. 2.2), response / jitter policies (Sec. 2.3-2.4, Eq. 1-4),
differentiable region upsampling, CFC (Eq. 7-8), gradient matching (Eq. 9), mUE (Eq. 11-12)
and the distillation loop (Algorithm 1)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.imaging import Normalizer
from dd_assets.core.utilization import _eval_mode, mean_utilization_entropy, utilization_entropy
from dd_assets.methods import registry
from dd_assets.methods.udd.cfc import ClassCentres, cfc_loss
from dd_assets.methods.udd.config import UDDConfig, dc_reference_config
from dd_assets.methods.udd.dc import dc_distill
from dd_assets.methods.udd.distill import udd_distill
from dd_assets.methods.udd.gradient_matching import (
    RealPool,
    fresh_network,
    gradient_distance,
    parameter_gradients,
    step_lr,
)
from dd_assets.methods.udd.match_step import _embed, _match_batched, _match_loop, _StepContext
from dd_assets.methods.udd.mining import (
    activation_response,
    gradient_response,
    jitter_images,
    jitter_utilization,
    search_underused,
    select_underused,
)
from dd_assets.methods.udd.regions import candidate_windows, crop_upsample, footprint_weights, training_batch
from dd_assets.models import create_model

torch.set_num_threads(1)


def _rand(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- regions (Sec. 2.2)


def test_windows_12() -> None:
    expected = [
        # small 4x4: TL, TR, BL, BR
        (0, 0, 4, 4), (8, 0, 12, 4), (0, 8, 4, 12), (8, 8, 12, 12),
        # medium 6x6
        (0, 0, 6, 6), (6, 0, 12, 6), (0, 6, 6, 12), (6, 6, 12, 12),
        # large 8x8
        (0, 0, 8, 8), (4, 0, 12, 8), (0, 4, 8, 12), (4, 4, 12, 12),
    ]
    w = candidate_windows(12, 12)
    assert w.dtype == np.int64 and w.shape == (12, 4)
    assert [tuple(r) for r in w.tolist()] == expected


def test_windows_36_and_rounding() -> None:
    w = candidate_windows(36, 36)
    sizes = (w[:, 2] - w[:, 0]).tolist()
    assert sizes == [12] * 4 + [18] * 4 + [24] * 4
    assert tuple(w[3]) == (24, 24, 36, 36) and tuple(w[9]) == (12, 0, 36, 24) and tuple(w[10]) == (0, 12, 24, 36)
    # 32 px: 10.67 -> 11, 16, 21.33 -> 21 (nearest); non-square 28 x 32 rounds each side
    w32 = candidate_windows(32, 32)
    assert (w32[::4, 2] - w32[::4, 0]).tolist() == [11, 16, 21]
    wr = candidate_windows(28, 32)
    assert (wr[::4, 3] - wr[::4, 1]).tolist() == [9, 14, 19]
    assert (wr[::4, 2] - wr[::4, 0]).tolist() == [11, 16, 21]
    # a subset of sizes (App. B, Table 5: N = 4 / 8)
    assert candidate_windows(12, 12, (0.5,)).tolist() == candidate_windows(12, 12)[4:8].tolist()


def test_footprint_on_coarse_grid() -> None:
    # 32 px image, 4x4 feature grid (8 px per cell): the 11 px small TL window covers cell 0
    # fully and 3/8 of cell 1; the BR one covers 3/8 of cell 2 and cell 3.
    rows, cols = footprint_weights(candidate_windows(32, 32), (32, 32), (4, 4))
    np.testing.assert_allclose(rows[0], [1.0, 0.375, 0.0, 0.0])
    np.testing.assert_allclose(cols[3], [0.0, 0.0, 0.375, 1.0])
    np.testing.assert_allclose(rows[4], [1.0, 1.0, 0.0, 0.0])  # 16 px medium = 2 cells


# ---------------------------------------------------------------------------- response policy (Sec. 2.3)


class _Linear1x1(nn.Module):
    """Linear 1x1-conv feature extractor, optionally followed by 2x2 average pooling."""

    def __init__(self, pool: int = 1) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 5, kernel_size=1)
        self.pool = pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        return F.avg_pool2d(f, self.pool) if self.pool > 1 else f


@pytest.mark.parametrize("pool", [1, 2])
def test_response_window_means_equal_per_crop_forward(pool: int) -> None:
    # Fig. 4 (b) (one pass, windows on the feature map) == Fig. 4 (a) (every crop through the
    # network) for a linear pointwise extractor; with 2x2 pooling every 12 px window is aligned.
    net = _Linear1x1(pool)
    x = _rand((2, 3, 12, 12)) * 2 - 1
    windows = candidate_windows(12, 12)
    got = activation_response(net.forward_features, x, windows)
    assert got.shape == (2, 12)
    with torch.no_grad():
        for n, (x0, y0, x1, y1) in enumerate(windows.tolist()):
            crop_resp = net.forward_features(x[:, :, y0:y1, x0:x1]).abs().mean(dim=(1, 2, 3))
            torch.testing.assert_close(got[:, n], crop_resp, rtol=1e-5, atol=1e-6)


def test_gradient_response_ranks_dead_head_region_lowest() -> None:
    # head ignores the top-left 4x4 cells, so dL/dA = 0 there: window 0 must score 0 and be picked
    torch.manual_seed(0)
    weight = torch.randn(2, 12, 12)
    weight[:, :4, :4] = 0.0

    def features(x: torch.Tensor) -> torch.Tensor:
        return x.sum(1, keepdim=True)

    def head(a: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,khw->bk", a, weight)

    x = _rand((3, 3, 12, 12))
    y = torch.tensor([0, 1, 0])
    windows = candidate_windows(12, 12)
    s = gradient_response(features, head, x, y, windows)
    assert torch.all(s[:, 0] == 0) and torch.all(s[:, 1:] > 0)
    found = search_underused(features, x, windows, 1, "response", "gradient", head, y)
    assert found.choice.tolist() == [[0], [0], [0]]


# ---------------------------------------------------------------------------- jitter policy (Sec. 2.4, Eq. 2-4)


def _dead_corner_features(x: torch.Tensor) -> torch.Tensor:
    """Response x^2 everywhere except the top-left 4x4 corner, where it is a constant 10
    (high activation, but blind to the input)."""
    f = x.pow(2).sum(1, keepdim=True)
    f = f.clone()
    f[:, :, :4, :4] = 10.0
    return f


def test_jitter_picks_region_blind_to_noise() -> None:
    x = _rand((2, 3, 12, 12))
    windows = candidate_windows(12, 12)
    sigma = jitter_utilization(_dead_corner_features, x, windows, copies=2, std=0.1,
                               generator=torch.Generator().manual_seed(0))
    assert torch.all(sigma[:, 0] == 0) and torch.all(sigma[:, 1:] > 0)
    found = search_underused(_dead_corner_features, x, windows, 1, "jitter", generator=torch.Generator().manual_seed(0))
    assert found.choice.tolist() == [[0], [0]]
    # the activation policy does NOT pick it (its activation is the highest)
    act = search_underused(_dead_corner_features, x, windows, 1, "response", "activation")
    assert act.choice[:, 0].tolist() != [0, 0]


def test_jitter_utilization_matches_eq_2_to_4_per_crop() -> None:
    x = _rand((2, 3, 12, 12), seed=1)
    windows = candidate_windows(12, 12)
    m = 3
    sigma = jitter_utilization(_dead_corner_features, x, windows, copies=m, std=0.2,
                               generator=torch.Generator().manual_seed(5))
    xj = jitter_images(x, m, "gaussian", 0.2, generator=torch.Generator().manual_seed(5))
    for n, (x0, y0, x1, y1) in enumerate(windows.tolist()):
        lam = _dead_corner_features(x)[:, 0, y0:y1, x0:x1].mean(dim=(1, 2))  # Eq. 1
        lam_hat = torch.stack([_dead_corner_features(xj[k])[:, 0, y0:y1, x0:x1].mean(dim=(1, 2)) for k in range(m)])
        torch.testing.assert_close(sigma[:, n], (lam - lam_hat.mean(0)).abs(), rtol=1e-5, atol=1e-6)


def test_jitter_kinds() -> None:
    x = torch.full((1, 3, 6, 6), 0.5)
    g = torch.Generator().manual_seed(0)
    sp = jitter_images(x, 2, "salt_pepper", prob=0.5, generator=g)
    assert sp.shape == (2, 1, 3, 6, 6)
    vals = set(sp.unique().tolist())
    assert vals <= {0.0, 0.5, 1.0} and {0.0, 1.0} <= vals
    # salt and pepper hits all channels of a pixel alike
    assert torch.equal(sp[:, :, 0], sp[:, :, 1])
    u = jitter_images(x, 4, "uniform", std=0.1, generator=g)
    assert (u - 0.5).abs().max() <= 0.1 and (u - 0.5).abs().max() > 0
    with pytest.raises(ValueError, match="jitter"):
        jitter_images(x, 1, "poisson")


def test_select_underused_lowest_with_stable_ties() -> None:
    s = torch.tensor([[3.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert select_underused(s, 2).tolist() == [[3, 1], [0, 1]]
    with pytest.raises(ValueError, match="top_p"):
        select_underused(s, 5)


# ---------------------------------------------------------------------------- upsampled regions


def test_crop_upsample_order_and_values() -> None:
    x = _rand((2, 3, 12, 12))
    windows = candidate_windows(12, 12)
    choice = torch.tensor([[3, 8], [0, 3]])
    out = crop_upsample(x, windows, choice)
    assert out.shape == (4, 3, 12, 12)
    for k, (i, n) in enumerate([(0, 3), (0, 8), (1, 0), (1, 3)]):
        x0, y0, x1, y1 = windows[n].tolist()
        ref = F.interpolate(x[i : i + 1, :, y0:y1, x0:x1], size=(12, 12), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(out[k], ref)
    batch = training_batch(x, windows, choice)
    assert batch.shape == (6, 3, 12, 12) and torch.equal(batch[:2], x)


def test_gradients_reach_pixels_through_upsampled_regions() -> None:
    x = _rand((1, 3, 12, 12)).requires_grad_(True)
    windows = candidate_windows(12, 12)
    batch = training_batch(x, windows, torch.tensor([[3]]))  # bottom-right 4x4
    batch[1:].sum().backward()  # a loss on the upsampled region only
    g = x.grad
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[8:, 8:] = True
    assert torch.all(g[:, :, ~inside] == 0)
    assert torch.all(g[:, :, inside] > 0)
    # bilinear weights of every output pixel sum to 1: total gradient = C * H * W
    assert float(g.sum()) == pytest.approx(3 * 12 * 12, rel=1e-5)


# ---------------------------------------------------------------------------- CFC (Eq. 7-8)


def test_cfc_loss_hand_computed() -> None:
    feats = torch.tensor([[2.0, 0.5], [0.0, -0.5]])  # batch mean (1, 0)
    centres = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # sims 1, 0, -1
    tau = 0.5
    got = cfc_loss(feats, 0, centres, tau)
    # -log(e^{1/tau} / (e^{0/tau} + e^{-1/tau})) = -2 + log(1 + e^-2)
    assert float(got) == pytest.approx(-2.0 + math.log(1.0 + math.exp(-2.0)), abs=1e-6)
    # InfoNCE form: positive also in the denominator
    got_pos = cfc_loss(feats, 0, centres, tau, include_positive=True)
    assert float(got_pos) == pytest.approx(-2.0 + math.log(math.exp(2.0) + 1.0 + math.exp(-2.0)), abs=1e-6)
    # class 1 as the anchor: sims to centres 1 -> 0; negatives 1 and -1
    got1 = cfc_loss(feats, 1, centres, tau)
    assert float(got1) == pytest.approx(0.0 + math.log(math.exp(2.0) + math.exp(-2.0)), abs=1e-6)
    # invalid centres are left out; none left -> 0
    valid = torch.tensor([True, False, True])
    assert float(cfc_loss(feats, 0, centres, tau, valid)) == pytest.approx(-2.0 + (-2.0), abs=1e-6)
    assert float(cfc_loss(feats, 0, centres, tau, torch.tensor([True, False, False]))) == 0.0


def test_cfc_gradient_pushes_towards_own_centre() -> None:
    feats = torch.tensor([[0.0, 1.0]], requires_grad=True)
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cfc_loss(feats, 0, centres, 0.7).backward()
    assert feats.grad[0, 0] < 0  # descending the loss increases the component along centre 0


def test_class_centres_moving_average() -> None:
    cc = ClassCentres(3, 2, alpha=0.5)
    cc.update(1, torch.tensor([2.0, 4.0]))
    assert cc.valid.tolist() == [False, True, False]
    assert cc.centres[1].tolist() == [2.0, 4.0]  # first update sets the centre
    cc.update(1, torch.tensor([0.0, 0.0]))
    assert cc.centres[1].tolist() == [1.0, 2.0]  # Eq. 8: 0.5 * old + 0.5 * new
    cc2 = ClassCentres(1, 1, alpha=0.9)
    cc2.update(0, torch.tensor([1.0]))
    cc2.update(0, torch.tensor([0.0]))
    assert float(cc2.centres[0]) == pytest.approx(0.9)


# ---------------------------------------------------------------------------- gradient matching (Eq. 9)


def test_gradient_distances_known_values() -> None:
    g_real = [torch.ones(2, 3), torch.tensor([1.0, 2.0])]
    g_syn = [torch.zeros(2, 3), torch.zeros(2)]
    assert float(gradient_distance(g_real, g_syn, "mse")) == pytest.approx(6.0 + 5.0)
    with pytest.raises(ValueError, match="params"):
        gradient_distance(g_real, g_syn, "mse", "conv")  # no tensor with ndim >= 3
    a = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([5.0])]
    b = [torch.tensor([[2.0, 0.0], [3.0, 0.0]]), torch.tensor([-5.0])]
    # rows: cos 1 -> 0, cos 0 -> 1; the 1-D tensor is ignored (DC)
    assert float(gradient_distance(a, b, "dc_cosine")) == pytest.approx(1.0, abs=1e-5)
    conv_r = [torch.ones(2, 1, 1, 1), torch.ones(3, 3)]
    conv_s = [torch.zeros(2, 1, 1, 1), torch.zeros(3, 3)]
    assert float(gradient_distance(conv_r, conv_s, "mse", "conv")) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="distance"):
        gradient_distance(a, b, "l3")


def _l_g(net: nn.Module, x_real: torch.Tensor, y_real: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor,
         distance: str) -> torch.Tensor:
    """L_g (Eq. 9) the way the matching step (match_step._match_loop) builds it."""
    g_real = parameter_gradients(net, net(x_real), y_real)
    g_syn = parameter_gradients(net, net(x_syn), y_syn, create_graph=True)
    return gradient_distance(g_real, g_syn, distance)


@pytest.mark.parametrize("distance", ["mse", "dc_cosine"])
def test_matching_step_reduces_distance(distance: str) -> None:
    torch.manual_seed(0)
    net = create_model("convnet_d3", 3, image_size=12, width=8, norm="instance")
    x_real = _rand((6, 3, 12, 12), seed=1) * 2 - 1
    y_real = torch.tensor([0, 0, 0, 0, 0, 0])
    x_syn = (_rand((2, 3, 12, 12), seed=2) * 2 - 1).requires_grad_(True)
    y_syn = torch.tensor([0, 0])
    d0 = _l_g(net, x_real, y_real, x_syn, y_syn, distance)
    (g,) = torch.autograd.grad(d0, x_syn)
    assert g.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())  # network grads untouched
    with torch.no_grad():
        x_new = x_syn - 0.05 * g / g.norm()
    d1 = _l_g(net, x_real, y_real, x_new, y_syn, distance)
    assert float(d1.detach()) < float(d0.detach())


def test_step_lr_milestones_app_a() -> None:
    lr = [step_lr(0.005, it, 2000, (0.6, 0.8, 0.9), 0.5) for it in (0, 1199, 1200, 1599, 1600, 1800, 1999)]
    assert lr == [0.005, 0.005, 0.0025, 0.0025, 0.00125, 0.000625, 0.000625]


def test_real_pool_sampling() -> None:
    pool = RealPool({0: torch.zeros(5, 3, 4, 4, dtype=torch.uint8), 1: torch.full((3, 3, 4, 4), 255, dtype=torch.uint8)})
    g = torch.Generator().manual_seed(0)
    x = pool.sample(1, 10, g)
    assert x.shape == (3, 3, 4, 4) and x.dtype == torch.float32 and float(x.min()) == 1.0
    xb, yb = pool.sample_mixed([0, 1], 8, g)
    assert xb.shape[0] == yb.shape[0] and torch.equal(xb[:, 0, 0, 0], yb.float())
    with pytest.raises(ValueError, match="class 7"):
        pool.sample(7, 1, g)
    with pytest.raises(ValueError, match="real"):
        RealPool([1, 2])  # type: ignore[arg-type]


def test_normalizer_round_trip_and_errors() -> None:
    norm = Normalizer((0.5, 0.4, 0.3), (0.2, 0.25, 0.5), 3)
    x = _rand((2, 3, 4, 4))
    torch.testing.assert_close(norm.inverse(norm(x)), x)
    with pytest.raises(ValueError, match="std"):
        Normalizer((0.5,) * 3, (0.2, 0.2), 3)


# ---------------------------------------------------------------------------- mUE (App. E, Eq. 11-12)


def test_utilization_entropy_known_values() -> None:
    maps = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    ue = utilization_entropy(maps, 2)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    np.testing.assert_allclose(ue, [1.0, h, 0.0], atol=1e-12)
    # d = 4 over [0, max]: values 0, 0.3, 0.6, 0.9 of max 0.9 -> bins 0, 1, 2, 3
    np.testing.assert_allclose(utilization_entropy(torch.tensor([[0.0, 0.3, 0.6, 0.9]]), 4), [1.0], atol=1e-12)
    # min_max shifts the range: [5, 5, 6, 6] -> evenly split in 2
    np.testing.assert_allclose(utilization_entropy(torch.tensor([[5.0, 5.0, 6.0, 6.0]]), 2, "min_max"), [1.0])
    np.testing.assert_allclose(utilization_entropy(torch.tensor([[5.0, 5.0, 6.0, 6.0]]), 2), [0.0])
    mue = mean_utilization_entropy(maps[:2], intervals=(2, 3))
    per = (utilization_entropy(maps[:2], 2) + utilization_entropy(maps[:2], 3)) / 2
    np.testing.assert_allclose(mue.per_image, per)
    assert mue.mue == pytest.approx(float(per.mean()))
    with pytest.raises(ValueError, match="value_range"):
        utilization_entropy(torch.tensor([[-1.0, 1.0]]), 2)
    with pytest.raises(ValueError, match="intervals"):
        utilization_entropy(maps, 1)


# ---------------------------------------------------------------------------- the loop (Algorithm 1)


def _tiny_problem(num_classes: int = 3, ipc: int = 2) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    real = {c: torch.randint(0, 256, (12, 3, 12, 12), generator=g, dtype=torch.uint8) for c in range(num_classes)}
    syn = torch.cat([real[c][:ipc] for c in range(num_classes)])
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    return real, syn, labels


def _tiny_model() -> nn.Module:
    return create_model("convnet_d3", 3, image_size=12, width=8, norm="instance")


def _tiny_cfg(**kw: object) -> UDDConfig:
    base = dict(iterations=2, inner_steps=2, batch_real=6, net_batch_size=6, top_p=3, mue_intervals=(2, 3))
    base.update(kw)
    return UDDConfig(**base)  # type: ignore[arg-type]


def test_registered() -> None:
    """A synthesize plugin (no selection) with a Dagster piece of its own."""
    import importlib.util

    plugin = registry.get("udd")
    assert plugin.name == "udd" and plugin.kind == "synthesize" and plugin.select is None
    assert importlib.util.find_spec("dd_assets.defs.methods.udd") is not None


@pytest.mark.parametrize("policy", ["jitter", "response"])
def test_distill_deterministic_and_seed_sensitive(policy: str) -> None:
    real, syn, labels = _tiny_problem()
    cfg = _tiny_cfg(policy=policy)
    rng_before = torch.get_rng_state()
    a = udd_distill(real, syn, labels, cfg, model_fn=_tiny_model, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    b = udd_distill(real, syn, labels, cfg, model_fn=_tiny_model, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(a.images, b.images)
    assert a.loss_curve == [dict(r, seconds=a.loss_curve[i]["seconds"]) for i, r in enumerate(b.loss_curve)]
    c = udd_distill(real, syn, labels, dataclasses.replace(cfg, seed=1), model_fn=_tiny_model,
                    mean=(0.5,) * 3, std=(0.25,) * 3)
    assert not torch.equal(a.images, c.images)
    # shapes, order, bookkeeping
    assert a.images.shape == syn.shape and a.images.dtype == torch.float32
    assert float(a.images.min()) >= 0.0 and float(a.images.max()) <= 1.0
    assert not torch.equal(a.images, syn.float() / 255)  # pixels moved
    assert torch.equal(a.labels, labels)
    assert len(a.loss_curve) == 2 and a.loss_curve[1]["lr"] == pytest.approx(0.0025)  # milestone round(0.6 * 2) = 1
    assert int(a.region_counts.sum()) == 2 * 2 * 6 * 3  # iterations * steps * images * P
    assert a.utilization_per_image.shape == (6,) and np.isfinite(a.utilization)
    assert a.images_uint8().dtype == np.uint8


def test_dc_is_udd_without_regions_and_cfc() -> None:
    real, syn, labels = _tiny_problem(num_classes=2, ipc=1)
    cfg = _tiny_cfg()
    dc = dc_distill(real, syn, labels, cfg, model_fn=_tiny_model)
    plain = udd_distill(real, syn, labels, dataclasses.replace(cfg, policy="none", cfc=False), model_fn=_tiny_model)
    assert torch.equal(dc.images, plain.images)
    assert int(dc.region_counts.sum()) == 0 and all(r["loss_c"] == 0 for r in dc.loss_curve)
    full = udd_distill(real, syn, labels, cfg, model_fn=_tiny_model)
    assert not torch.equal(full.images, dc.images)
    assert any(r["loss_c"] != 0 for r in full.loss_curve)


def test_dc_reference_config_and_synthetic_net_training() -> None:
    cfg = dc_reference_config(10)
    assert (cfg.iterations, cfg.inner_steps, cfg.net_steps, cfg.lr_img) == (1000, 10, 50, 0.1)
    assert cfg.distance == "dc_cosine" and cfg.net_train_on == "synthetic" and cfg.policy == "none"
    with pytest.raises(ValueError, match="ipc"):
        dc_reference_config(7)
    real, syn, labels = _tiny_problem(num_classes=2, ipc=1)
    small = dc_reference_config(1, iterations=1, inner_steps=2, net_steps=1, batch_real=4)
    out = udd_distill(real, syn, labels, small, model_fn=_tiny_model, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert out.images.shape == syn.shape and out.loss_curve[0]["net_loss"] > 0


def test_distill_validation_errors() -> None:
    real, syn, labels = _tiny_problem(num_classes=2, ipc=1)
    with pytest.raises(ValueError, match="top_p"):
        udd_distill(real, syn, labels, _tiny_cfg(top_p=13), model_fn=_tiny_model)
    with pytest.raises(ValueError, match="policy"):
        udd_distill(real, syn, labels, _tiny_cfg(policy="voting"), model_fn=_tiny_model)
    with pytest.raises(ValueError, match="labels"):
        udd_distill(real, syn, labels[:1], _tiny_cfg(), model_fn=_tiny_model)
    with pytest.raises(ValueError, match="classes"):
        udd_distill({0: real[0]}, syn, labels, _tiny_cfg(), model_fn=_tiny_model)
    with pytest.raises(ValueError, match="forward_features"):
        udd_distill(real, syn, labels, _tiny_cfg(), model_fn=lambda: nn.Sequential(nn.Flatten(), nn.Linear(432, 2)))


def test_loop_descends_matching_loss_with_frozen_network() -> None:
    # net_lr = 0 freezes the proxy within the outer iteration and batch_real = pool size makes
    # every real batch the whole class, so L_g of step t is a deterministic function of the
    # pixels: the mean over 4 steps must sit below the initial value.
    real, syn, labels = _tiny_problem(num_classes=2, ipc=1)

    def mean_lg(steps: int) -> float:
        cfg = _tiny_cfg(iterations=1, inner_steps=steps, policy="none", cfc=False, net_lr=0.0, batch_real=12)
        out = udd_distill(real, syn, labels, cfg, model_fn=_tiny_model, mean=(0.5,) * 3, std=(0.25,) * 3)
        return out.loss_curve[0]["loss_g"]

    first, avg4 = mean_lg(1), mean_lg(4)
    assert avg4 < 0.9 * first


# ---------------------------------------------------------------------------- lr milestones (App. A)


def test_step_lr_milestones_round_halves_up() -> None:
    # 0.5 * 5 = 2.5: Python's round() gives 2 (banker's), the schedule's milestone is 3
    assert [step_lr(1.0, it, 5, (0.5,), 0.5) for it in (1, 2, 3, 4)] == [1.0, 1.0, 0.5, 0.5]
    # 0.9 * 5 = 4.5 -> 5 (round() gives 4): with 5 iterations the third halving never comes
    assert [step_lr(1.0, it, 5, (0.6, 0.8, 0.9), 0.5) for it in range(5)] == [1.0, 1.0, 1.0, 0.5, 0.25]
    # 0.5 * 7 = 3.5 -> 4 (round() agrees here: 4 is even)
    assert [step_lr(1.0, it, 7, (0.5,), 0.5) for it in (3, 4)] == [1.0, 0.5]


# ---------------------------------------------------------------------------- one matching step, both paths


S24 = 24  # ConvNet-3 feature grid 3x3: the 12 windows get distinct scores (at 12 px the grid is 1x1, all tie)


def _model24() -> nn.Module:
    return create_model("convnet_d3", 3, image_size=S24, width=8, norm="instance")


def _problem24(num_classes: int = 3, ipc: int = 2) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    real = {c: torch.randint(0, 256, (12, 3, S24, S24), generator=g, dtype=torch.uint8) for c in range(num_classes)}
    return real, torch.cat([real[c][:ipc] for c in range(num_classes)]), torch.arange(num_classes).repeat_interleave(ipc)


def _step_setup(cfg: UDDConfig, sizes: tuple[int, ...] = (2, 2, 2), seed: int = 0):
    """A fresh proxy, pixels, centres and generator for one matching step (as udd_distill builds them)."""
    real, _, _ = _problem24(num_classes=len(sizes))
    g0 = torch.Generator().manual_seed(7)
    pix = {c: torch.rand((n, 3, S24, S24), generator=g0) for c, n in enumerate(sizes)}
    model = fresh_network(_model24, seed)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, 3)
    centres = None
    if cfg.cfc:
        with torch.no_grad():
            embs = {c: _embed(model, model.forward_features(norm(x))).mean(0) for c, x in pix.items()}
        centres = ClassCentres(len(sizes), next(iter(embs.values())).numel(), cfg.alpha)
        for c, e in embs.items():
            centres.update(c, e)
    windows = candidate_windows(S24, S24)
    ctx = _StepContext(cfg, model, norm, windows, RealPool(real), torch.Generator().manual_seed(seed),
                           torch.device("cpu"), centres, np.zeros(len(windows), dtype=np.int64))
    leaves = {c: x.clone().requires_grad_(True) for c, x in pix.items()}
    return ctx, leaves


def _run_step(cfg: UDDConfig, batched: bool, sizes: tuple[int, ...] = (2, 2, 2), model_hook=None):
    ctx, leaves = _step_setup(cfg, sizes)
    if model_hook is not None:
        model_hook(ctx.model)
    fn = _match_batched if batched else _match_loop
    losses = fn(ctx, {c: x for c, x in leaves.items()}, leaves)
    return losses, {c: x.grad for c, x in leaves.items()}, ctx


@pytest.mark.parametrize(
    "overrides, sizes",
    [
        (dict(policy="jitter", cfc=True), (2, 2, 2)),
        (dict(policy="jitter", cfc=True, batch_syn_max=5, match_params="conv"), (2, 1, 3)),  # subsets, unequal IPC
        (dict(policy="response", response="gradient", cfc=False, distance="dc_cosine"), (2, 2, 2)),
        (dict(policy="none", cfc=True, batch_real=5), (1, 2, 1)),
    ],
)
def test_vectorized_step_equals_per_class_loop(overrides: dict, sizes: tuple[int, ...]) -> None:
    # the batched step (one forward for all classes, per-class gradients by LayerTape) must give
    # the reference loop's per-class L_syn, L_g, L_c, mined windows and pixel gradients
    cfg = _tiny_cfg(**overrides)
    ref, g_ref, ctx_ref = _run_step(cfg, batched=False, sizes=sizes)
    got, g_got, ctx_got = _run_step(cfg, batched=True, sizes=sizes)
    assert list(got) == list(ref)
    for c in ref:
        np.testing.assert_allclose(got[c], ref[c], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got[c], g_ref[c], rtol=1e-3, atol=1e-4 * float(g_ref[c].abs().max()))
        assert float(g_ref[c].abs().sum()) > 0
    np.testing.assert_array_equal(ctx_got.region_counts, ctx_ref.region_counts)
    if ctx_ref.centres is not None:
        torch.testing.assert_close(ctx_got.centres.centres, ctx_ref.centres.centres)
    # the generator consumed the same draws
    assert torch.equal(ctx_got.g.get_state(), ctx_ref.g.get_state())


def test_vectorized_distill_equals_loop_and_batch_norm_falls_back() -> None:
    real, syn, labels = _problem24()
    cfg = _tiny_cfg(policy="jitter", cfc=True)
    kw = dict(model_fn=_model24, mean=(0.5,) * 3, std=(0.25,) * 3)
    a = udd_distill(real, syn, labels, cfg, vectorized=False, **kw)
    b = udd_distill(real, syn, labels, cfg, vectorized=True, **kw)
    c = udd_distill(real, syn, labels, cfg, vectorized=True, class_chunk=2, **kw)
    torch.testing.assert_close(b.images, a.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(c.images, a.images, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(b.region_counts, a.region_counts)
    for ra, rb in zip(a.loss_curve, b.loss_curve):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    from dd_assets.methods.udd.class_gradients import LayerTape, batched_support

    bn = create_model("convnet_d3", 3, image_size=12, width=8, norm="batch")
    assert "couples" in batched_support(bn)
    with pytest.raises(ValueError, match="not exact"):
        LayerTape(bn)
    assert batched_support(_model24()) is None


# ---------------------------------------------------------------------------- mining reaches the matched batch


def _record_syn_batches(model: nn.Module, store: list[torch.Tensor]) -> None:
    """Record every training-mode, grad-carrying forward (the synthetic side of Eq. 9)."""

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if mod.training and inputs[0].requires_grad:
            store.append(inputs[0].detach().clone())

    model.features.register_forward_pre_hook(hook)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("policy", ["jitter", "response"])
def test_matched_batch_holds_originals_and_upsampled_mined_regions(batched: bool, policy: str) -> None:
    # S_c^train = S_c + upsample(R*) (Fig. 2): the synthetic side of Eq. 9 must see IPC * (1 + P)
    # images per class, the originals first, then for each image its P lowest-scoring windows
    # (recomputed here from the policy's scores) cropped and upsampled.  A loop that mines but
    # matches only S_c sees IPC images and fails.
    ipc, p = 2, 3
    cfg = _tiny_cfg(policy=policy, cfc=False, top_p=p, batch_syn_max=None)
    seen: list[torch.Tensor] = []
    ctx, leaves = _step_setup(cfg)
    _record_syn_batches(ctx.model, seen)
    g_copy = torch.Generator().set_state(ctx.g.get_state())
    fn = _match_batched if batched else _match_loop
    fn(ctx, dict(leaves), leaves)
    matched = torch.cat(seen)
    assert matched.shape[0] == 3 * ipc * (1 + p)
    windows = ctx.windows
    for c, x in leaves.items():
        block = ctx.norm.inverse(matched[c * ipc * (1 + p) : (c + 1) * ipc * (1 + p)])
        torch.testing.assert_close(block[:ipc], x.detach(), rtol=0, atol=1e-6)
        with torch.no_grad(), _eval_mode(ctx.model):
            if policy == "jitter":
                xj = jitter_images(x.detach(), cfg.jitter_copies, cfg.jitter, cfg.jitter_std, generator=g_copy)
                scores = jitter_utilization(ctx.features, x.detach(), windows, jittered=xj)
            else:
                scores = activation_response(ctx.features, x.detach(), windows)
        ctx.pool.sample(c, cfg.batch_real, g_copy)  # the loop's real draw follows the noise
        choice = select_underused(scores, p)
        expected = crop_upsample(x.detach(), windows, choice)
        torch.testing.assert_close(block[ipc:], expected, rtol=0, atol=1e-5)
        # the regions are genuine crops: not copies of the originals
        assert not torch.allclose(block[ipc:ipc + 1], x.detach()[:1])
    assert int(ctx.region_counts.sum()) == 3 * ipc * p


# ---------------------------------------------------------------------------- CFC reaches the pixels


@pytest.mark.parametrize("batched", [False, True])
def test_cfc_gradient_reaches_the_pixels(batched: bool) -> None:
    # L_syn = L_g + w L_c (Eq. 10) with the same draws: the pixel gradient of the CFC term alone
    # is grad(w=1) - grad(cfc off); it must be nonzero, exactly half of grad(w=2) - grad(cfc off),
    # and zero with cfc off (cfc_weight = 0 changes nothing).
    off = _run_step(_tiny_cfg(cfc=False), batched)[1]
    w0 = _run_step(_tiny_cfg(cfc=True, cfc_weight=0.0), batched)[1]
    l1, w1, _ = _run_step(_tiny_cfg(cfc=True, cfc_weight=1.0), batched)
    w2 = _run_step(_tiny_cfg(cfc=True, cfc_weight=2.0), batched)[1]
    for c in off:
        torch.testing.assert_close(w0[c], off[c], rtol=0, atol=1e-9)
        d1, d2 = w1[c] - off[c], w2[c] - off[c]
        assert float(d1.abs().max()) > 1e-4 * float(off[c].abs().max())
        assert float((d2 - 2 * d1).norm()) <= 1e-3 * float(d1.norm())  # linear in w: the CFC term's own gradient
        assert l1[c][2] != 0.0  # L_c itself
