"""DDPS in the Dagster graph: the three IPC-independent stages reproduce the direct composition
of the Stage I/II functions, a second IPC reads the stored cluster table only, bad diffusion weights fail naming what is
missing."""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from dd_assets.config import load_params
from dd_assets.definitions import build_definitions
from dd_assets.defs.methods.ddps import ddps_config
from dd_assets.methods import registry
from dd_assets.methods.ddps.clusters import DDPSCandidates, cluster_patches
from dd_assets.methods.ddps.config import DDPSConfig
from dd_assets.methods.ddps.diffusion import timestep_from_fraction
from dd_assets.methods.ddps.dift import dift_features
from dd_assets.methods.ddps.pixel_diffusion import ClassConditionalUNet, PixelDiffusionConfig
from dd_assets.methods.ddps.representativeness import patch_scores, representativeness_maps
from dd_assets.methods.ddps.select import ddps_select
from dd_assets.methods.ddps.stages import cluster_candidates, score_windows, window_features
from dd_assets.methods.ddps.windows import candidate_boxes, prepare_images
from dd_assets.methods.entries import tiles_per_side
from dd_assets import local_backfill
from dd_assets.orchestrate import RunFailures
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group
from dd_assets.storage.tables import read_table
from tests.conftest import write_params

torch.set_num_threads(1)

TINY = PixelDiffusionConfig(image_size=16, block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=1)


def _stream(seed: int, class_index: int, stream: int) -> torch.Generator:
    """Generator stream ``stream`` of ``(seed, class_index)``: 0 for R, 1 for DIFT."""
    state = np.random.SeedSequence([seed, class_index, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _direct(model, images: torch.Tensor, ids: np.ndarray, cls: int, cfg: DDPSConfig) -> dict[str, np.ndarray]:
    """Stages I and II written out in one pass over the batches (Alg. 1 lines 6-17): R maps
    (stream 0) -> R of every window -> each image's best windows under ``prefer`` (ties to
    the earlier window) -> their DIFT features (stream 1) -> k-means on all of them."""
    sign = 1.0 if cfg.prefer == "low" else -1.0
    g_r, g_dift = _stream(cfg.seed, cls, 0), _stream(cfg.seed, cls, 1)
    t = timestep_from_fraction(cfg.dift_t, model.scheduler)
    k = cfg.patches_per_image
    boxes_out, r_out, feat_out = [], [], []
    for start in range(0, len(ids), cfg.batch_size):
        x, scale = prepare_images(images[start : start + cfg.batch_size], cfg.image_size)
        boxes = candidate_boxes(x.shape[-2], x.shape[-1], cfg.patch_size, cfg.patch_stride)
        maps = representativeness_maps(model, x, cls, cfg.n_draws, cfg.t_range, g_r, cfg.batch_size)
        r = patch_scores(maps, boxes, model.latent_scale)
        best = np.argsort(sign * r, axis=1, kind="stable")[:, :k]
        chosen = boxes[best].reshape(-1, 4)
        r_out.append(np.take_along_axis(r, best, axis=1).reshape(-1))
        feat_out.append(dift_features(model, x.repeat_interleave(k, dim=0), cls, chosen, t, cfg.dift_up_block,
                                      cfg.dift_ensemble, cfg.dift_input, g_dift, cfg.batch_size))
        src = np.rint(chosen / scale).astype(np.int64)
        src[:, [0, 2]] = np.clip(src[:, [0, 2]], 0, images.shape[-1])
        src[:, [1, 3]] = np.clip(src[:, [1, 3]], 0, images.shape[-2])
        boxes_out.append(src)
    r, feats = np.concatenate(r_out), np.concatenate(feat_out)
    cl = cluster_patches(feats, r, cfg.prefer, cfg.n_clusters, cfg.seed, cfg.kmeans_n_init)
    return {"source_id": np.repeat(ids, k), "boxes": np.concatenate(boxes_out).astype(np.int32),
            "score": (sign * r).astype(np.float32), "r": r.astype(np.float32), "cluster": cl.labels,
            "distance": cl.distance, "cluster_rank": cl.cluster_rank, "features": feats}


@pytest.mark.parametrize("prefer,patch_size", [("low", 8), ("high", 8), ("low", None)])
def test_three_stages_reproduce_the_direct_composition(prefer, patch_size):
    """ddps_scores -> dift_features -> ddps_clusters (three calls, R round-tripped through a
    table) give exactly the table of Stages I and II computed in one pass (same batch size:
    the draws do not depend on it, but batched float arithmetic may differ in the last bits)."""
    torch.manual_seed(0)
    model = ClassConditionalUNet(TINY, 3).eval()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (7, 3, 16, 16), dtype=np.uint8))
    ids = np.array([3, 5, 8, 13, 21, 34, 55], np.int64)
    cfg = DDPSConfig(image_size=None, patch_size=patch_size, patch_stride=4, patches_per_image=2 if patch_size else 1,
                     n_draws=2, prefer=prefer, n_clusters=3, kmeans_n_init=2, batch_size=4)
    ref = _direct(model, images, ids, 1, cfg)

    table, _ = score_windows(model, images, ids, 1, cfg)
    table = pl.DataFrame(table)  # as the features level reads it back from Parquet (Polars)
    arrays = window_features(model, images, ids, table, 1, cfg)
    got, _ = cluster_candidates(arrays, 1, cfg)
    for name in ("source_id", "boxes", "score", "r", "cluster", "distance", "cluster_rank", "features"):
        np.testing.assert_array_equal(getattr(got, name), ref[name], err_msg=name)


def test_low_resolution_data_score_the_whole_image():
    """Sec. 4.2: whole-image R below the patch size; only SD (a latent model) resizes to 256,
    the pixel model works at the resolution it was trained at."""
    mp = dict(registry.get("ddps").defaults)
    for size, latent, expected in [(28, False, (None, None)), (28, True, (256, None)),
                                   (256, True, (256, 224)), (256, False, (None, 224))]:
        cfg = ddps_config(mp, size, latent=latent)
        assert (cfg.image_size, cfg.patch_size) == expected, (size, latent)
    explicit = ddps_config({**mp, "patch_size": 20}, 28)
    assert (explicit.image_size, explicit.patch_size) == (None, 20)


def test_bad_ddps_value_is_refused_at_load_naming_the_parameter(tmp_path):
    # a value outside the plugin's choices: params.yaml itself is refused (dd_assets.params_schema)
    with pytest.raises(ValueError, match=r"methods\.ddps\.prefer.*middle"):
        load_params(write_params(tmp_path, "tiny", {"methods.ddps.prefer": "middle"}))
    # one only the stage config refuses: the DDPS piece, when the definitions are built
    params = load_params(write_params(tmp_path, "tiny", {"methods.ddps.t_range": [0.7, 0.1]}))
    with pytest.raises(ValueError, match=r"methods\.ddps: t_range"):
        build_definitions(params)


def _count(home, name: str, partition: str | None = None) -> int:
    flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[partition] if partition else None)
    return len(local_backfill.local_instance(home).fetch_materializations(flt, limit=1000).records)


def _run(home, names, partitions=None):
    """Materialize ``names`` as one backfill carried out here (what ``dd-assets materialize`` does);
    raises RunFailures when a run failed."""
    defs = build_definitions(load_params(), executor="in_process")
    out = local_backfill.materialize(defs, [dg.AssetKey(n) for n in names], home, partitions)
    assert out.runs and all(r.is_success for r in out.runs)


INDEPENDENT = ["diffusion_model", "ddps_scores", "dift_features", "ddps_clusters"]


@pytest.mark.slow
def test_second_ipc_reads_the_stored_clusters_only(tiny_env):
    home = tiny_env / "run_home"
    _run(home, ["raw_images", "manifest", *INDEPENDENT, "ddps_selection"], {"ddps_selection": ["1"]})
    before = {n: _count(home, n) for n in INDEPENDENT}
    assert before == {"diffusion_model": 1, "ddps_scores": 10, "dift_features": 10, "ddps_clusters": 10}

    _run(home, ["ddps_selection"], {"ddps_selection": ["2"]})
    assert {n: _count(home, n) for n in INDEPENDENT} == before  # nothing IPC-independent ran again
    assert _count(home, "ddps_selection", "1") == _count(home, "ddps_selection", "2") == 1

    root = DataRoot(load_params().data_root)
    mp = {**registry.get("ddps").defaults, **load_params().block("methods")["ddps"]}
    for ipc, per in ((1, 1), (2, 2)):  # 28 px < patch_size: RDED's low-res setting, one whole image each
        sel = read_table(root, layout.selection("ddps", ipc))
        assert len(sel) == 10 * per and set(sel["tile"]) == {0} and set(sel["image_index"]) == set(range(ipc))
        for c in range(10):
            table = read_table(root, layout.ddps_clusters(c))
            cands = DDPSCandidates.from_table(table, c, prefer=mp["prefer"])
            chosen = ddps_select(cands, ipc, mp["top_clusters"], mp["cluster"], mp["concat_max_ipc"], mp["low_res_tiles"])
            mine = sel[sel["class_index"] == c].sort_values(["image_index", "tile"])
            assert mine["source_id"].tolist() == cands.source_id[chosen].tolist()
            assert mine[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == cands.boxes[chosen].tolist()
    # what the stages stored: R per window, DIFT per kept patch, ranked clusters
    scores = read_table(root, layout.ddps_scores(0))
    feats, attrs = read_group(root, layout.dift(0))
    clusters = read_table(root, layout.ddps_clusters(0))
    man = read_table(root, layout.manifest(0))
    assert sorted(scores["source_id"]) == sorted(man.loc[man["split"] == "train", "source_id"])  # mipc >= class size
    assert feats["features"].shape[0] == len(clusters) == len(scores)  # one window per image at 28 px
    assert attrs["prefer"] == "low" and clusters["cluster_rank"].min() == 0
    assert root.read_bytes(layout.cluster_grid("ddps_clusters", 0))[:4] == b"\x89PNG"


def test_incomplete_sd_folder_fails_naming_the_missing_component(tiny_env, monkeypatch, tmp_path):
    sd = tmp_path / "sd15"
    files = {"vae": ["config.json", "diffusion_pytorch_model.safetensors"], "unet": ["config.json"],
             "text_encoder": ["config.json", "model.safetensors"], "tokenizer": ["vocab.json", "merges.txt"],
             "scheduler": ["scheduler_config.json"]}
    for sub, names in files.items():
        (sd / sub).mkdir(parents=True)
        for n in names:
            (sd / sub / n).write_text("{}")
    monkeypatch.setenv("DD_ASSETS_PARAMS", str(write_params(tmp_path, "tiny", {"diffusion.weights": str(sd)},
                                                             raw_root=tmp_path / "raw")))
    defs = build_definitions(load_params(), executor="in_process")
    with pytest.raises(RunFailures, match=r"incomplete: missing unet \(no unet/diffusion_pytorch_model"):
        local_backfill.materialize(defs, [dg.AssetKey("diffusion_model")], tmp_path / "home")


def test_ddps_tiles_follow_the_resolution_setting():
    from dd_assets.methods.ddps.plugin import DDPSParams, tiles_per_patch_image

    mp = dict(registry.get("ddps").defaults)
    assert (mp["tiles"], mp["low_res_tiles"], mp["patch_size"]) == (4, 1, 224)
    per = [tiles_per_patch_image(DDPSParams(), size) for size in (32, 224, 256)]
    assert per == [1, 4, 4]  # Sec. 4.2 vs Sec. 3.4
    assert tiles_per_side("ddps", mp, 10, 32) == 1 and tiles_per_side("ddps", mp, 10, 256) == 2
    assert tiles_per_side("ddps", mp, 11, 256) == 1  # single patches above concat_max_ipc
    assert tiles_per_side("ddps", {**mp, "low_res_tiles": 4}, 10, 32) == 2  # the 2x2 ablation at 32 px
    with pytest.raises(ValueError, match="image size"):
        tiles_per_side("ddps", mp, 10)
