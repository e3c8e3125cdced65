"""Plugin: herding coreset over the teacher's penultimate features."""

from __future__ import annotations

from dataclasses import dataclass

from dd_assets.methods.plugin import ClassCandidates, MethodPlugin, interleaved


@dataclass(frozen=True)
class HerdingParams:
    pass


def select(cfg: HerdingParams, cands: ClassCandidates, ipc: int, size: int):
    from dd_assets.methods.herding.select import herding

    cands.need(len(cands.source_id), ipc, "train images with features")
    return interleaved(cands, herding(cands.arrays["features"], ipc), ipc)


PLUGIN = MethodPlugin(
    name="herding", config=HerdingParams, kind="select", candidates="teacher_features", select=select,
    description="herding coreset over teacher penultimate features",
)
