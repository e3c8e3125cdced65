"""Plugin: FocusDC -- ViT-attention key patches (m per image) + low-resolution context views
(n per image) composed into one image (Sec. 3; App. 6.2.1 dynamic fine-tuning as its ruler)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dd_assets.methods.focusdc.attention import DEFAULT_ALPHA
from dd_assets.methods.focusdc.realism import DEFAULT_AREA_SCORE, DEFAULT_ETA
from dd_assets.methods.focusdc.selection import DEFAULT_M_FACTOR
from dd_assets.methods.plugin import ClassCandidates, MethodPlugin, param, rows


@dataclass(frozen=True)
class FocusDCParams:
    alpha: float = param(DEFAULT_ALPHA, doc="key window side as a fraction of the patch grid (Eq. 6)")
    eta: float = param(DEFAULT_ETA, doc="realism temperature (Eq. 5)")
    m: int = param(DEFAULT_M_FACTOR, min=0, doc="key patches per distilled image")
    n: int = param(1, min=0, doc="low-resolution context views per distilled image")
    variant: str = param("max_as", choices=("max_as", "min_as", "r_as"))
    window: str = param("max")
    confidence: str = param("max")
    context_sampling: str = param("confidence")
    area_score: str = param(DEFAULT_AREA_SCORE, choices=("mean", "sum"))
    seed: int = param(0)


def tiles(cfg: FocusDCParams, ipc: int, size: int) -> int:
    """sqrt(m + n) tiles per side; m + n must be a square number."""
    n = int(cfg.m) + int(cfg.n)
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"methods.focusdc: m + n = {n} must be a square number (1, 4, 9, ...)")
    return side


def select(cfg: FocusDCParams, cands: ClassCandidates, ipc: int, size: int):
    """Key windows (Eq. 6-7) scored by realism (Eq. 5) from the stored attention maps, then
    ``m * IPC`` key images and ``n * IPC`` context images (whole images, low resolution)."""
    from dd_assets.methods.focusdc.realism import scores_from_attention
    from dd_assets.methods.focusdc.selection import arrange, select_key_and_context

    a, cidx, m, n, seed = cands.arrays, cands.class_index, int(cfg.m), int(cfg.n), int(cfg.seed)
    ids = cands.source_id
    cands.need(len(ids), (m + n) * ipc, "train images (FocusDC needs m*IPC key + n*IPC context images)")
    sc = scores_from_attention(
        a["attention"], a["logits"], np.full(len(ids), cidx, np.int64), ids, cidx,
        tuple(int(v) for v in a["patch_size"]), (size, size), float(cfg.alpha), float(cfg.eta),
        cfg.confidence, cfg.window, seed, area=cfg.area_score,
    )
    sel = select_key_and_context(sc, ipc, m_factor=m, variant=cfg.variant, seed=seed,
                                 context_sampling=cfg.context_sampling, class_index=cidx, n_factor=n)
    key, ctx, cw = arrange(sel, ipc, m, n, cidx, seed)
    image, tile, src, boxes, score = [], [], [], [], []
    for i in range(ipc):
        for t, k in enumerate(key[i * m : (i + 1) * m]):
            image.append(i); tile.append(t); src.append(sc.source_id[k]); boxes.append(sc.boxes[k]); score.append(sc.score[k])
        for j, c in enumerate(ctx[i * n : (i + 1) * n]):  # low-resolution view: the whole image
            image.append(i); tile.append(m + j); src.append(sc.source_id[c]); boxes.append((0, 0, size, size))
            score.append(cw[i * n + j])
    return rows(np.array(image), np.array(tile), np.array(src), np.array(boxes, np.int64).reshape(-1, 4),
                np.array(score, np.float64))


PLUGIN = MethodPlugin(
    name="focusdc", config=FocusDCParams, kind="select", candidates="focusdc_attention", select=select,
    tiles=tiles, protocols=("dft",),
    description="FocusDC: ViT-attention key patches (m=3) + a low-res view (n=1) per image",
    # 2: s_area on the paper's scale (window mean of patch-normalized attention, Eq. 5) and
    #    context weights follow the configured confidence
    version="2",
)
