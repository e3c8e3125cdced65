"""The manifest: one row per image (path, class, split, sha256, size), built per class.

Splits are assigned per class and seeded, so each class partition is computed on its
own: ``test`` is the folder's ``test/`` split when it has one, else a seeded
``data.test_fraction`` of the class; ``val`` is a seeded ``data.val_fraction`` of what is
left (every model selection uses ``val``, never ``test``); the rest is ``train``.

The table is a Polars frame (``ClassManifest.frame``, :func:`manifest_schema`).  Polars is
imported where it is used: ``benchmarks/gpu_table.py`` runs :func:`assign_splits` on pandas
frames on a GPU machine that has pandas and no Polars.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dd_assets.data.images import BadImageError, inspect_image
from dd_assets.data.sources import IMAGE_EXTENSIONS, class_files, resolve_root

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)

COLUMNS = [
    "source_id", "path", "class_name", "class_index", "split",
    "sha256", "size_bytes", "width", "height", "mode",
]
_INT64 = ("source_id", "class_index", "size_bytes", "width", "height")


def manifest_schema() -> pl.Schema:
    """The manifest's columns and types: int64 ids and sizes, strings (stored as ``int64`` and
    ``large_string`` whichever library built the frame, so the manifest's content hash -- its
    data version -- is the same)."""
    import polars as pl

    return pl.Schema({c: pl.Int64 if c in _INT64 else pl.String for c in COLUMNS})


@dataclass
class ClassManifest:
    frame: pl.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def source_id(class_index: int, position: int) -> int:
    """Stable, unique id of an image: class index in the high 32 bits."""
    return (int(class_index) << 32) | int(position)


def _rng(seed: int, class_index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(class_index), purpose])


def build_class_manifest(data: dict, class_name: str, class_index: int) -> ClassManifest:
    root = resolve_root(data["root"])
    files = class_files(root, class_name)
    if not any(files.values()):
        raise FileNotFoundError(
            f"class folder for {class_name!r} under {root} is missing or empty; "
            "add images, or remove the folder and its name from data.classes"
        )
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    position = 0
    for split_dir, paths in sorted(files.items(), key=lambda kv: kv[0] != "train"):
        cap = data.get("max_per_class")
        if cap is not None and len(paths) > cap:
            keep = np.sort(_rng(data["split_seed"], class_index, 3).choice(len(paths), cap, replace=False))
            paths = [paths[i] for i in keep]
        for p in paths:
            pos = position
            position += 1
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((str(p), f"not an image file extension ({p.suffix or 'none'})"))
                continue
            try:
                info = inspect_image(p)
            except BadImageError as err:
                skipped.append((str(p), str(err)))
                continue
            rows.append({
                "source_id": source_id(class_index, pos),
                "path": str(Path(p).relative_to(root)),
                "class_name": class_name,
                "class_index": class_index,
                "split": "test" if split_dir == "test" else "train",
                "sha256": info.sha256,
                "size_bytes": info.size_bytes,
                "width": info.width,
                "height": info.height,
                "mode": info.mode,
            })
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    if not rows:
        raise ValueError(
            f"class {class_name!r} has no readable images under {root} ({len(skipped)} skipped); "
            "fix or remove the files listed in the log"
        )
    import polars as pl

    df = pl.DataFrame(rows, schema=manifest_schema(), orient="row")
    df = assign_splits(df, data, class_index, has_test_dir="test" in files)
    return ClassManifest(df, skipped)


def assign_splits(df: pl.DataFrame | pd.DataFrame, data: dict, class_index: int,
                  has_test_dir: bool) -> pl.DataFrame | pd.DataFrame:
    """The class's rows sorted by ``source_id`` with the seeded ``test`` / ``val`` splits
    (:func:`split_labels`); Polars in, Polars out, pandas in, pandas out."""
    if isinstance(df, pd.DataFrame):
        out = df.sort_values("source_id").reset_index(drop=True)
        labels = split_labels(out["split"].to_numpy(), data, class_index, has_test_dir)
        out["split"] = pd.array(labels, dtype=out["split"].dtype)
        return out
    import polars as pl

    out = df.sort("source_id")
    labels = split_labels(out["split"].to_numpy(), data, class_index, has_test_dir)
    return out.with_columns(pl.Series("split", labels, pl.String))


def split_labels(split: np.ndarray, data: dict, class_index: int, has_test_dir: bool) -> np.ndarray:
    """The split of each row of one class sorted by ``source_id`` (``split``: ``test`` for the
    folder's test split, else ``train``): without a test folder a seeded ``test_fraction`` of the
    positions becomes ``test``; then a seeded ``val_fraction`` of the ``train`` positions (at
    least one when the fraction is positive and there are two) becomes ``val``."""
    split = np.array(split, dtype=object)
    if not has_test_dir:
        n = len(split)
        n_test = int(round(float(data.get("test_fraction", 0.0)) * n))
        perm = _rng(data["split_seed"], class_index, 1).permutation(n)
        split[perm[:n_test]] = "test"
    train_idx = np.flatnonzero(split == "train")
    n_val = int(round(float(data["val_fraction"]) * len(train_idx)))
    if data["val_fraction"] > 0 and n_val == 0 and len(train_idx) > 1:
        n_val = 1
    perm = _rng(data["split_seed"], class_index, 2).permutation(len(train_idx))
    split[train_idx[perm[:n_val]]] = "val"
    return split
