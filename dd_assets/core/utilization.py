"""Utilization entropy, mUE (UDD App. E, Eq. 11-12): how evenly a model's activation maps over a
synthetic set spread their values.

Paper: /work/shared/papers/004_5acb7ff699889e9c.txt.  The report computes it for the images of
every method (:func:`set_utilization`); UDD reads its own sets with it and shares the activation
map (:func:`activation_maps`, channel mean of ``|features(x)|``) with its response policy.
:func:`utilization_entropy` is ``UE^d`` of one map (Eq. 11), :func:`mean_utilization_entropy`
the mean over ``d in D`` and images (Eq. 12).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.imaging import Normalizer, to_unit_float

VALUE_RANGES = ("zero_max", "min_max")
MUE_INTERVALS = (5, 6, 7, 8, 9, 10)

Features = Callable[[torch.Tensor], torch.Tensor]


def activation_maps(features: Features, x: torch.Tensor) -> torch.Tensor:
    """Channel mean of ``|features(x)|``: ``[B, C, H, W]`` -> ``[B, gh, gw]``.

    ``features`` maps a batch to a feature map ``[B, K, gh, gw]`` (e.g. a ConvNet's
    ``forward_features`` after normalization).  The absolute value is a no-op on post-ReLU
    features and keeps the response an intensity for any other extractor.
    """
    fmap = features(x)
    if fmap.ndim != 4:
        raise ValueError(f"features must return [B, K, h, w] maps, got {tuple(fmap.shape)}")
    return fmap.abs().mean(1)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _check_feature_model(model: nn.Module, name: str) -> None:
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(
            f"{name} must build a model with forward_features / forward_head (ConvNet, timm); "
            f"got {type(model).__name__}"
        )

# ============================================================================ mUE (App. E, Eq. 11-12)


def utilization_entropy(maps: torch.Tensor, intervals: int, value_range: str = "zero_max") -> np.ndarray:
    """``UE^d`` (Eq. 11, as read in docs/udd.md) of every activation map.

    The values ``X`` of one map are split into ``d`` equal-width intervals of ``[0, max X]``
    (``"zero_max"``; ``"min_max"``: ``[min X, max X]``), ``p_i`` = share of the ``|X|`` values
    in interval ``i`` (the maximum falls in the last one) and
    ``UE^d = -(1 / log d) sum_i p_i log p_i`` in [0, 1] (0: every value in one interval; 1:
    evenly spread).  A constant map has ``UE^d = 0``.

    Args:
        maps: ``[B, ...]`` activation maps (flattened per image); ``"zero_max"`` needs them >= 0.
        intervals: ``d >= 2``.

    Returns:
        float64 ``[B]``.
    """
    d = int(intervals)
    if d < 2:
        raise ValueError(f"intervals must be >= 2, got {intervals}")
    v = maps.detach().double().reshape(maps.shape[0], -1).cpu()
    if value_range == "zero_max":
        if bool((v < 0).any()):
            raise ValueError("value_range='zero_max' needs non-negative maps; use 'min_max'")
        lo = torch.zeros(v.shape[0], 1, dtype=v.dtype)
    elif value_range == "min_max":
        lo = v.min(1, keepdim=True).values
    else:
        raise ValueError(f"unknown value_range {value_range!r}; choose one of {', '.join(VALUE_RANGES)}")
    span = v.max(1, keepdim=True).values - lo
    u = torch.where(span > 0, (v - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(v))
    bins = (u * d).floor().clamp(0, d - 1).long()
    counts = torch.zeros(v.shape[0], d, dtype=v.dtype).scatter_add_(1, bins, torch.ones_like(v))
    p = counts / v.shape[1]
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return (-plogp.sum(1) / math.log(d)).numpy()


@dataclass
class Utilization:
    """mUE of a synthetic set: ``mue`` (mean over images) and ``per_image [N]`` (Eq. 12 per image)."""

    mue: float
    per_image: np.ndarray


def mean_utilization_entropy(
    maps: torch.Tensor, intervals: Sequence[int] = MUE_INTERVALS, value_range: str = "zero_max"
) -> Utilization:
    """mUE (Eq. 12): ``UE^d`` averaged over ``d in D`` (default ``D = {5, ..., 10}``, Fig. 7),
    per image, and the mean over the images.  ``maps [B, ...]``."""
    if len(intervals) == 0:
        raise ValueError("intervals must not be empty")
    per = np.mean([utilization_entropy(maps, d, value_range) for d in intervals], axis=0)
    return Utilization(mue=float(per.mean()) if per.size else float("nan"), per_image=per)


def set_utilization(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    intervals: Sequence[int] = MUE_INTERVALS,
    value_range: str = "zero_max",
    upsample: bool = True,
    batch_size: int = 256,
) -> Utilization:
    """mUE of a synthetic set under ``model`` (App. E).

    Activation map of an image = channel mean of ``|model.forward_features(x)|``, bilinearly
    upsampled to the image size when ``upsample`` (the maps of Fig. 3 / Fig. 9 are shown at
    image size); then :func:`mean_utilization_entropy`.  Eval mode, no gradient (flag restored).

    Args:
        images: uint8 or [0, 1] float ``[N, C, H, W]``; ``mean``/``std``: normalization.

    Returns:
        :class:`Utilization`.
    """
    _check_feature_model(model, "model")
    x_all = to_unit_float(images, "images")
    norm = Normalizer(mean, std, x_all.shape[1], device)
    maps = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start : start + batch_size].to(device)
            m = activation_maps(model.forward_features, norm(x))
            if upsample:
                m = F.interpolate(m[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
            maps.append(m.cpu())
    return mean_utilization_entropy(torch.cat(maps), intervals, value_range)
