"""DDPS's three IPC-independent stages as pure functions (no Dagster), the path the graph
stores level by level (``ddps_scores`` -> ``dift_features`` -> ``ddps_clusters``;
docs/ddps.md "In the graph").  Per class, images in ascending ``source_id`` order, in
batches of ``cfg.batch_size``: :func:`score_windows` (Stage I: ``R`` of every window,
generator stream 0 of ``(seed, class_index)``) -> :func:`window_features` (each image's
best windows and their DIFT features, stream 1) -> :func:`cluster_candidates` (k-means on
all of the class's candidates -> :class:`DDPSCandidates`).  Tables are columns of numpy
arrays (a ``dict``; :func:`window_features` also reads the stored scores as any frame with
these columns, Polars or pandas), so this module needs no frame library: ``benchmarks/gpu_table.py``
runs it on a GPU machine that has pandas and no Polars.  Tested in tests/test_ddps.py and
tests/test_ddps_graph.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from dd_assets.core.device_loops import upload
from dd_assets.methods.ddps.clusters import DDPSCandidates, PatchClusters, cluster_patches
from dd_assets.methods.ddps.config import DDPSConfig
from dd_assets.methods.ddps.diffusion import timestep_from_fraction
from dd_assets.methods.ddps.dift import dift_features
from dd_assets.methods.ddps.representativeness import patch_scores, representativeness_maps
from dd_assets.methods.ddps.windows import candidate_boxes, prepare_images


#: the columns of :func:`score_windows`' table and their dtypes
SCORE_COLUMNS = {"source_id": np.int64, "window": np.int32, "x0": np.int32, "y0": np.int32, "x1": np.int32,
                 "y1": np.int32, "mx0": np.int32, "my0": np.int32, "mx1": np.int32, "my1": np.int32, "r": np.float64}


def _generator(seed: int, class_index: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, class_index, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def source_boxes(boxes: np.ndarray, scale: float, width: int, height: int) -> np.ndarray:
    """Model-pixel boxes -> source-pixel boxes (rounded, clipped)."""
    src = np.rint(np.asarray(boxes).reshape(-1, 4) / scale).astype(np.int64)
    src[:, [0, 2]] = np.clip(src[:, [0, 2]], 0, width)
    src[:, [1, 3]] = np.clip(src[:, [1, 3]], 0, height)
    return src


def score_windows(
    predictor,
    images: torch.Tensor,
    source_ids: np.ndarray,
    class_index: int,
    cfg: DDPSConfig,
    cond_index: int | None = None,
    device: torch.device | str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
    keep_maps: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Stage I: ``R`` of every candidate window of every image (Alg. 1 lines 6-11).

    Args:
        images: uint8 ``[N, C, H, W]`` of one class in ascending ``source_ids`` order.

    Returns:
        ``(table, maps)``: the table as columns (:data:`SCORE_COLUMNS`), one row per (image,
        window) -- ``source_id, window, x0..y1`` (source pixels), ``mx0..my1`` (model pixels),
        ``r`` (float64) -- and the per-pixel ``D`` maps of the first ``keep_maps`` images.

    The class's maps stay on the device until every batch ran (``N * h * w`` floats at the
    latent resolution) and come back in one transfer; the window means (``R``, float64 on the
    host) are taken after it.  ``on_progress`` counts batches as they are queued.
    """
    ids = np.asarray(source_ids, np.int64)
    if len(ids) != len(images) or (np.diff(ids) < 0).any():
        raise ValueError("images must come in ascending source_id order, one id per image")
    n, _, src_h, src_w = images.shape
    cond = class_index if cond_index is None else cond_index
    gen = _generator(cfg.seed, class_index, 0)
    batches, on_device = [], []
    for start in range(0, n, cfg.batch_size):
        x, scale = prepare_images(upload(images[start : start + cfg.batch_size], device), cfg.image_size)
        h, w = x.shape[-2:]
        if cfg.patch_size is not None and cfg.patch_size > min(h, w):
            raise ValueError(f"patch_size={cfg.patch_size} exceeds the model image's shorter side {min(h, w)}")
        batches.append((start, x.shape[0], candidate_boxes(h, w, cfg.patch_size, cfg.patch_stride), scale))
        on_device.append(representativeness_maps(predictor, x, cond, cfg.n_draws, cfg.t_range, gen, cfg.batch_size,
                                                 device, to_host=False))
        if on_progress is not None:
            on_progress(min(start + cfg.batch_size, n), n)
    all_maps = torch.cat(on_device).cpu().numpy() if on_device else None  # the one transfer
    frames, maps_kept = [], []
    for start, b, boxes, scale in batches:
        maps = all_maps[start : start + b]
        r = patch_scores(maps, boxes, predictor.latent_scale)  # [B, W]
        b, nw = r.shape
        src = source_boxes(boxes, scale, src_w, src_h)
        frames.append({
            "source_id": np.repeat(ids[start : start + b], nw), "window": np.tile(np.arange(nw, dtype=np.int32), b),
            **{k: np.tile(src[:, i].astype(np.int32), b) for i, k in enumerate(("x0", "y0", "x1", "y1"))},
            **{k: np.tile(boxes[:, i].astype(np.int32), b) for i, k in enumerate(("mx0", "my0", "mx1", "my1"))},
            "r": r.reshape(-1).astype(np.float64),
        })
        if sum(len(m) for m in maps_kept) < keep_maps:
            maps_kept.append(maps)
    table = {k: np.concatenate([f[k] for f in frames]) if frames else np.zeros(0, dt) for k, dt in SCORE_COLUMNS.items()}
    kept = np.concatenate(maps_kept)[:keep_maps] if maps_kept else np.zeros((0, 1, 1), np.float32)
    return table, kept


def best_windows(table: Mapping[str, np.ndarray], source_ids: np.ndarray, cfg: DDPSConfig) -> dict[str, np.ndarray]:
    """Each image's ``patches_per_image`` best windows under ``prefer`` (Alg. 1 line 12; ties
    to the earlier window): ``window [N, k]``, ``boxes``/``model_boxes [N, k, 4]``, ``r [N, k]``.
    ``table``: the :func:`score_windows` columns (a dict, or a Polars / pandas frame read back)."""
    ids = np.asarray(source_ids, np.int64)
    order = np.lexsort((np.asarray(table["window"]), np.asarray(table["source_id"])))   # by source_id, window; stable
    t = {k: np.asarray(table[k])[order] for k in ("source_id", "r", "x0", "y0", "x1", "y1", "mx0", "my0", "mx1", "my1")}
    n = len(order)
    nw = n // max(1, len(ids))
    if n != nw * len(ids) or not np.array_equal(t["source_id"].astype(np.int64)[::nw], ids):
        raise ValueError("the scores table does not hold the same number of windows for every image")
    if cfg.patches_per_image > nw:
        raise ValueError(f"patches_per_image={cfg.patches_per_image} > {nw} windows per image")
    r = t["r"].astype(np.float64).reshape(len(ids), nw)
    sign = 1.0 if cfg.prefer == "low" else -1.0
    best = np.argsort(sign * r, axis=1, kind="stable")[:, : cfg.patches_per_image]
    src = np.stack([t[k] for k in ("x0", "y0", "x1", "y1")], axis=1).astype(np.int64).reshape(len(ids), nw, 4)
    mod = np.stack([t[k] for k in ("mx0", "my0", "mx1", "my1")], axis=1).astype(np.int64).reshape(len(ids), nw, 4)
    take = np.arange(len(ids))[:, None]
    return {"window": best, "boxes": src[take, best], "model_boxes": mod[take, best],
            "r": np.take_along_axis(r, best, axis=1)}


def window_features(
    predictor,
    images: torch.Tensor,
    source_ids: np.ndarray,
    table: Mapping[str, np.ndarray],
    class_index: int,
    cfg: DDPSConfig,
    cond_index: int | None = None,
    device: torch.device | str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Stage II, first half: the best windows (:func:`best_windows`) and their DIFT features
    (Alg. 1 line 14; generator stream 1 of ``(seed, class_index)``, images in order).  The
    features stay on the device until every batch ran and come back in one transfer.

    Returns:
        ``source_id, window [K]``, ``boxes, model_boxes [K, 4]``, ``r [K]`` float64,
        ``features [K, D]`` float32, ``K = N * patches_per_image`` rows image-major.
    """
    ids = np.asarray(source_ids, np.int64)
    best = best_windows(table, ids, cfg)
    k = cfg.patches_per_image
    cond = class_index if cond_index is None else cond_index
    gen = _generator(cfg.seed, class_index, 1)
    t = timestep_from_fraction(cfg.dift_t, predictor.scheduler)
    feats = []
    n = len(ids)
    for start in range(0, n, cfg.batch_size):
        x, _ = prepare_images(upload(images[start : start + cfg.batch_size], device), cfg.image_size)
        xr = x.repeat_interleave(k, dim=0)
        feats.append(dift_features(predictor, xr, cond, best["model_boxes"][start : start + x.shape[0]].reshape(-1, 4),
                                   t, cfg.dift_up_block, cfg.dift_ensemble, cfg.dift_input, gen, cfg.batch_size, device,
                                   to_host=False))
        if on_progress is not None:
            on_progress(min(start + cfg.batch_size, n), n)
    return {
        "source_id": np.repeat(ids, k), "window": best["window"].reshape(-1).astype(np.int64),
        "boxes": best["boxes"].reshape(-1, 4).astype(np.int32), "model_boxes": best["model_boxes"].reshape(-1, 4).astype(np.int32),
        "r": best["r"].reshape(-1).astype(np.float64),
        "features": torch.cat(feats).cpu().numpy().astype(np.float32) if feats else np.zeros((0, 0), np.float32),
    }


def cluster_candidates(arrays: dict[str, np.ndarray], class_index: int, cfg: DDPSConfig) -> tuple[DDPSCandidates, PatchClusters]:
    """Stage II, second half: k-means on the DIFT features, clusters ranked by median R
    (Sec. 3.3) -> the IPC-independent :class:`DDPSCandidates` table."""
    r = np.asarray(arrays["r"], np.float64)
    cl = cluster_patches(arrays["features"], r, cfg.prefer, cfg.n_clusters, cfg.seed, cfg.kmeans_n_init)
    sign = 1.0 if cfg.prefer == "low" else -1.0
    cands = DDPSCandidates(
        class_index=class_index, source_id=np.asarray(arrays["source_id"], np.int64),
        boxes=np.asarray(arrays["boxes"]).astype(np.int32), score=(sign * r).astype(np.float32), r=r.astype(np.float32),
        cluster=cl.labels, distance=cl.distance, cluster_rank=cl.cluster_rank, prefer=cfg.prefer,
        features=np.asarray(arrays["features"]),
    )
    return cands, cl


def cluster_grid(images_by_id: dict[int, np.ndarray], cands: DDPSCandidates, size: int,
                 clusters: int = 10, per: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The ``per`` patches nearest the centre of each of the ``clusters`` best clusters:
    uint8 ``[M, 3, size, size]`` and their cluster ranks (one grid row per cluster)."""
    from dd_assets.core.imaging import crop_resize, to_uint8

    tiles, ranks = [], []
    for rank in range(min(clusters, int(cands.cluster_rank.max()) + 1 if len(cands.cluster_rank) else 0)):
        members = np.flatnonzero(cands.cluster_rank == rank)
        members = members[np.lexsort((members, cands.distance[members]))][:per]
        for j in members:
            img = torch.from_numpy(np.asarray(images_by_id[int(cands.source_id[j])])).float().div(255.0)
            tiles.append(to_uint8(crop_resize(img, cands.boxes[j].tolist(), (size, size))).numpy())
            ranks.append(rank)
    if not tiles:
        return np.zeros((0, 3, size, size), np.uint8), np.zeros(0, np.int64)
    return np.stack(tiles), np.asarray(ranks, np.int64)
