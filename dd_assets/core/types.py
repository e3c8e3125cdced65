"""Typed values passed between stages.

Conventions used everywhere in ``dd_assets.methods``:

* images are ``uint8`` arrays/tensors shaped ``[N, C, H, W]`` (C = 3, RGB) until the
  moment a model sees them; :func:`dd_assets.core.imaging.to_model_input` turns them
  into normalized ``float32``;
* boxes are ``(x0, y0, x1, y1)`` half-open integer pixel coordinates
  (``x`` = column, ``y`` = row) in the image they refer to;
* ``source_id`` is the row id of an image in the dataset manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"empty box {self}")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class Tile:
    """One tile of a distilled image: a crop of a source image placed at ``dest``."""

    source_id: int
    box: Box  # crop in source pixels
    dest: Box  # where it lands in the distilled image
    score: float = float("nan")


@dataclass
class CandidateCrops:
    """Scored crops of one class (output of a ``score`` stage).

    Arrays are aligned, length K (number of candidates):
    ``source_id [K] int64``, ``boxes [K, 4] int32`` (x0, y0, x1, y1 in source pixels),
    ``score [K] float32`` (lower is better unless the method says otherwise).
    """

    class_index: int
    source_id: np.ndarray
    boxes: np.ndarray
    score: np.ndarray

    def __post_init__(self) -> None:
        k = len(self.source_id)
        if self.boxes.shape != (k, 4) or self.score.shape != (k,):
            raise ValueError(
                f"CandidateCrops arrays disagree: source_id {self.source_id.shape}, "
                f"boxes {self.boxes.shape}, score {self.score.shape}"
            )


@dataclass
class DistilledSet:
    """Distilled images with their labels and lineage.

    ``images [N, C, S, S] uint8``, ``labels [N] int64`` (class index),
    ``tiles[i]`` lists where each region of image ``i`` came from.
    """

    images: np.ndarray
    labels: np.ndarray
    tiles: list[list[Tile]] = field(default_factory=list)
