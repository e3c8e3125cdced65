"""NRR-DD's Dagster piece: the teacher's ``cam_maps`` (:mod:`dd_assets.defs.methods.nrr_cams`)
and ``cidd_scores[class]`` -- CIDD (Sec. 3.2, Eq. 1, Alg. 1 lines 2-8): per pooled image, random
crops ranked by mean CAM, the top crop's teacher confidence (IPC-independent).

Variants share the CIDD scores when they agree on the parameters CIDD reads (:data:`CIDD_KEYS`):
the first NRR-DD entry's asset is ``cidd_scores`` (``scores/cidd/``), a variant scoring otherwise
gets ``<entry>_cidd_scores`` (``scores/<entry>_cidd_scores/``).  Variants differing only in
refinement or labels (``nrr_dbr: {method: nrr, labels: dbr}``) read the same scores.
"""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl

from dd_assets.config import Params
from dd_assets.defs.common import histogram_md, histogram_picture
from dd_assets.defs.io import load_teacher, read_class_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.methods import nrr_cams
from dd_assets.defs.methods._sharing import asset_name, crops_from_table, owners, scoring_params, scoring_version
from dd_assets.defs.model_assets import pool_rows
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.methods.entries import entries_of, method_params
from dd_assets.methods.plugin import ClassCandidates
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group
from dd_assets.storage.tables import read_table_pl, write_table

METHOD = "nrr"
PLAIN = "cidd_scores"
#: what ``cidd_scores`` reads (beta, refinement and label parameters are read later)
CIDD_KEYS = ("num_crop", "top_t", "mipc", "scale", "seed", "crop_score", "confidence")


def check_entries(params: Params) -> list[str]:
    """The ``methods`` entries built on NRR-DD, after refusing -- naming ``methods.<entry>.<key>``
    -- a ``beta`` that is neither ``auto`` nor a square and an unknown ``crop_score`` /
    ``confidence`` (also the plugin's ``param(choices=...)``, checked when params.yaml loads)."""
    from dd_assets.methods.nrr.cidd import CONFIDENCES, CROP_SCORES, resolve_beta

    mblock = params.block("methods")
    entries = entries_of(mblock, METHOD)
    size = int(params.block("data")["image_size"])
    for n in entries:
        mp = method_params(n, mblock[n])
        resolve_beta(mp["beta"], size, f"methods.{n}.beta")
        for key, allowed in (("crop_score", CROP_SCORES), ("confidence", CONFIDENCES)):
            if mp[key] not in allowed:
                raise ValueError(f"methods.{n}.{key} must be one of {', '.join(allowed)}, got {mp[key]!r}")
    return entries


def scores_asset(params: Params, entry: str) -> str:
    """The CIDD score asset NRR-DD entry ``entry`` reads."""
    return asset_name(params, entry, CIDD_KEYS, PLAIN)


def shared_assets(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    check_entries(params)
    cams = nrr_cams.build(params, parts)
    return [cams, *(_cidd_asset(params, parts, owner) for owner in owners(params, METHOD, CIDD_KEYS))]


def candidates_asset(params: Params, entry: str) -> str:
    return scores_asset(params, entry)


def load_candidates(root: DataRoot, asset: str, class_index: int, class_name: str, size: int) -> ClassCandidates:
    """One class of a CIDD score table: the ``top_t`` CAM-critical crops of every pooled image."""
    return crops_from_table(read_table_pl(root, layout.owned_scores(asset, PLAIN, "cidd", class_index)),
                            class_index, class_name)


def _cidd_asset(params: Params, parts: Partitions, owner: str) -> dg.AssetsDefinition:
    name = scores_asset(params, owner)
    whose = "" if name == PLAIN else f" (methods.{owner}'s CIDD parameters)"

    @dd_asset(params, name=name, family=PLAIN, version=lambda p: scoring_version(p, owner, PLAIN, CIDD_KEYS),
              group_name="scoring", deps=["teacher", "manifest", "cam_maps"], partitions_def=parts.class_def,
              kinds={"parquet"}, pool=GPU_POOL,
              description=(
                  "NRR-DD CIDD (Sec. 3.2, Eq. 1, Alg. 1 lines 2-8): per pooled image, random crops ranked by "
                  "mean CAM (crop_score); the top crop's teacher score (confidence: true-class CE, higher = less "
                  "confident, or highest probability) -- the least confident are kept. IPC-independent" + whose + "."))
    def cidd_scores(run: Run):
        from dd_assets.data.loading import load_rows
        from dd_assets.methods.nrr.cidd import cidd_candidates

        root, data, dd = run.root, run.params.block("data"), run.dd
        cb = scoring_params(run.params, owner, CIDD_KEYS)
        cidx = parts.class_index(run.partition)
        device = dd.torch_device()
        model, _ = load_teacher(root, device)
        pool = pool_rows(read_class_manifest_pl(root, cidx, ("train",)), int(cb["mipc"]), int(cb["seed"]), cidx)
        stored, _ = read_group(root, layout.cams(cidx))
        where = {int(s): i for i, s in enumerate(np.asarray(stored["source_id"], np.int64).tolist())}   # id -> row
        pool_ids = pool["source_id"].to_numpy().astype(np.int64)
        missing = sum(s not in where for s in pool_ids.tolist())
        if missing:
            raise dg.Failure(f"cam_maps[{run.partition}] lacks {missing} pooled images; "
                             "re-materialize cam_maps for this class")
        raw = stored["cam"][np.asarray([where[s] for s in pool_ids.tolist()], np.int64)]
        cands = cidd_candidates(
            model, load_rows(pool, data), np.full(len(pool), cidx, np.int64), pool_ids,
            num_crop=int(cb["num_crop"]), out_size=int(data["image_size"]), mean=data["mean"], std=data["std"],
            seed=int(cb["seed"]), class_index=cidx, top_t=int(cb["top_t"]), scale=tuple(cb["scale"]),
            crop_score=cb["crop_score"], confidence=cb["confidence"],
            batch_size=dd.inference_batch_size, device=device, raw_cams=raw,
        )
        df = pl.DataFrame({
            "source_id": cands.source_id.astype(np.int64), "class_index": np.full(len(cands.source_id), cidx, np.int64),
            "x0": cands.boxes[:, 0], "y0": cands.boxes[:, 1], "x1": cands.boxes[:, 2], "y1": cands.boxes[:, 3],
            "score": cands.score.astype(np.float32),
        })
        run.upstream([("teacher", None), ("manifest", run.partition), ("cam_maps", run.partition)])
        digest = write_table(root, layout.owned_scores(name, PLAIN, "cidd", cidx), df, metadata=run.provenance())
        what = "true-class CE" if cb["confidence"] == "true_class_ce" else "highest probability"
        return digest, {"candidates": len(df),
                        "confidence_histogram": histogram_md(df["score"].to_numpy(), label=what),
                        **histogram_picture(root, name, layout.cls(cidx), df["score"].to_numpy(),
                                            f"teacher {what} of the CAM-critical crop")}

    return cidd_scores
