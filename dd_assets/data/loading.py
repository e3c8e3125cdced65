"""Streaming images from the manifest in batches (never a whole split in memory).

``rows`` are manifest rows as a Polars frame (the pipeline) or a pandas one
(``benchmarks/imagenet_cost.py``): only the ``path`` and ``class_index`` columns are read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dd_assets.data.images import load_image
from dd_assets.data.sources import resolve_root

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl


class ManifestDataset(Dataset):
    """Rows of the manifest -> (uint8 ``[3, S, S]`` tensor, class index)."""

    def __init__(self, rows: pl.DataFrame | pd.DataFrame, data_root: str, size: int) -> None:
        root = resolve_root(data_root)
        self.paths = [str(root / p) for p in rows["path"].to_list()]
        self.labels = np.asarray(rows["class_index"].to_numpy(), np.int64)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(load_image(self.paths[i], self.size)), int(self.labels[i])


def iter_batches(
    rows: pl.DataFrame | pd.DataFrame,
    data: dict,
    batch_size: int,
    shuffle_seed: int | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 [B, 3, S, S], int64 [B])`` batches, decoded on the fly."""
    ds = ManifestDataset(rows, data["root"], int(data["image_size"]))
    gen = None
    if shuffle_seed is not None:
        gen = torch.Generator().manual_seed(int(shuffle_seed))
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle_seed is not None,
        generator=gen,
        num_workers=num_workers,
        persistent_workers=False,
    )
    yield from loader


def load_rows(rows: pl.DataFrame | pd.DataFrame, data: dict) -> np.ndarray:
    """uint8 ``[N, 3, S, S]`` for a bounded set of rows (one class's candidates, a few images)."""
    root = resolve_root(data["root"])
    size = int(data["image_size"])
    if len(rows) == 0:
        return np.zeros((0, 3, size, size), np.uint8)
    return np.stack([load_image(root / p, size) for p in rows["path"].to_list()])
