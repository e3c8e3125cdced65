"""The manifest: one row per image (path, class, split, sha256, size), built per class.

Splits are assigned per class and seeded, so each class partition is computed on its
own: ``test`` is the folder's ``test/`` split when it has one, else a seeded
``data.test_fraction`` of the class; ``val`` is a seeded ``data.val_fraction`` of what is
left (every model selection uses ``val``, never ``test``); the rest is ``train``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dd_assets.data.images import BadImageError, inspect_image
from dd_assets.data.sources import IMAGE_EXTENSIONS, class_files, resolve_root

log = logging.getLogger(__name__)

COLUMNS = [
    "source_id", "path", "class_name", "class_index", "split",
    "sha256", "size_bytes", "width", "height", "mode",
]


@dataclass
class ClassManifest:
    table: pd.DataFrame
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
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = assign_splits(df, data, class_index, has_test_dir="test" in files)
    return ClassManifest(df, skipped)


def assign_splits(df: pd.DataFrame, data: dict, class_index: int, has_test_dir: bool) -> pd.DataFrame:
    df = df.sort_values("source_id").reset_index(drop=True)
    if not has_test_dir:
        n = len(df)
        n_test = int(round(float(data.get("test_fraction", 0.0)) * n))
        perm = _rng(data["split_seed"], class_index, 1).permutation(n)
        df.loc[perm[:n_test], "split"] = "test"
    train_idx = np.flatnonzero(df["split"].to_numpy() == "train")
    n_val = int(round(float(data["val_fraction"]) * len(train_idx)))
    if data["val_fraction"] > 0 and n_val == 0 and len(train_idx) > 1:
        n_val = 1
    perm = _rng(data["split_seed"], class_index, 2).permutation(len(train_idx))
    df.loc[train_idx[perm[:n_val]], "split"] = "val"
    return df
