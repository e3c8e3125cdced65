"""Reading what upstream assets wrote (the paths are in ``storage.layout``).

The manifest is read as Polars (``read_manifest_pl``, ``read_class_manifest_pl``)."""

from __future__ import annotations

import json
import os
import tempfile

import polars as pl
import torch

from dd_assets.defs.partitions import Partitions
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.tables import read_table_pl, read_tables_pl


def _in_splits(df: pl.DataFrame, splits: tuple[str, ...] | None) -> pl.DataFrame:
    return df if splits is None or not df.width else df.filter(pl.col("split").is_in(list(splits)))


def read_manifest_pl(root: DataRoot, parts: Partitions, splits: tuple[str, ...] | None = None) -> pl.DataFrame:
    """Every class's manifest rows (class order, then file order), optionally only ``splits``."""
    return _in_splits(read_tables_pl(root, [layout.manifest(i) for i in range(len(parts.classes))]), splits)


def read_class_manifest_pl(root: DataRoot, class_index: int, splits: tuple[str, ...] | None = None) -> pl.DataFrame:
    """One class's manifest rows (file order), optionally only ``splits``."""
    return _in_splits(read_table_pl(root, layout.manifest(class_index)), splits)


def load_teacher(root: DataRoot, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The teacher model (eval mode) and its checkpoint metadata (class names, arch)."""
    return load_model(root, "teacher", device)


def load_model(root: DataRoot, name: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A trained-model asset (``teacher``, ``vit_scorer``) in eval mode, with its metadata."""
    from dd_assets.models import load_checkpoint

    rel = layout.model_checkpoint(name)
    if not root.exists(rel):
        raise FileNotFoundError(f"{name} checkpoint {root.url(rel)} is missing; materialize the '{name}' asset")
    if root.is_local:
        model, meta = load_checkpoint(str(root.local(rel)), device=device)
    else:
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, "teacher.pt")
            root.fs.get_file(root.path(rel), local)
            model, meta = load_checkpoint(local, device=device)
    model.eval()
    return model, meta


def evaluator(rows: pl.DataFrame, data: dict, dd, device: torch.device):
    """``model -> top-1 accuracy`` on ``rows`` (val or test), streamed from disk."""
    from dd_assets.data.loading import iter_batches
    from dd_assets.core.training import evaluate

    return lambda m: evaluate(m, iter_batches(rows, data, dd.inference_batch_size, num_workers=dd.num_workers),
                              data["mean"], data["std"], device)


def teacher_metrics(root: DataRoot) -> dict:
    return json.loads(root.read_bytes(layout.TEACHER_METRICS))
