"""Comp-DD image / class complexity (EDF paper, Sec. 3 and App. D), pure torch/numpy/Polars.

"Emphasizing Discriminative Features for Dataset Distillation in Complex Scenarios" (EDF)
measures how complex an image is by how little of it the classifier finds discriminative:
per image ``1 - share of Grad-CAM >= 0.5`` (:func:`image_complexity`; the maps come from
:func:`dd_assets.core.cam.grad_cam`), per class the mean (:func:`class_complexity`), and the
classes ranked into easy / hard subsets (:func:`split_easy_hard`).  Shared by the
``comp_dd_complexity`` asset and ``dd-assets easy-hard``.

The tables are Polars frames; Polars is imported where it is used: the asset's path
(:func:`image_complexity`, through ``dd_assets.methods.edf.comp_dd``) also runs in
``benchmarks/gpu_table.py`` on a GPU machine that has no Polars.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import polars as pl


def image_complexity(cams: torch.Tensor | np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Comp-DD image complexity ``1 - (1/HW) sum_hw 1[M_hw >= threshold]`` (Sec. 3, App. D.2).

    Args:
        cams: ``[N, H, W]`` Grad-CAM maps in [0, 1].

    Returns:
        float64 ``[N]`` in [0, 1]; higher = smaller high-activation area = more complex.
    """
    m = torch.as_tensor(np.asarray(cams) if not isinstance(cams, torch.Tensor) else cams).detach().cpu()
    if m.ndim != 3:
        raise ValueError(f"cams must be [N, H, W], got {tuple(m.shape)}")
    share = (m >= threshold).double().mean(dim=(1, 2))
    return (1.0 - share).numpy()


def class_complexity(
    complexity: np.ndarray, labels: np.ndarray | Sequence[int], class_names: Sequence[str]
) -> pl.DataFrame:
    """Per-class mean of the image complexities (Sec. 3).

    Returns:
        Polars frame with one row per class of ``class_names`` (in index order): ``class_index``,
        ``class_name``, ``complexity`` (mean over the class's images; NaN without images),
        ``high_activation_share`` (``1 - complexity``), ``n_images``.
    """
    import polars as pl

    c = np.asarray(complexity, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if c.shape != lab.shape:
        raise ValueError(f"{c.shape[0]} complexities but {lab.shape[0]} labels")
    k = len(class_names)
    if lab.size and (lab.min() < 0 or lab.max() >= k):
        raise ValueError(f"labels must be in [0, {k}) (len(class_names))")
    count = np.bincount(lab, minlength=k)
    total = np.bincount(lab, weights=c, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return pl.DataFrame({
        "class_index": np.arange(k, dtype=np.int64),
        "class_name": pl.Series([str(n) for n in class_names], dtype=pl.String),
        "complexity": mean.astype(np.float64),
        "high_activation_share": (1.0 - mean).astype(np.float64),
        "n_images": count.astype(np.int64),
    })



@dataclass
class EasyHardSplit:
    """``easy`` / ``hard``: rows of the :func:`class_complexity` table (ascending resp.
    descending complexity)."""

    easy: pl.DataFrame
    hard: pl.DataFrame


def split_easy_hard(table: pl.DataFrame, k: int | None = 10, threshold: float | None = None) -> EasyHardSplit:
    """Comp-DD subset selection (Sec. 3 "Subset Selection").

    By rank (``threshold=None``, the paper): classes sorted by complexity descending (ties
    by ``class_index``); ``hard`` = the ``k`` most complex, ``easy`` = the ``k`` least
    complex; needs ``2k`` classes with images (the paper uses categories of >= 20 classes).
    By threshold: ``hard`` = complexity >= threshold, ``easy`` = below (``k`` ignored).
    Classes without images (NaN or null complexity) are left out.
    """
    import polars as pl

    c = pl.col("complexity")
    t = table.filter(c.is_not_null() & c.is_not_nan())
    desc = t.sort(["complexity", "class_index"], descending=[True, False], maintain_order=True)
    if threshold is not None:
        hard = desc.filter(c >= threshold)
        easy = desc.filter(c < threshold).reverse()
    else:
        if k is None or k < 1:
            raise ValueError(f"k must be >= 1 when splitting by rank, got {k}")
        if 2 * k > len(desc):
            raise ValueError(f"need 2k={2 * k} classes with images to split into easy/hard, have {len(desc)}")
        hard = desc.head(k)
        easy = desc.reverse().head(k)
    return EasyHardSplit(easy=easy, hard=hard)
