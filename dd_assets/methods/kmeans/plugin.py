"""Plugin: k-means coreset (the real image nearest each of IPC centres per class)."""

from __future__ import annotations

from dataclasses import dataclass

from dd_assets.methods.plugin import ClassCandidates, MethodPlugin, interleaved, param


@dataclass(frozen=True)
class KMeansParams:
    seed: int = param(0)
    n_init: int = param(10, min=1, doc="k-means restarts")


def select(cfg: KMeansParams, cands: ClassCandidates, ipc: int, size: int):
    from dd_assets.methods.kmeans.select import kmeans_select

    cands.need(len(cands.source_id), ipc, "train images with features")
    order = kmeans_select(cands.arrays["features"], ipc, seed=int(cfg.seed), n_init=int(cfg.n_init))
    return interleaved(cands, order, ipc)


PLUGIN = MethodPlugin(
    name="kmeans", config=KMeansParams, kind="select", candidates="teacher_features", select=select,
    description="k-means coreset: real image nearest each of IPC centres per class",
)
