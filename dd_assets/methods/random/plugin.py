"""Plugin: the seeded random real subset (the baseline every result is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dd_assets.methods.plugin import ClassCandidates, MethodPlugin, interleaved, param


@dataclass(frozen=True)
class RandomParams:
    seed: int = param(0, doc="numpy stream [seed, class_index]")


def select(cfg: RandomParams, cands: ClassCandidates, ipc: int, size: int):
    from dd_assets.methods.random.select import select_random

    cands.need(len(cands.source_id), ipc, "train images")
    chosen = select_random(cands.source_id, ipc, int(cfg.seed), cands.class_index)
    index = {int(s): i for i, s in enumerate(cands.source_id)}
    pos = np.array([index[int(c)] for c in chosen], np.int64)
    return interleaved(cands, pos, ipc)


PLUGIN = MethodPlugin(
    name="random", config=RandomParams, kind="select", candidates="manifest", select=select,
    description="seeded random real subset (the baseline every result is compared with)",
)
