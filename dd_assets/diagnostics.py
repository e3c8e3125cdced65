"""Train-side diagnostics of a distilled set (never the test split): does the teacher
recognize the distilled images, and each tile of a composite, as their class?

Used by the report to explain results (e.g. composites whose tiles the teacher no longer
recognizes at tile resolution).  No Dagster imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.imaging import resize_float, to_model_input

if TYPE_CHECKING:
    import polars as pl


@dataclass(frozen=True)
class TeacherAgreement:
    image_agree: float  # share of distilled images whose teacher top-1 is their label
    image_conf: float  # mean teacher probability of the label on the whole image
    tile_agree: float  # the same per tile, each tile resized to the full input size
    tile_conf: float
    tiles: int


@torch.no_grad()
def _label_probs(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    agree, conf = [], []
    for i in range(0, len(x), batch):
        p = F.softmax(model(x[i : i + batch]).float(), dim=1)
        y = labels[i : i + batch]
        agree.append((p.argmax(1) == y).cpu().numpy())
        conf.append(p.gather(1, y[:, None])[:, 0].cpu().numpy())
    return np.concatenate(agree) if agree else np.zeros(0, bool), np.concatenate(conf) if conf else np.zeros(0)


def teacher_agreement(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    lineage: pl.DataFrame | pd.DataFrame | None,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
) -> TeacherAgreement:
    """Teacher agreement on distilled images ``uint8 [N, 3, S, S]`` with ``labels [N]``.

    ``lineage`` (one row per tile: ``image_index``, ``dest_x0..dest_y1``) gives the tile
    boxes inside each image; each tile is cut out and resized to ``S x S`` (what a student
    sees under a RandomResizedCrop that falls inside one tile).  Without lineage every image
    counts as one tile.
    """
    was = model.training
    model.eval()
    try:
        x = to_model_input(torch.as_tensor(images), mean, std, device)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=x.device)
        ia, ic = _label_probs(model, x, y)
        if lineage is None or not len(lineage):
            ta, tc = ia, ic
        else:
            from dd_assets.storage.tables import as_polars

            size = tuple(x.shape[-2:])
            tiles, tlab = [], []
            cols = ("image_index", "dest_x0", "dest_y0", "dest_x1", "dest_y1")
            for i, x0, y0, x1, y1 in as_polars(lineage).select(cols).iter_rows():
                t = x[int(i), :, int(y0) : int(y1), int(x0) : int(x1)]
                tiles.append(resize_float(t[None], size)[0] if tuple(t.shape[-2:]) != size else t)
                tlab.append(int(labels[int(i)]))
            ta, tc = _label_probs(model, torch.stack(tiles), torch.as_tensor(tlab, device=x.device))
    finally:
        model.train(was)
    return TeacherAgreement(float(ia.mean()), float(ic.mean()), float(ta.mean()), float(tc.mean()), int(len(ta)))
