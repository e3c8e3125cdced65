"""DDPS in the Dagster graph: the three IPC-independent stages reproduce ``ddps_candidates``,
a second IPC reads the stored cluster table only, bad diffusion weights fail naming what is
missing."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from dd_assets.config import load_params
from dd_assets.definitions import build_definitions
from dd_assets.defs.ddps_assets import ddps_config
from dd_assets.methods.ddps_stages import cluster_candidates, score_windows, window_features
from dd_assets.methods.ddps import DDPSCandidates, DDPSConfig, ddps_candidates, ddps_select
from dd_assets.methods.diffusion import ClassConditionalUNet, PixelDiffusionConfig
from dd_assets.methods_catalog import METHODS
from dd_assets.orchestrate import RunFailures, execute, plan
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group
from dd_assets.storage.tables import read_table
from tests.conftest import write_params

torch.set_num_threads(1)

TINY = PixelDiffusionConfig(image_size=16, block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=1)


@pytest.mark.parametrize("prefer,patch_size", [("low", 8), ("high", 8), ("low", None)])
def test_three_stages_reproduce_ddps_candidates(prefer, patch_size):
    """ddps_scores -> dift_features -> ddps_clusters (three calls, R round-tripped through a
    table) give exactly the table of the one-shot ``ddps_candidates`` (same batch size: the
    draws do not depend on it, but batched float arithmetic may differ in the last bits)."""
    torch.manual_seed(0)
    model = ClassConditionalUNet(TINY, 3).eval()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (7, 3, 16, 16), dtype=np.uint8))
    ids = np.array([3, 5, 8, 13, 21, 34, 55], np.int64)
    cfg = DDPSConfig(image_size=None, patch_size=patch_size, patch_stride=4, patches_per_image=2 if patch_size else 1,
                     n_draws=2, prefer=prefer, n_clusters=3, kmeans_n_init=2, batch_size=4)
    ref = ddps_candidates(model, images, np.full(7, 1), ids, 1, cfg)

    table, _ = score_windows(model, images, ids, 1, cfg)
    table = pd.DataFrame({k: v.to_numpy() for k, v in table.items()})  # as read back from Parquet
    arrays = window_features(model, images, ids, table, 1, cfg)
    got, _ = cluster_candidates(arrays, 1, cfg)
    for name in ("source_id", "boxes", "score", "r", "cluster", "distance", "cluster_rank", "features"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)


def test_low_resolution_data_score_the_whole_image():
    """Sec. 4.2: whole-image R below the patch size; only SD (a latent model) resizes to 256,
    the pixel model works at the resolution it was trained at."""
    mp = dict(METHODS["ddps"].defaults)
    for size, latent, expected in [(28, False, (None, None)), (28, True, (256, None)),
                                   (256, True, (256, 224)), (256, False, (None, 224))]:
        cfg = ddps_config(mp, size, latent=latent)
        assert (cfg.image_size, cfg.patch_size) == expected, (size, latent)
    explicit = ddps_config({**mp, "patch_size": 20}, 28)
    assert (explicit.image_size, explicit.patch_size) == (None, 20)


def test_bad_ddps_value_is_refused_at_load_naming_the_parameter(tmp_path):
    params = load_params(write_params(tmp_path, "tiny", {"methods.ddps.prefer": "middle"}))
    with pytest.raises(ValueError, match=r"methods\.ddps: prefer must be 'low'"):
        build_definitions(params)


def _count(instance, name: str, partition: str | None = None) -> int:
    flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[partition] if partition else None)
    return len(instance.fetch_materializations(flt, limit=1000).records)


def _run(instance, names, partitions=None):
    defs = build_definitions(load_params(), executor="in_process")
    results = execute(defs, plan(defs, [dg.AssetKey(n) for n in names], partitions), instance)
    assert all(r.success for r in results)


INDEPENDENT = ["diffusion_model", "ddps_scores", "dift_features", "ddps_clusters"]


@pytest.mark.slow
def test_second_ipc_reads_the_stored_clusters_only(tiny_env):
    instance = dg.DagsterInstance.ephemeral()
    _run(instance, ["raw_images", "manifest", *INDEPENDENT, "ddps_selection"], {"ddps_selection": ["1"]})
    before = {n: _count(instance, n) for n in INDEPENDENT}
    assert before == {"diffusion_model": 1, "ddps_scores": 10, "dift_features": 10, "ddps_clusters": 10}

    _run(instance, ["ddps_selection"], {"ddps_selection": ["2"]})
    assert {n: _count(instance, n) for n in INDEPENDENT} == before  # nothing IPC-independent ran again
    assert _count(instance, "ddps_selection", "1") == _count(instance, "ddps_selection", "2") == 1

    root = DataRoot(load_params().data_root)
    mp = {**METHODS["ddps"].defaults, **load_params().block("methods")["ddps"]}
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
        execute(defs, plan(defs, [dg.AssetKey("diffusion_model")]), dg.DagsterInstance.ephemeral())


def test_ddps_tiles_follow_the_resolution_setting():
    from dd_assets.defs.chain import ddps_tiles, tiles_per_side

    mp = dict(METHODS["ddps"].defaults)
    assert (mp["tiles"], mp["low_res_tiles"], mp["patch_size"]) == (4, 1, 224)
    assert ddps_tiles(mp, 32) == 1 and ddps_tiles(mp, 224) == 4 and ddps_tiles(mp, 256) == 4  # Sec. 4.2 vs Sec. 3.4
    assert tiles_per_side("ddps", mp, 10, 32) == 1 and tiles_per_side("ddps", mp, 10, 256) == 2
    assert tiles_per_side("ddps", mp, 11, 256) == 1  # single patches above concat_max_ipc
    assert tiles_per_side("ddps", {**mp, "low_res_tiles": 4}, 10, 32) == 2  # the 2x2 ablation at 32 px
    with pytest.raises(ValueError, match="image size"):
        tiles_per_side("ddps", mp, 10)
