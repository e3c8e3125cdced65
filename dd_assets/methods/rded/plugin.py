"""Plugin: RDED (Sun et al., CVPR 2024): lowest observer-CE crops, factor x factor composites."""

from __future__ import annotations

from dataclasses import dataclass

from dd_assets.methods.rded.crops import DEFAULT_MIPC, DEFAULT_NUM_CROP
from dd_assets.methods.plugin import ClassCandidates, MethodPlugin, interleaved, param


@dataclass(frozen=True)
class RDEDParams:
    num_crop: int = param(DEFAULT_NUM_CROP, min=1, doc="K random-resized crops scored per pooled image")
    mipc: int = param(DEFAULT_MIPC, min=1, doc="pooled real images per class")
    factor: int = param(1, min=1, doc="tiles per side (RDED: 2 at >= 64 px, 1 at 32 px)")
    scale: list = param([0.08, 1.0], doc="RandomResizedCrop area range")
    seed: int = param(0)


def tiles(cfg: RDEDParams, ipc: int, size: int) -> int:
    return int(cfg.factor)


def select(cfg: RDEDParams, cands: ClassCandidates, ipc: int, size: int):
    """The ``IPC * factor^2`` lowest-CE crops (Sec. 3.2), in RDED's interleaved tiling."""
    from dd_assets.methods.rded.crops import select_lowest

    per_class = ipc * int(cfg.factor) ** 2
    cands.need(len(cands.source_id), per_class, "scored crops (methods.<entry>.mipc pool)")
    return interleaved(cands, select_lowest(cands.crops(), per_class), ipc)


PLUGIN = MethodPlugin(
    name="rded", config=RDEDParams, kind="select", candidates="rded_scores", select=select, tiles=tiles,
    description="RDED: lowest observer-CE crops, factor x factor composites",
)
