"""Scoring assets shared between a method's variants (RDED crop scores, NRR-DD's CIDD scores):
the one rule :func:`dd_assets.methods.entries.owner_entry` -- the first entry of the method with
the same values at the parameters scoring reads owns the asset; the method's first entry's asset
has the plain name, another owner's is ``<owner>_<plain name>``. Not a method piece (no method
has this name)."""

from __future__ import annotations

import numpy as np
import polars as pl

from dd_assets.config import Params, block_hash
from dd_assets.defs.common import MODULE_VERSIONS, versioned
from dd_assets.methods.entries import base_method, entries_of, method_params, owner_entry
from dd_assets.methods.plugin import ClassCandidates


def owners(params: Params, method: str, keys: tuple[str, ...]) -> list[str]:
    """The distinct owners among ``method``'s entries, in params order (one asset each)."""
    mblock = params.block("methods")
    out: list[str] = []
    for entry in entries_of(mblock, method):
        owner = owner_entry(mblock, entry, keys)
        if owner not in out:
            out.append(owner)
    return out


def asset_name(params: Params, entry: str, keys: tuple[str, ...], plain: str) -> str:
    """The scoring asset ``entry`` reads: ``plain`` when its owner is the method's first entry,
    else ``<owner>_<plain>``."""
    mblock = params.block("methods")
    owner = owner_entry(mblock, entry, keys)
    first = entries_of(mblock, base_method(entry, mblock.get(entry)))[0]
    return plain if owner == first else f"{owner}_{plain}"


def scoring_params(params: Params, owner: str, keys: tuple[str, ...]) -> dict:
    """The owner's resolved parameters at ``keys`` (what the scoring asset reads and hashes)."""
    mp = method_params(owner, params.block("methods")[owner])
    return {k: mp[k] for k in keys}


def scoring_version(params: Params, owner: str, family: str, keys: tuple[str, ...]) -> str:
    """Code version of ``owner``'s scoring asset: the family's module version and the scoring
    parameters only (as DDPS's ``level_version``), recorded as reading ``methods.<owner>``."""
    return versioned(block_hash(MODULE_VERSIONS[family], scoring_params(params, owner, keys)), [f"methods.{owner}"])


def crops_from_table(df: pl.DataFrame, class_index: int, class_name: str) -> ClassCandidates:
    """Scored crops (``source_id, x0, y0, x1, y1, score``; a missing score is NaN) as
    :class:`ClassCandidates`."""
    return ClassCandidates(
        class_index, class_name, df["source_id"].to_numpy().astype(np.int64),
        boxes=df.select("x0", "y0", "x1", "y1").to_numpy().astype(np.int32).reshape(-1, 4),
        score=df["score"].cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(np.float32),
    )
