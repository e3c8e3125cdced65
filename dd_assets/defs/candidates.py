"""Read one class of a candidate asset into the plugins' common :class:`ClassCandidates`.

The shared candidate assets (``manifest``: a class's train images; ``teacher_features``: their
teacher penultimate features) are read here; a method's own candidate assets are read by its
Dagster piece (``load_candidates`` in ``dd_assets/defs/methods/<name>.py``).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from dd_assets.defs.methods import hook
from dd_assets.methods.plugin import ClassCandidates, full_boxes
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group
from dd_assets.storage.tables import read_table_pl


def _manifest(root: DataRoot, cidx: int, cname: str, size: int) -> ClassCandidates:
    rows = read_table_pl(root, layout.manifest(cidx), columns=["source_id", "split"])
    ids = rows.filter(pl.col("split") == "train")["source_id"].to_numpy().astype(np.int64)
    return ClassCandidates(cidx, cname, ids, full_boxes(len(ids), size), np.full(len(ids), np.nan, np.float32))


def _features(root: DataRoot, cidx: int, cname: str, size: int) -> ClassCandidates:
    arrays, _ = read_group(root, layout.features(cidx))
    ids = np.asarray(arrays["source_id"], np.int64)
    return ClassCandidates(cidx, cname, ids, full_boxes(len(ids), size), np.full(len(ids), np.nan, np.float32),
                           arrays={"features": arrays["features"]})


SHARED = {"manifest": _manifest, "teacher_features": _features}


def load(root: DataRoot, method: str, asset: str, cidx: int, cname: str, size: int) -> ClassCandidates:
    """Class ``cidx`` of candidate asset ``asset`` (read by ``method``'s piece unless shared)."""
    if asset in SHARED:
        return SHARED[asset](root, cidx, cname, size)
    loader = hook(method, "load_candidates")
    if loader is None:
        raise KeyError(f"no reader for candidate asset {asset!r}: add load_candidates to "
                       f"dd_assets/defs/methods/{method}.py")
    return loader(root, asset, cidx, cname, size)


def candidates_asset(params, entry: str) -> str:
    """The per-class asset ``entry``'s selection reads: its piece's choice (variants with their
    own scoring parameters read their own asset) or the plugin's ``candidates``."""
    from dd_assets.methods.entries import plugin_of

    plugin = plugin_of(entry, params.block("methods")[entry])
    fn = hook(plugin.name, "candidates_asset")
    return fn(params, entry) if fn is not None else plugin.candidates


def select_rows_pl(plugin, cfg, ipc: int, root: DataRoot, classes: list[str], size: int,
                   source: str) -> pl.DataFrame:
    """Selection table (``SELECTION_COLUMNS``) of one plugin at one IPC, all classes, reading the
    candidates of every class from asset ``source`` (the plugin's rows, pandas or Polars, with
    their dtypes; ``class_index`` int64 in front)."""
    from dd_assets.methods.plugin import selection_frame

    if ipc < 1:
        raise ValueError(f"IPC must be >= 1, got {ipc}")
    frames = [selection_frame(plugin.select(cfg, load(root, plugin.name, source, cidx, cname, size), ipc, size), cidx)
              for cidx, cname in enumerate(classes)]
    return pl.concat(frames, how="vertical_relaxed")
