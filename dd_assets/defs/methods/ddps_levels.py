"""DDPS's three IPC-independent per-class levels (group ``scoring``); names and code versions
from :mod:`dd_assets.defs.methods.ddps` (``asset_name``, ``level_version``).

* ``ddps_scores``: ``R(p|c)`` (Eq. 6) of every candidate window of every pooled train image
  (Stage I).
* ``dift_features``: each image's best window(s) under ``prefer`` and their DIFT features
  (Stage II).
* ``ddps_clusters``: k-means clusters, their ranking by median R and each patch's distance to
  its centre -- the table every DDPS selection reads.

The pure stage functions (:mod:`dd_assets.methods.ddps.stages`: ``score_windows``,
``window_features``, ``cluster_candidates``) compute them (one generator stream per level and
class; tested in tests/test_ddps.py and tests/test_ddps_graph.py).
"""

from __future__ import annotations

import time

import dagster as dg
import numpy as np
import polars as pl
import torch

from dd_assets.config import Params
from dd_assets.data.loading import load_rows
from dd_assets.defs.common import histogram_md, histogram_picture, image_grid_png, overlay_png, png_md
from dd_assets.defs.io import read_class_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.methods.ddps import DIFFUSION, ddps_config, level_version
from dd_assets.defs.methods.ddps_diffusion import load_predictor
from dd_assets.defs.model_assets import pool_rows
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL, DDResource
from dd_assets.methods.ddps.config import DDPSConfig
from dd_assets.methods.ddps.stages import cluster_candidates, cluster_grid, score_windows, window_features
from dd_assets.methods.entries import method_params
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group, write_group
from dd_assets.storage.tables import read_table_pl, write_table

PICTURE_IMAGES = 16

#: Images per forward pass (each runs 2x: class and null condition): the smaller of the
#: operational ``dd.inference_batch_size`` and this cap, which bounds the attention memory.
MAX_BATCH = 32


def _level(params: Params, entry: str, name: str, level: str, **asset_kwargs):
    """``@dd_asset`` of one level: code version ``level_version`` (the parameters the level reads)."""
    return dd_asset(params, name=name, family=level, blocks=[f"methods.{entry}"],
                    version=lambda p: level_version(p, entry, level), group_name="scoring", **asset_kwargs)


def _config(mp: dict, data: dict, dd: DDResource, predictor) -> DDPSConfig:
    latent = int(getattr(predictor, "latent_scale", 1)) > 1
    return ddps_config(mp, int(data["image_size"]), min(dd.inference_batch_size, MAX_BATCH), latent=latent)


def _progress(dd: DDResource, desc: str, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, disable=not dd.progress, leave=False)

    def step(done: int, _n: int) -> None:
        bar.update(done - bar.n)

    return bar, step


def _pool_images(root: DataRoot, data: dict, cidx: int, ids: np.ndarray | None, mp: dict) -> tuple[pl.DataFrame, torch.Tensor]:
    """The class's pooled train images (``mipc`` seeded, RDED's pool) in ascending source_id,
    or the rows with the given ``ids`` (in that order)."""
    rows = read_class_manifest_pl(root, cidx, ("train",))
    if ids is None:
        rows = pool_rows(rows, int(mp["mipc"]), int(mp["seed"]), cidx)
    else:
        missing = sorted(set(ids.tolist()) - set(rows["source_id"].to_list()))
        if missing:
            raise dg.Failure(f"{len(missing)} scored images are no longer train images (e.g. {missing[:3]}); "
                             "re-materialize the DDPS scores of this class")
        rows = pl.DataFrame({"source_id": np.asarray(ids, np.int64)}).join(
            rows, on="source_id", how="left", maintain_order="left")   # one row per id, in the order of ids
    return rows, torch.from_numpy(load_rows(rows, data))


def scores_level(params: Params, parts: Partitions, entry: str, name: str) -> dg.AssetsDefinition:
    @_level(
        params, entry, name, "ddps_scores",
        deps=[DIFFUSION, "manifest"],
        partitions_def=parts.class_def,
        description=(
            "DDPS Stage I (Sec. 3.2, Eq. 4-6): R(p|c) = mean over the patch of the class-minus-null denoising "
            "error, n_draws (t, eps) draws, for every candidate window of mipc pooled train images (whole "
            "image for low-resolution data). IPC-independent; lower R = more class-relevant."
        ),
        kinds={"parquet"},
        pool=GPU_POOL,
    )
    def scores(run: Run):
        p, root, dd, key = run.params, run.root, run.dd, run.partition
        data = p.block("data")
        mp = method_params(entry, p.block("methods")[entry])
        cidx = parts.class_index(key)
        device = dd.torch_device()
        predictor = load_predictor(root, p, parts, device)
        cfg = _config(mp, data, dd, predictor)
        rows, images = _pool_images(root, data, cidx, None, mp)
        if len(rows) == 0:
            raise dg.Failure(f"class {key!r} has no train images to score")
        bar, step = _progress(dd, f"{name}[{key}]", len(rows))
        t0 = time.perf_counter()
        try:
            columns, maps = score_windows(predictor, images, rows["source_id"].to_numpy().astype(np.int64), cidx,
                                          cfg, device=device, on_progress=step, keep_maps=PICTURE_IMAGES)
        finally:
            bar.close()
        score_s = time.perf_counter() - t0
        table = pl.DataFrame(columns).select(pl.lit(cidx, pl.Int64).alias("class_index"), pl.all(),
                                             pl.lit(name, pl.String).alias("asset"))
        run.upstream([(DIFFUSION, None), ("manifest", key)])
        setting = "whole image (low resolution)" if cfg.patch_size is None else f"{cfg.patch_size}-px windows"
        digest = write_table(root, layout.ddps_scores(cidx, name), table, metadata=run.provenance(setting=setting))
        png = overlay_png(images[: len(maps)].numpy(), -maps, PICTURE_IMAGES)  # hot = the class prompt helps
        root.write_bytes(layout.overlay(name, cidx), png)
        best = table.group_by("source_id").agg(pl.col("r").min()).sort("source_id")["r"].to_numpy()
        return digest, {
            "images": int(len(rows)), "windows": int(len(table)), "setting": setting,
            "model_image": "source size" if cfg.image_size is None else f"shortest edge {cfg.image_size}",
            "forward_passes": int(len(rows)) * cfg.n_draws * 2, "images_per_second": round(len(rows) / max(score_s, 1e-9), 2),
            "r_histogram": histogram_md(table["r"].to_numpy(), label="R"),
            **histogram_picture(root, name, layout.cls(cidx), best, "lowest R per image"),
            "evidence_maps": png_md(png, f"-D maps (class evidence), class {key}"),
            "evidence_maps_path": root.url(layout.overlay(name, cidx)),
        }

    return scores


def features_level(params: Params, parts: Partitions, entry: str, name: str, scores_name: str) -> dg.AssetsDefinition:
    @_level(
        params, entry, name, "dift_features",
        deps=[DIFFUSION, scores_name, "manifest"],
        partitions_def=parts.class_def,
        description=(
            "DDPS Stage II (Sec. 3.3, Alg. 1 l. 12-14): each pooled image's best window(s) by R under `prefer` "
            "and their DIFT features (U-Net up-block activations at t = dift_t * T). IPC-independent."
        ),
        kinds={"zarr"},
        pool=GPU_POOL,
    )
    def features(run: Run):
        p, root, dd, key = run.params, run.root, run.dd, run.partition
        data = p.block("data")
        mp = method_params(entry, p.block("methods")[entry])
        cidx = parts.class_index(key)
        device = dd.torch_device()
        table = read_table_pl(root, layout.ddps_scores(cidx, scores_name))
        ids = np.unique(table["source_id"].to_numpy().astype(np.int64))
        predictor = load_predictor(root, p, parts, device)
        cfg = _config(mp, data, dd, predictor)
        _, images = _pool_images(root, data, cidx, ids, mp)
        bar, step = _progress(dd, f"{name}[{key}]", len(ids))
        try:
            arrays = window_features(predictor, images, ids, table, cidx, cfg, device=device, on_progress=step)
        finally:
            bar.close()
        run.upstream([(DIFFUSION, None), (scores_name, key)])
        digest = write_group(root, layout.dift(cidx, name), arrays,
                             attrs=run.provenance(prefer=cfg.prefer, dift_t=cfg.dift_t))
        f = arrays["features"]
        return digest, {
            "patches": int(len(f)), "dim": int(f.shape[1]) if f.ndim == 2 else 0, "prefer": cfg.prefer,
            "feature_norm": histogram_md(np.linalg.norm(f, axis=1), label="L2 norm"),
        }

    return features


def clusters_level(params: Params, parts: Partitions, entry: str, name: str, features_name: str) -> dg.AssetsDefinition:
    @_level(
        params, entry, name, "ddps_clusters",
        deps=[features_name, "manifest"],
        partitions_def=parts.class_def,
        description=(
            "DDPS Stage II (Sec. 3.3): k-means (n_clusters) on the DIFT features; clusters ranked by the median "
            "R of their patches, patches by distance to their centre. The table every DDPS selection reads "
            "(IPC-independent); grids of the top clusters under reports/grids/."
        ),
        kinds={"parquet"},
    )
    def clusters(run: Run):
        p, root, key = run.params, run.root, run.partition
        data = p.block("data")
        mp = method_params(entry, p.block("methods")[entry])
        cfg = ddps_config(mp, int(data["image_size"]))
        cidx = parts.class_index(key)
        arrays, _ = read_group(root, layout.dift(cidx, features_name))
        cands, cl = cluster_candidates(arrays, cidx, cfg)
        sizes = np.bincount(cl.labels, minlength=len(cl.median_r))
        df = pl.DataFrame(cands.to_table()).select(
            pl.lit(cidx, pl.Int64).alias("class_index"), pl.all(),
            pl.Series("cluster_size", sizes[cl.labels].astype(np.int64)),
            pl.Series("cluster_median_r", cl.median_r[cl.labels].astype(np.float64)),
            pl.lit(name, pl.String).alias("asset"))
        run.upstream([(features_name, key)])
        digest = write_table(root, layout.ddps_clusters(cidx, name), df, metadata=run.provenance())
        ids = np.unique(cands.source_id[cands.cluster_rank < 10])
        rows = pl.DataFrame({"source_id": np.asarray(ids, np.int64)}).join(
            read_class_manifest_pl(root, cidx).unique("source_id", keep="first", maintain_order=True),
            on="source_id", how="left", maintain_order="left")   # in the order of ids
        by_id = dict(zip(ids.tolist(), load_rows(rows, data), strict=True))
        grid, ranks = cluster_grid(by_id, cands, int(data["image_size"]))
        png = image_grid_png(grid, ranks) if len(grid) else b""
        if png:
            root.write_bytes(layout.cluster_grid(name, cidx), png)
        top = [f"| {k} | {int(sizes[c])} | {cl.median_r[c]:.4g} |" for k, c in enumerate(cl.order[:10])]
        return digest, {
            "patches": int(len(df)), "clusters": int(len(cl.order)), "prefer": cfg.prefer,
            "top_clusters": dg.MetadataValue.md("| rank | patches | median R |\n| --- | --- | --- |\n" + "\n".join(top)),
            "cluster_sizes": histogram_md(sizes[sizes > 0], label="patches per cluster"),
            **({"top_cluster_grid": png_md(png, f"top clusters, class {key}"),
                "top_cluster_grid_path": root.url(layout.cluster_grid(name, cidx))} if png else {}),
        }

    return clusters
