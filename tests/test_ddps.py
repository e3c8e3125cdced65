"""DDPS core: diffusion access, R (Eq. 4-6) and its sign, DIFT hooks, clusters, quota, composition."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from dd_assets.core.compose import compose_images
from dd_assets.defs.candidates import select_rows_pl
from dd_assets.methods import registry
from dd_assets.methods.ddps.clusters import DDPSCandidates, cluster_patches
from dd_assets.methods.ddps.config import DDPSConfig
from dd_assets.methods.ddps.diffusion import NoisePredictor, add_noise, timestep_from_fraction
from dd_assets.methods.ddps.dift import UpBlockFeatures, dift_features
from dd_assets.methods.ddps.pixel_diffusion import (
    ClassConditionalUNet,
    PixelDiffusionConfig,
    drop_condition,
    load_pixel_diffusion,
    save_pixel_diffusion,
    train_class_diffusion,
)
from dd_assets.methods.ddps.representativeness import patch_scores, representativeness_maps
from dd_assets.methods.ddps.select import ddps_select, select_patches, selection_quota, tiles_per_image
from dd_assets.methods.ddps.stable_diffusion import (
    SD_COMPONENTS,
    StableDiffusionPredictor,
    load_diffusers_folder,
    missing_sd_components,
)
from dd_assets.methods.ddps.stages import cluster_candidates, score_windows, window_features
from dd_assets.methods.ddps.windows import box_means, boxes_to_cells, candidate_boxes, prepare_images
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.tables import write_table

torch.set_num_threads(1)

TINY = PixelDiffusionConfig(image_size=16, block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=8)


def tiny_unet(num_classes: int = 3, seed: int = 0) -> ClassConditionalUNet:
    torch.manual_seed(seed)
    return ClassConditionalUNet(TINY, num_classes).eval()


class OraclePredictor:
    """A noise predictor with a known answer.

    Class content = pixels whose channel 0 is > 0.5 in the clean image.  The class-``c``
    prediction is the exact noise on class content and ``-eps`` elsewhere (worse than the
    null prediction); with ``outside="null"`` it is 0 elsewhere, like the null prediction.
    The null prediction is 0 everywhere.  So ``D = -eps^2`` on class content and
    ``3 eps^2`` (or exactly 0) elsewhere.  ``encode`` records the clean batch (test double).
    """

    latent_scale = 1

    def __init__(self, cls: int = 1, outside: str = "wrong", with_unet: bool = False) -> None:
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.null_index = 7
        self.cls = cls
        self.outside = outside
        self.clean: torch.Tensor | None = None
        if with_unet:
            self.tiny = tiny_unet()
            self.unet = self.tiny.unet

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.clean = x.float().clone()
        return self.clean

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        assert self.clean is not None
        if hasattr(self, "unet"):  # DIFT pass: run the real tiny U-Net for its features
            self.tiny.predict_noise(z_t, t, torch.zeros_like(cond_idx))
        clean = self.clean.repeat(z_t.shape[0] // self.clean.shape[0], 1, 1, 1)
        ab = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        eps = (z_t - ab.sqrt() * clean) / (1 - ab).sqrt()
        mask = (clean[:, :1] > 0.5).expand_as(eps)
        other = torch.zeros_like(eps) if self.outside == "null" else -eps
        cond = torch.where(mask, eps, other)
        is_c = (cond_idx == self.cls).view(-1, 1, 1, 1)
        return torch.where(is_c, cond, torch.zeros_like(eps))


def square_image(size: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """float [3, size, size] in [-1, 1]: -1 background, channel 0 = +1 inside ``box``."""
    x = torch.full((3, size, size), -1.0)
    x0, y0, x1, y1 = box
    x[0, y0:y1, x0:x1] = 1.0
    return x


# ============================================================================ R and the sign


def test_oracle_satisfies_protocol():
    assert isinstance(OraclePredictor(), NoisePredictor)
    assert isinstance(tiny_unet(), NoisePredictor)


def test_add_noise_matches_scheduler():
    s = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    torch.testing.assert_close(add_noise(s, z, e, t), s.add_noise(z, e, t))
    assert timestep_from_fraction(0.16, s) == 160 and timestep_from_fraction(1.0, s) == 999


def test_r_map_exact_values_same_eps_and_t():
    """Outside class content both terms are identical (same t, eps) -> D exactly 0; inside
    D = -mean_draws mean_channels eps^2 with the draws replayed in the documented order
    (per image: N uniforms for t, then N noise maps)."""
    sq = [(2, 2, 6, 6), (0, 4, 3, 8)]
    x = torch.stack([square_image(8, b) for b in sq])
    pred = OraclePredictor(outside="null")
    d = representativeness_maps(pred, x, 1, n_draws=3, generator=torch.Generator().manual_seed(5))
    assert d.shape == (2, 8, 8)
    g = torch.Generator().manual_seed(5)
    for i, (x0, y0, x1, y1) in enumerate(sq):
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.all(d[i][~inside] == 0)
        torch.rand(3, generator=g, dtype=torch.float64)  # the three t draws
        eps = torch.randn(3, 3, 8, 8, generator=g)
        expected = -(eps**2).mean(dim=(0, 1))
        torch.testing.assert_close(d[i][inside], expected[inside], atol=1e-3, rtol=1e-3)


def test_r_ranks_class_patch_first_low_by_default_and_last_with_high():
    x = square_image(16, (4, 8, 12, 16))[None]  # class content = one 8x8 window of the grid
    boxes = candidate_boxes(16, 16, 8, stride=4)
    target = int(np.flatnonzero((boxes == (4, 8, 12, 16)).all(1))[0])
    d = representativeness_maps(OraclePredictor(), x, 1, n_draws=4, generator=torch.Generator().manual_seed(0))
    r = patch_scores(d, boxes, 1)[0]
    assert r[target] < -0.5 and np.all(np.delete(r, target) > r[target])
    sign = {"low": 1.0, "high": -1.0}
    assert np.argsort(sign["low"] * r, kind="stable")[0] == target  # default: most relevant first
    assert np.argsort(sign["high"] * r, kind="stable")[-1] == target  # Alg. 1 argmax: ranked last
    # an image whose class content is absent scores higher than one where it is present
    empty = torch.full((1, 3, 16, 16), -1.0)
    d0 = representativeness_maps(OraclePredictor(), empty, 1, n_draws=4, generator=torch.Generator().manual_seed(0))
    assert patch_scores(d0, boxes, 1)[0].min() > 0.5


def test_r_maps_deterministic_and_batch_invariant():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    p = OraclePredictor()
    a = representativeness_maps(p, x, 1, 3, generator=torch.Generator().manual_seed(9), batch_size=1)
    b = representativeness_maps(p, x, 1, 3, generator=torch.Generator().manual_seed(9), batch_size=4)
    c = representativeness_maps(p, x, 1, 3, generator=torch.Generator().manual_seed(10), batch_size=4)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(a, c)


def test_boxes_to_latent_cells_and_box_means():
    maps = torch.arange(16.0).view(1, 4, 4)  # latent map of an 8x8 image at latent_scale 2
    r = patch_scores(maps, np.array([[0, 0, 4, 4], [4, 4, 8, 8], [0, 0, 8, 8]]), latent_scale=2)
    np.testing.assert_allclose(r[0], [np.mean([0, 1, 4, 5]), np.mean([10, 11, 14, 15]), 7.5])
    np.testing.assert_array_equal(boxes_to_cells(np.array([[1, 1, 2, 2]]), 2.0, 4, 4), [[1, 1, 2, 2]])
    per_image = box_means(torch.stack([maps[0], -maps[0]]), np.array([[[0, 0, 1, 1]], [[3, 3, 4, 4]]]))
    np.testing.assert_allclose(per_image, [[0.0], [-15.0]])


def test_candidate_boxes_grid_and_random():
    b = candidate_boxes(20, 16, 8, stride=5)
    xs, ys = sorted(set(b[:, 0])), sorted(set(b[:, 1]))
    assert xs == [0, 5, 8] and ys == [0, 5, 10, 12]  # flush position added
    assert len(b) == 12 and np.all(b[:, 2] - b[:, 0] == 8) and np.all(b[:, 3] - b[:, 1] == 8)
    assert candidate_boxes(20, 16, None).tolist() == [[0, 0, 16, 20]]
    r1 = candidate_boxes(20, 16, 8, mode="random", num=5, seed=3)
    np.testing.assert_array_equal(r1, candidate_boxes(20, 16, 8, mode="random", num=5, seed=3))
    assert r1[:, 2].max() <= 16 and r1[:, 3].max() <= 20
    with pytest.raises(ValueError, match="patch_size"):
        candidate_boxes(20, 16, 17)


def test_prepare_images_shortest_edge():
    imgs = torch.full((2, 3, 30, 20), 255, dtype=torch.uint8)
    x, s = prepare_images(imgs, 10)
    assert x.shape == (2, 3, 15, 10) and s == 0.5 and torch.allclose(x, torch.ones_like(x))


# ============================================================================ DIFT


def test_upblock_hook_shapes_and_removal():
    m = tiny_unet()
    x = torch.randn(2, 3, 16, 16)
    t, c = torch.tensor([10, 10]), torch.tensor([0, 3])
    for idx, shape in ((0, (2, 32, 16, 16)), (1, (2, 16, 16, 16))):
        with torch.no_grad(), UpBlockFeatures(m.unet, idx) as f:
            m.predict_noise(x, t, c)
        assert tuple(f.output.shape) == shape
        assert len(m.unet.up_blocks[idx]._forward_hooks) == 0
    with pytest.raises(RuntimeError), UpBlockFeatures(m.unet, 1):
        raise RuntimeError("boom")
    assert len(m.unet.up_blocks[1]._forward_hooks) == 0
    with pytest.raises(ValueError, match="dift_up_block=2"):
        UpBlockFeatures(m.unet, 2)


def test_dift_features_pool_matches_manual_and_crop_of_full_image():
    m = tiny_unet()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    boxes = np.array([[0, 0, 8, 8], [8, 4, 16, 12], [2, 2, 10, 10]])
    f = dift_features(m, x, 1, boxes, t=160, up_block=1, mode="pool", generator=torch.Generator().manual_seed(4))
    assert f.shape == (3, 16) and f.dtype == np.float32
    g = torch.Generator().manual_seed(4)
    noise = torch.stack([torch.randn((1, 3, 16, 16), generator=g) for _ in range(3)])[:, 0]
    tt = torch.full((3,), 160)
    with torch.no_grad(), UpBlockFeatures(m.unet, 1) as hook:
        m.predict_noise(add_noise(m.scheduler, x, noise, tt), tt, torch.ones(3, dtype=torch.long))
    manual = np.stack([hook.output[j, :, b[1] : b[3], b[0] : b[2]].mean(dim=(1, 2)).numpy() for j, b in enumerate(boxes)])
    np.testing.assert_allclose(f, manual, atol=1e-5)
    full = np.tile([0, 0, 16, 16], (3, 1))
    a = dift_features(m, x, 1, full, mode="crop", generator=torch.Generator().manual_seed(2), up_block=0)
    b = dift_features(m, x, 1, None, mode="pool", generator=torch.Generator().manual_seed(2), up_block=0)
    assert a.shape == (3, 32)
    np.testing.assert_allclose(a, b, atol=1e-6)
    crops = dift_features(m, x, 1, boxes, mode="crop", generator=torch.Generator().manual_seed(2))
    assert crops.shape == (3, 16)
    with pytest.raises(ValueError, match="one size"):
        dift_features(m, x, 1, np.array([[0, 0, 8, 8], [0, 0, 4, 4], [0, 0, 8, 8]]), mode="crop")


# ============================================================================ clusters and selection


def blobs():
    """3 blobs of 5 points (centre, +-1 on each axis) at (0,0), (10,0), (0,10); R by blob."""
    offs = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], float)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    feats = np.concatenate([c + offs for c in centres])
    r = np.concatenate([np.array([-3, -2.9, -3.5, 0.0, -3.1]), np.array([1, 2, 0.5, 1.5, 3.0]),
                        np.array([-1, -1.2, 0.0, -0.8, -5.0])])
    return feats, r


def test_cluster_ranking_by_median_r_and_distance():
    feats, r = blobs()
    cl = cluster_patches(feats, r, "low", n_clusters=3, seed=0)
    blob_of = np.repeat([0, 1, 2], 5)
    for b in range(3):  # k-means recovers the blobs
        assert len(set(cl.labels[blob_of == b])) == 1
    rank_of_blob = [int(cl.cluster_rank[blob_of == b][0]) for b in range(3)]
    assert rank_of_blob == [0, 2, 1]  # medians -3, 1.5, -1 ascending
    np.testing.assert_allclose(cl.distance, np.tile([0, 1, 1, 1, 1], 3), atol=1e-9)
    np.testing.assert_allclose(sorted(cl.median_r), [-3.0, -1.0, 1.5])
    high = cluster_patches(feats, r, "high", n_clusters=3, seed=0)
    assert [int(high.cluster_rank[blob_of == b][0]) for b in range(3)] == [2, 0, 1]
    # within the best cluster the centre point comes first
    pick = select_patches(r, cl.cluster_rank, cl.distance, ipc=1, top_clusters=3, tiles=4)
    assert pick.tolist()[:3] == [0, 10, 5] and pick[3] == 14  # then the best unused R (-5.0)


def test_selection_quota_arithmetic():
    assert selection_quota(10) == (40, 4)
    assert selection_quota(1) == (4, 0)
    assert selection_quota(5) == (20, 2)
    assert selection_quota(11) == (11, 1)
    assert selection_quota(20) == (20, 2)
    assert selection_quota(50) == (50, 5)
    assert selection_quota(100) == (100, 10)
    assert selection_quota(10, tiles=1) == (10, 1)
    assert tiles_per_image(10) == 4 and tiles_per_image(11) == 1
    with pytest.raises(ValueError, match="perfect square"):
        tiles_per_image(2, tiles=3)


def constructed_table() -> DDPSCandidates:
    """30 patches; cluster ranks 0 (idx 0-4), 1 (idx 5-6), 2 (idx 7-16), 3 (idx 17-29).

    distance = reverse index order inside each cluster (the last member is nearest);
    R = index / 10 except patch 29 (R = -1, the best overall) and 20 (R = -0.5)."""
    rank = np.array([0] * 5 + [1] * 2 + [2] * 10 + [3] * 13)
    dist = np.zeros(30)
    for k in range(4):
        members = np.flatnonzero(rank == k)
        dist[members] = np.arange(len(members))[::-1]
    r = np.arange(30) / 10.0
    r[29], r[20] = -1.0, -0.5
    return DDPSCandidates(
        class_index=4, source_id=np.arange(100, 130), boxes=np.tile([0, 0, 8, 8], (30, 1)).astype(np.int32),
        score=r.astype(np.float32), r=r.astype(np.float32), cluster=rank[::-1].copy(), distance=dist,
        cluster_rank=rank,
    )


def test_select_from_table_two_ipcs_and_no_cluster_ablation():
    t = constructed_table()
    # ipc 2 (<= 10): n = 8, q = 8 // 3 = 2 -> 2 nearest of ranks 0, 1, 2, then 2 best unused by R
    assert ddps_select(t, 2, top_clusters=3).tolist() == [4, 3, 6, 5, 16, 15, 29, 20]
    # ipc 11 (> 10): n = 11, q = 3; rank 1 has only 2 -> 8 from clusters, 3 filled by R
    assert ddps_select(t, 11, top_clusters=3).tolist() == [4, 3, 2, 6, 5, 16, 15, 14, 29, 20, 0]
    # the table round-trips and a second IPC is a pure function of it
    back = DDPSCandidates.from_table(t.to_table(), class_index=4)
    for ipc in (1, 2, 11):
        np.testing.assert_array_equal(ddps_select(back, ipc, top_clusters=3), ddps_select(t, ipc, top_clusters=3))
    # "w/o Cluster" ablation: best 8 by R only
    assert ddps_select(t, 2, use_clusters=False).tolist() == [29, 20, 0, 1, 2, 3, 4, 5]
    # prefer="high" (Alg. 1 argmax) flips the fill order
    high = DDPSCandidates.from_table(t.to_table(), class_index=4, prefer="high")
    assert ddps_select(high, 1, use_clusters=False).tolist() == [28, 27, 26, 25]
    with pytest.raises(ValueError, match="fewer than the 44"):
        ddps_select(t, 11, top_clusters=3, concat_max_ipc=11)


def _distill_from_stored_table(tmp_path, t: DDPSCandidates, sources: dict, ipc: int, size: int = 8):
    """The graph's path: the cluster table stored as ``ddps_clusters`` -> the piece's
    ``load_candidates`` -> the plugin's ``select`` (``ddps_select``, contiguous grouping) ->
    one ``compose_images`` per image, as the chain's composition does."""
    root = DataRoot(str(tmp_path))
    write_table(root, layout.ddps_clusters(0), pl.DataFrame(t.to_table()))
    plugin = registry.get("ddps")
    cfg = plugin.make_config({**plugin.defaults, "top_clusters": 3, "patch_size": None})
    sel = select_rows_pl(plugin, cfg, ipc, root, ["c0"], size, "ddps_clusters")
    factor = plugin.tiles(cfg, ipc, size)
    imgs, tiles = [], []
    for _, grp in sel.sort("image_index", maintain_order=True).group_by("image_index", maintain_order=True):
        grp = grp.sort("tile", maintain_order=True)
        srcs = grp["source_id"].to_list()
        img, tl = compose_images([sources[s] for s in srcs], grp.select("x0", "y0", "x1", "y1").to_numpy(), size,
                                 factor, srcs, grp["score"].to_list())
        imgs.append(np.asarray(img))
        tiles.append(tl)
    return np.stack(imgs), tiles


def test_distill_class_composes_contiguous_2x2(tmp_path):
    t = constructed_table()
    sources = {100 + i: np.full((3, 8, 8), i, dtype=np.uint8) for i in range(30)}
    chosen = ddps_select(t, 2, top_clusters=3)
    imgs, tiles = _distill_from_stored_table(tmp_path, t, sources, ipc=2)
    assert imgs.shape == (2, 3, 8, 8) and len(tiles) == 2 and len(tiles[0]) == 4
    assert [tl.source_id for tl in tiles[0]] == [100 + i for i in chosen[:4]]
    assert imgs[0, 0, 0, 0] == chosen[0] and imgs[0, 0, 7, 7] == chosen[3]
    imgs1, tiles1 = _distill_from_stored_table(tmp_path, t, sources, ipc=12)
    assert imgs1.shape == (12, 3, 8, 8) and all(len(x) == 1 for x in tiles1)


# ============================================================================ end to end


def staged_candidates(predictor, images: torch.Tensor, source_ids: np.ndarray, class_index: int,
                      cfg: DDPSConfig) -> DDPSCandidates:
    """The graph's three IPC-independent stages (``ddps_scores`` -> ``dift_features`` ->
    ``ddps_clusters``) on one class's uint8 images, in ascending ``source_id`` order."""
    table, _ = score_windows(predictor, images, source_ids, class_index, cfg)
    arrays = window_features(predictor, images, source_ids, table, class_index, cfg)
    return cluster_candidates(arrays, class_index, cfg)[0]


def test_candidates_pick_class_patch_and_map_boxes_to_source():
    """Oracle + tiny U-Net for DIFT; sources 32 px, model 16 px: the class square's window
    (model px) is chosen per image and reported in source px."""
    places = [(4, 8), (0, 0), (8, 4), (4, 4), (8, 8), (0, 8)]
    xs = torch.stack([square_image(16, (x, y, x + 8, y + 8)) for x, y in places])
    src = ((xs + 1) * 127.5).round().to(torch.uint8).repeat_interleave(2, 2).repeat_interleave(2, 3)
    cfg = DDPSConfig(image_size=16, patch_size=8, patch_stride=4, n_draws=2, n_clusters=3, batch_size=4)
    ids = np.array([50, 10, 40, 30, 20, 60])  # visited in ascending id order
    with pytest.raises(ValueError, match="ascending source_id"):
        score_windows(OraclePredictor(), src, ids, 1, cfg)
    order = np.argsort(ids, kind="stable")
    out = staged_candidates(OraclePredictor(with_unet=True), src[torch.from_numpy(order)], ids[order], 1, cfg)
    by_id = {int(i): tuple(b) for i, b in zip(out.source_id, out.boxes, strict=True)}
    for i, (x, y) in zip(ids, places, strict=True):
        assert by_id[int(i)] == (2 * x, 2 * y, 2 * x + 16, 2 * y + 16)
    assert out.source_id.tolist() == sorted(ids.tolist())
    assert np.all(out.r < 0) and np.array_equal(out.score, out.r)
    assert out.features.shape == (6, 16) and set(out.cluster_rank.tolist()) == {0, 1, 2}


def test_candidates_deterministic_tiny_unet():
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(5, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    cfg = DDPSConfig(image_size=None, patch_size=8, patch_stride=8, n_draws=2, n_clusters=2, batch_size=3)
    m = tiny_unet()
    a = staged_candidates(m, imgs, np.arange(5), 0, cfg)
    b = staged_candidates(m, imgs, np.arange(5), 0, cfg)
    for name in ("r", "boxes", "cluster", "distance", "cluster_rank"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = staged_candidates(m, imgs, np.arange(5), 0, DDPSConfig(**{**cfg.__dict__, "batch_size": 5}))
    np.testing.assert_allclose(a.r, c.r, atol=1e-5)  # draws do not depend on the batch size
    from dd_assets.methods.ddps import plugin

    assert registry.get("ddps") is plugin.PLUGIN and plugin.PLUGIN.candidates == "ddps_clusters"


def test_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match="prefer"):
        DDPSConfig(prefer="max")
    with pytest.raises(ValueError, match="t_range"):
        DDPSConfig(t_range=(0.7, 0.1))
    with pytest.raises(ValueError, match="n_draws"):
        DDPSConfig(n_draws=0)


# ============================================================================ diffusion models


def test_drop_condition():
    g = torch.Generator().manual_seed(0)
    c = torch.arange(4).repeat(2500)
    assert torch.equal(drop_condition(c, 0.0, 9, g), c)
    assert torch.all(drop_condition(c, 1.0, 9, g) == 9)
    frac = (drop_condition(c, 0.1, 9, g) == 9).float().mean().item()
    assert 0.08 < frac < 0.12


def test_train_small_diffusion_learns_and_is_deterministic(tmp_path):
    cfg = PixelDiffusionConfig(image_size=8, block_out_channels=(16, 32), cross_attention_dim=16,
                               steps=25, batch_size=8, lr=3e-3, seed=1)
    x = torch.cat([torch.full((8, 3, 8, 8), -0.8), torch.full((8, 3, 8, 8), 0.8)])
    y = torch.tensor([0] * 8 + [1] * 8)
    seen = []
    m, losses = train_class_diffusion(x, y, 2, cfg, on_step=lambda s, v: seen.append(s))
    assert len(losses) == 25 and seen == list(range(25))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    cfg3 = PixelDiffusionConfig(**{**cfg.__dict__, "steps": 3})
    _, l1 = train_class_diffusion(x, y, 2, cfg3)
    _, l2 = train_class_diffusion([(x[:4], y[:4]), (x[8:12], y[8:12])], None, 2, cfg3)
    assert l1 == losses[:3] and len(l2) == 3
    path = tmp_path / "d.pt"
    save_pixel_diffusion(path, m, ["a", "b"])
    m2, meta = load_pixel_diffusion(path)
    assert meta["class_names"] == ["a", "b"] and m2.null_index == 2
    t, c = torch.tensor([5, 500]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(m2.predict_noise(x[:2], t, c), m.predict_noise(x[:2], t, c))
    with pytest.raises(ValueError, match="num_classes"):
        train_class_diffusion(x, y, 1, cfg3)


def test_sd_folder_validation(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    missing = missing_sd_components(tmp_path)
    assert any(m.startswith("vae (no vae/diffusion_pytorch_model") for m in missing)
    assert {m.split()[0] for m in missing} == {"vae", "unet", "text_encoder", "tokenizer"}
    with pytest.raises(ValueError) as e:
        load_diffusers_folder(tmp_path, ["cat"])
    msg = str(e.value)
    assert str(tmp_path) in msg and "unet (no unet/ folder)" in msg and "text_encoder" in msg
    assert "scheduler (" not in msg and "Stable Diffusion v1.5" in msg
    with pytest.raises(ValueError, match="does not exist"):
        load_diffusers_folder(tmp_path / "nope", ["cat"])
    full = tmp_path / "full"
    for sub, groups in SD_COMPONENTS.items():
        (full / sub).mkdir(parents=True)
        for group in groups:
            (full / sub / group[0]).write_text("{}")
    assert missing_sd_components(full) == []
    with pytest.raises(ValueError, match="prompt_template"):
        load_diffusers_folder(full, ["cat"], prompt_template="a photo")
    with pytest.raises(ValueError, match="class_names"):
        load_diffusers_folder(full, [])


def test_stable_diffusion_predictor_interface_with_tiny_components():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=8)
    emb = torch.randn(3, 5, 16)  # 2 classes + null prompt
    p = StableDiffusionPredictor(vae, unet, DDPMScheduler(num_train_timesteps=1000), emb)
    assert p.latent_scale == 2 and p.null_index == 2 and isinstance(p, NoisePredictor)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = p.encode(x)
        assert z.shape == (2, 4, 8, 8)
        assert p.predict_noise(z, torch.tensor([1, 2]), torch.tensor([0, 2])).shape == z.shape
    d = representativeness_maps(p, x, 1, n_draws=1)
    assert d.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="epsilon"):
        StableDiffusionPredictor(vae, unet, DDPMScheduler(prediction_type="v_prediction"), emb)


def test_attention_from_level_places_cross_attention_and_saves_round_trip(tmp_path):
    cfg = PixelDiffusionConfig(image_size=8, block_out_channels=(16, 32, 32), cross_attention_dim=16,
                               attention_head_dim=1, attention_from_level=1, steps=2, batch_size=4)
    m = ClassConditionalUNet(cfg, 3)
    downs = [type(b).__name__ for b in m.unet.down_blocks]
    ups = [type(b).__name__ for b in m.unet.up_blocks]
    assert downs == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert ups == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]  # mirror of the down path
    x, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    trained, _ = train_class_diffusion(x, y, 3, cfg)
    save_pixel_diffusion(tmp_path / "d.pt", trained, ["a", "b", "c"])
    back, _ = load_pixel_diffusion(tmp_path / "d.pt")
    assert back.cfg.attention_from_level == 1
    # conditioning still reaches the output: class and null predictions differ
    t = torch.tensor([300, 300])
    with torch.no_grad():
        assert not torch.allclose(back.predict_noise(x[:2], t, torch.tensor([0, 1])),
                                  back.predict_noise(x[:2], t, torch.tensor([3, 3])))
    with pytest.raises(ValueError, match="attention_from_level"):
        PixelDiffusionConfig(block_out_channels=(16, 32), attention_from_level=2)
