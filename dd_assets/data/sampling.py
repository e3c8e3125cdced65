"""Per-class random batches of real images, decoded on demand from the manifest.

Pixel-optimizing methods (UDD's gradient matching) draw ``batch_real`` real images of one
class at every matching step.  :class:`ClassSampler` keeps only the manifest rows (paths) of
each class and decodes the drawn images, so memory is one batch whatever the split's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from dd_assets.data.images import load_image
from dd_assets.data.sources import resolve_root

if TYPE_CHECKING:
    import polars as pl


class ClassSampler:
    """``sampler(class_index, n, generator) -> uint8 [n', 3, S, S]`` over manifest rows.

    Draws ``n' = min(n, N_c)`` distinct rows of the class with ``torch.randperm(N_c,
    generator=generator)[:n']`` over the rows sorted by ``source_id``: exactly the draw of
    :class:`dd_assets.methods.udd.gradient_matching.RealPool` over an in-memory pool of the same
    images in the same order, so the two give identical batches for the same generator.

    Args:
        rows_by_class: ``{class_index: manifest rows}`` (``path``, ``source_id``; Polars
            frames), e.g. the train split of each class.
        data: the ``data`` params block (``root``, ``image_size``).
    """

    def __init__(self, rows_by_class: Mapping[int, pl.DataFrame], data: dict) -> None:
        root = resolve_root(data["root"])
        self.size = int(data["image_size"])
        self.paths: dict[int, list[str]] = {}
        self.source_ids: dict[int, np.ndarray] = {}
        for c, rows in rows_by_class.items():
            if len(rows) == 0:
                raise ValueError(f"class {c} has no real images to sample from")
            rows = rows.select("source_id", "path").sort("source_id", maintain_order=True)
            self.paths[int(c)] = [str(root / p) for p in rows["path"].to_list()]
            self.source_ids[int(c)] = rows["source_id"].to_numpy().astype(np.int64)
        self.decoded = 0  # images decoded so far (a cost counter for logs and tests)

    def __len__(self) -> int:
        return sum(len(p) for p in self.paths.values())

    def __call__(self, class_index: int, n: int, generator: torch.Generator) -> torch.Tensor:
        if class_index not in self.paths:
            raise ValueError(f"no real images of class {class_index}; classes: {sorted(self.paths)}")
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        paths = self.paths[class_index]
        idx = torch.randperm(len(paths), generator=generator)[: min(int(n), len(paths))].tolist()
        self.decoded += len(idx)
        return torch.from_numpy(np.stack([load_image(paths[i], self.size) for i in idx]))
