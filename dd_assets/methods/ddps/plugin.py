"""Plugin: DDPS -- diffusion noise-prediction patch scores (R, Eq. 4-6), DIFT features and
k-means clusters (Sec. 3.3), nearest-centre picks of the top clusters (Sec. 3.4, 4.2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dd_assets.methods.ddps.config import DDPSConfig as _StageConfig
from dd_assets.methods.plugin import ClassCandidates, MethodPlugin, param, rows


_STAGES = _StageConfig()   # the scoring stages' own defaults (Sec. 3.2-3.3)


@dataclass(frozen=True)
class DDPSParams:
    # Stage I, R of every candidate window (asset ddps_scores; Sec. 3.2, Eq. 4-6)
    mipc: int = param(300, min=1)
    image_size: int = param(_STAGES.image_size)
    patch_size: int = param(_STAGES.patch_size)
    patch_stride: int = param(_STAGES.patch_stride, min=1)
    n_draws: int = param(_STAGES.n_draws, min=1)
    t_range: list = param(list(_STAGES.t_range))
    seed: int = param(_STAGES.seed)
    # Stage II, DIFT features of each image's best window, k-means (dift_features, ddps_clusters; Sec. 3.3)
    patches_per_image: int = param(_STAGES.patches_per_image, min=1)
    prefer: str = param(_STAGES.prefer, choices=("low", "high"))
    dift_t: float = param(_STAGES.dift_t)
    dift_up_block: int = param(_STAGES.dift_up_block)
    dift_ensemble: int = param(_STAGES.dift_ensemble, min=1)
    dift_input: str = param(_STAGES.dift_input)
    n_clusters: int = param(_STAGES.n_clusters, min=1)
    kmeans_n_init: int = param(_STAGES.kmeans_n_init, min=1)
    # the IPC-dependent take and composition (ddps_selection; Sec. 3.4, 4.2, supp. 5)
    top_clusters: int = param(10, min=1)
    cluster: bool = param(True)
    concat_max_ipc: int = param(10)
    tiles: int = param(4)
    low_res_tiles: int = param(1)
    grouping: str = param("contiguous", choices=("contiguous", "interleave"))


def tiles_per_patch_image(cfg: DDPSParams, size: int) -> int:
    """Patches per DDPS image below ``concat_max_ipc``: ``tiles`` (2x2, Sec. 3.4) at high
    resolution; at low resolution -- working images smaller than ``patch_size``, the same
    trigger as whole-image R -- ``low_res_tiles`` (default 1: Sec. 4.2 keeps "the same
    setting as in RDED" for low-resolution data, and RDED's CIFAR setting is factor 1)."""
    if cfg.patch_size is not None and int(size) < int(cfg.patch_size):
        return int(cfg.low_res_tiles)
    return int(cfg.tiles)


def tiles(cfg: DDPSParams, ipc: int, size: int) -> int:
    """sqrt(patches per image) for ``IPC <= concat_max_ipc``, else 1 (Sec. 3.4)."""
    from dd_assets.methods.ddps.select import tiles_per_image

    try:
        per = tiles_per_image(int(ipc), int(cfg.concat_max_ipc), tiles_per_patch_image(cfg, size))
    except ValueError as err:
        raise ValueError(f"methods.ddps: {err}") from err
    return int(round(per**0.5))


def select(cfg: DDPSParams, cands: ClassCandidates, ipc: int, size: int):
    """From the stored cluster table only (Sec. 4.2, supp. 5): the patches nearest the centres
    of the top clusters, then the best remaining by R; image ``i`` holds picks
    ``per*i .. per*i + per-1`` (``grouping: contiguous``) or RDED's interleaved order."""
    from dd_assets.methods.ddps.clusters import DDPSCandidates
    from dd_assets.methods.ddps.select import ddps_select

    per_class = ipc * tiles(cfg, ipc, size) ** 2
    dc = DDPSCandidates.from_table(cands.table, cands.class_index, prefer=cfg.prefer)
    cands.need(len(dc.source_id), per_class,
               "candidate patches (methods.ddps: mipc pooled train images x patches_per_image)")
    order = np.asarray(ddps_select(dc, ipc, top_clusters=int(cfg.top_clusters), use_clusters=bool(cfg.cluster),
                                   concat_max_ipc=int(cfg.concat_max_ipc), tiles=tiles_per_patch_image(cfg, size)),
                       np.int64)
    pos = np.arange(len(order))
    per = per_class // ipc
    image, tile = (pos // per, pos % per) if cfg.grouping == "contiguous" else (pos % ipc, pos // ipc)
    return rows(image, tile, dc.source_id[order], dc.boxes[order], dc.score[order])


PLUGIN = MethodPlugin(
    name="ddps", config=DDPSParams, kind="select", candidates="ddps_clusters", select=select, tiles=tiles,
    description="DDPS: diffusion-scored patches (R, Eq. 6), DIFT k-means clusters, nearest-centre picks of "
                "the top clusters; 2x2 composites for IPC <= 10 (whole images at low resolution, as RDED)",
)
