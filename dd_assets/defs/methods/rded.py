"""RDED's Dagster piece: ``rded_scores[class]`` -- the observer's cross-entropy of K random-resized
crops of every pooled image, best crop kept per image (IPC-independent; Sun et al., Sec. 3.2).

Variants share the scores when they agree on the parameters scoring reads (:data:`SCORE_KEYS`):
the first RDED entry's asset is ``rded_scores`` (``scores/rded/``), a variant scoring otherwise
(another ``factor``, ``mipc`` ...) gets ``<entry>_rded_scores`` (``scores/<entry>_rded_scores/``).
"""

from __future__ import annotations

import time

import dagster as dg
import numpy as np
import polars as pl

from dd_assets.config import Params
from dd_assets.defs.common import histogram_md, histogram_picture
from dd_assets.defs.io import load_teacher, read_class_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.methods._sharing import asset_name, crops_from_table, owners, scoring_params, scoring_version
from dd_assets.defs.model_assets import pool_rows
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.methods.plugin import ClassCandidates
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.tables import read_table_pl, write_table

METHOD = "rded"
PLAIN = "rded_scores"
#: what ``rded_scores`` reads: the pool (mipc, seed), the crops (num_crop, scale, seed) and the
#: observer's input (factor: crops scored as 1/factor tiles)
SCORE_KEYS = ("num_crop", "mipc", "factor", "scale", "seed")


def scores_asset(params: Params, entry: str) -> str:
    """The crop-score asset RDED entry ``entry`` reads."""
    return asset_name(params, entry, SCORE_KEYS, PLAIN)


def shared_assets(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    return [_scores_asset(params, parts, owner) for owner in owners(params, METHOD, SCORE_KEYS)]


def candidates_asset(params: Params, entry: str) -> str:
    return scores_asset(params, entry)


def load_candidates(root: DataRoot, asset: str, class_index: int, class_name: str, size: int) -> ClassCandidates:
    """One class of a crop-score table: one scored crop per pooled image."""
    return crops_from_table(read_table_pl(root, layout.owned_scores(asset, PLAIN, METHOD, class_index)),
                            class_index, class_name)


def _scores_asset(params: Params, parts: Partitions, owner: str) -> dg.AssetsDefinition:
    name = scores_asset(params, owner)
    whose = "" if name == PLAIN else f" (methods.{owner}'s scoring parameters)"

    @dd_asset(params, name=name, family=PLAIN, version=lambda p: scoring_version(p, owner, PLAIN, SCORE_KEYS),
              group_name="scoring", deps=["teacher", "manifest"], partitions_def=parts.class_def,
              kinds={"parquet"}, pool=GPU_POOL,
              description="RDED: observer cross-entropy of K random-resized crops per pooled image; "
                          f"best crop kept per image{whose}.")
    def rded_scores(run: Run):
        from dd_assets.data.loading import load_rows
        from dd_assets.methods.rded.crops import score_class

        root, data, dd = run.root, run.params.block("data"), run.dd
        sp = scoring_params(run.params, owner, SCORE_KEYS)
        cidx = parts.class_index(run.partition)
        device = dd.torch_device()
        model, _ = load_teacher(root, device)
        pool = pool_rows(read_class_manifest_pl(root, cidx, ("train",)), int(sp["mipc"]), int(sp["seed"]), cidx)
        images = load_rows(pool, data)
        t0 = time.perf_counter()
        cands = score_class(
            model, images, np.full(len(pool), cidx, np.int64), pool["source_id"].to_numpy().astype(np.int64),
            num_crop=int(sp["num_crop"]), out_size=int(data["image_size"]), factor=int(sp["factor"]),
            mean=data["mean"], std=data["std"], seed=int(sp["seed"]), class_index=cidx,
            scale=tuple(sp["scale"]), batch_size=dd.inference_batch_size, device=device,
        )
        score_s = time.perf_counter() - t0
        df = pl.DataFrame({
            "source_id": cands.source_id.astype(np.int64), "class_index": np.full(len(cands.source_id), cidx, np.int64),
            "x0": cands.boxes[:, 0], "y0": cands.boxes[:, 1], "x1": cands.boxes[:, 2], "y1": cands.boxes[:, 3],
            "score": cands.score.astype(np.float32),
        })
        run.upstream([("teacher", None), ("manifest", run.partition)])
        digest = write_table(root, layout.owned_scores(name, PLAIN, METHOD, cidx), df, metadata=run.provenance())
        crops = len(df) * int(sp["num_crop"])
        return digest, {"images": len(df), "crops_scored": crops,
                        "crops_per_second": round(crops / max(score_s, 1e-9), 1),
                        "ce_histogram": histogram_md(df["score"].to_numpy(), label="CE"),
                        **histogram_picture(root, name, layout.cls(cidx), df["score"].to_numpy(),
                                            "observer CE of the best crop")}

    return rded_scores
