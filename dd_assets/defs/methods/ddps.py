"""DDPS's Dagster piece (docs/ddps.md, "In the graph"); built only when a ``methods`` entry
uses ``ddps``.

* ``diffusion_model`` (group ``models``; :mod:`dd_assets.defs.methods.ddps_diffusion`): the
  small class-conditional pixel U-Net trained here on the train split (loss curve in the
  metadata, one MLflow run), or -- when ``diffusion.weights`` names a local diffusers Stable
  Diffusion v1.5 folder -- that folder, validated (every component present) and recorded.
* three IPC-independent per-class levels (``scoring``; :mod:`dd_assets.defs.methods.ddps_levels`):
  ``ddps_scores`` (``R(p|c)``, Eq. 6, of every candidate window of every pooled train image,
  Stage I), ``dift_features`` (each image's best window(s) under ``prefer`` and their DIFT
  features, Stage II) and ``ddps_clusters`` (k-means clusters, their ranking by median R and
  each patch's distance to its centre -- the table every DDPS selection reads).

``<entry>_selection`` (the generic chain) takes the IPC-dependent share from the stored cluster
table only (:func:`load_candidates` -> the plugin's ``select``).  Each level's code version
hashes only the parameters that level reads (``SCORE_KEYS`` < ``FEATURE_KEYS`` <
``CLUSTER_KEYS``), and entries whose parameters agree up to a level share that level's asset
(:func:`dd_assets.methods.entries.owner_entry`): a variant that differs in selection
parameters only (``top_clusters``, ``cluster``, ...) reads the same ``ddps_clusters``; one with
another ``prefer`` gets ``<entry>_dift_features`` and ``<entry>_ddps_clusters`` but shares
``ddps_scores``.

This module holds the piece's interface, the naming and versions and the parameter checks; it
imports no torch (the chain asks it for :func:`candidates_asset` / :func:`load_candidates`).
"""

from __future__ import annotations

import numpy as np

from dd_assets.config import Params
from dd_assets.defs.methods import _sharing
from dd_assets.defs.partitions import Partitions
from dd_assets.methods.ddps.config import ddps_config  # noqa: F401  (re-exported: the level assets, tests)
from dd_assets.methods.ddps.select import tiles_per_image
from dd_assets.methods.entries import entries_of, method_params
from dd_assets.methods.plugin import ClassCandidates
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.tables import read_table_pl

METHOD = "ddps"
DIFFUSION = "diffusion_model"

#: Parameters each IPC-independent level reads (each level also reads everything before it).
SCORE_KEYS = ("mipc", "image_size", "patch_size", "patch_stride", "n_draws", "t_range", "seed")
FEATURE_KEYS = SCORE_KEYS + ("patches_per_image", "prefer", "dift_t", "dift_up_block", "dift_ensemble", "dift_input")
CLUSTER_KEYS = FEATURE_KEYS + ("n_clusters", "kmeans_n_init")
#: Read only by the IPC-dependent ``<entry>_selection``.
SELECT_KEYS = ("top_clusters", "cluster", "concat_max_ipc", "tiles", "low_res_tiles", "grouping")
LEVELS = {"ddps_scores": SCORE_KEYS, "dift_features": FEATURE_KEYS, "ddps_clusters": CLUSTER_KEYS}


# ============================================================================ naming and versions


def ddps_entries(params: Params) -> list[str]:
    """The ``methods`` entries (in params order) that instantiate DDPS."""
    return entries_of(params.block("methods"), METHOD)


def asset_name(params: Params, entry: str, level: str) -> str:
    """The asset holding ``level`` for ``entry``: the first DDPS entry with the same
    parameters up to that level owns it; the first entry's assets have the plain names."""
    return _sharing.asset_name(params, entry, LEVELS[level], level)


def level_version(params: Params, owner: str, level: str) -> str:
    """Code version of ``owner``'s ``level`` asset: the parameters that level reads only."""
    return _sharing.scoring_version(params, owner, level, LEVELS[level])


# ============================================================================ parameter checks
# (parameters -> DDPSConfig: dd_assets.methods.ddps.config.ddps_config, also called by benchmarks/gpu_table.py)


def check_entry(params: Params, entry: str) -> None:
    """Raise a ValueError naming ``methods.<entry>.<key>`` for a value DDPS cannot use
    (``grouping`` and ``prefer``'s allowed values are also the plugin's ``choices``)."""
    mp = method_params(entry, params.block("methods")[entry])
    where = f"methods.{entry}"
    try:
        ddps_config(mp, int(params.block("data")["image_size"]))
    except (ValueError, TypeError, IndexError) as err:
        raise ValueError(f"{where}: {err}") from err
    if not isinstance(mp["cluster"], bool):
        raise ValueError(f"{where}.cluster must be true (cluster-based picks) or false (w/o Cluster ablation), got {mp['cluster']!r}")
    if int(mp["mipc"]) < 1 or int(mp["top_clusters"]) < 1:
        raise ValueError(f"{where}: mipc and top_clusters must be >= 1")
    try:
        tiles_per_image(1, int(mp["concat_max_ipc"]), int(mp["tiles"]))
    except ValueError as err:
        raise ValueError(f"{where}.tiles: {err}") from err
    try:
        tiles_per_image(1, int(mp["concat_max_ipc"]), int(mp["low_res_tiles"]))
    except ValueError as err:
        raise ValueError(f"{where}.low_res_tiles: {err}") from err


# ============================================================================ the piece's interface


def shared_assets(params: Params, parts: Partitions) -> list:
    """``diffusion_model`` and each DDPS level asset some entry reads (shared between entries
    whose parameters agree up to that level)."""
    from dd_assets.defs.methods.ddps_diffusion import check_diffusion, diffusion_asset
    from dd_assets.defs.methods.ddps_levels import clusters_level, features_level, scores_level

    entries = ddps_entries(params)
    for e in entries:
        check_entry(params, e)
    check_diffusion(params)
    diffusion = diffusion_asset(params, parts)
    made: dict = {}
    for e in entries:
        s = asset_name(params, e, "ddps_scores")
        if s not in made:
            made[s] = scores_level(params, parts, e, s)
        f = asset_name(params, e, "dift_features")
        if f not in made:
            made[f] = features_level(params, parts, e, f, s)
        c = asset_name(params, e, "ddps_clusters")
        if c not in made:
            made[c] = clusters_level(params, parts, e, c, f)
    return [diffusion, *made.values()]


def candidates_asset(params: Params, entry: str) -> str:
    """The cluster table asset the selection of ``entry`` reads."""
    return asset_name(params, entry, "ddps_clusters")


def load_candidates(root: DataRoot, asset: str, class_index: int, class_name: str, size: int) -> ClassCandidates:
    """Class ``class_index`` of cluster table ``asset``: the whole table (the plugin's
    ``select`` rebuilds :class:`~dd_assets.methods.ddps.clusters.DDPSCandidates` from it)."""
    table = read_table_pl(root, layout.ddps_clusters(class_index, asset))
    return ClassCandidates(class_index, class_name, source_id=table["source_id"].to_numpy().astype(np.int64), table=table)
