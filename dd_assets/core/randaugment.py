"""RandAugment as replayable view parameters (NRR-DD's student augmentation).

NRR-DD, Supp. A.2 ("Knowledge Transfer and Post-Evaluation Phase"): "To augment the
synthetic data ... we employed the following data augmentation techniques: Two RandAugment
transformations, RandomResizeCrop, RandomHorizontalFlip ... as detailed in [21] and [27]"
([21] RDED, [27] SRe2L).  Read here as one RandAugment with N = 2 ops per view at
torchvision's defaults (``RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31)``),
applied after the crop + flip and before CutMix (docs/methods.md, NRR-DD).

torchvision draws the ops inside ``forward``; FKD-style labels need the *same* pixels at
labelling and at replay, so the draw is split from the application: :func:`sample_ops`
draws op indices and signs from a numpy Generator (stored with the views), and
:func:`apply_ops` applies one view's ops deterministically.  :data:`OPS` is torchvision's
14-op augmentation space (``RandAugment._augmentation_space``) written as data, in its order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F


class Op(NamedTuple):
    """One RandAugment op: magnitudes ``linspace(low, high, bins)`` (``kind`` says how they are
    used); ``signed`` ops are negated with probability 1/2."""

    name: str
    low: float
    high: float
    signed: bool
    kind: str = "linear"  # linear | none (no magnitude) | translate (x image size) | posterize


#: torchvision 0.29 ``RandAugment._augmentation_space``, same order (the stored op indices index it).
OPS: tuple[Op, ...] = (
    Op("Identity", 0.0, 0.0, False, "none"),
    Op("ShearX", 0.0, 0.3, True),
    Op("ShearY", 0.0, 0.3, True),
    Op("TranslateX", 0.0, 150.0 / 331.0, True, "translate"),   # fraction of the image width
    Op("TranslateY", 0.0, 150.0 / 331.0, True, "translate"),   # fraction of the image height
    Op("Rotate", 0.0, 30.0, True),                             # degrees
    Op("Brightness", 0.0, 0.9, True),                          # factor 1 + m
    Op("Color", 0.0, 0.9, True),
    Op("Contrast", 0.0, 0.9, True),
    Op("Sharpness", 0.0, 0.9, True),
    Op("Posterize", 8.0, 4.0, False, "posterize"),             # bits: 8 - round(i / ((bins - 1) / 4))
    Op("Solarize", 255.0, 0.0, False),                         # threshold on the 0..255 scale
    Op("AutoContrast", 0.0, 0.0, False, "none"),
    Op("Equalize", 0.0, 0.0, False, "none"),
)
OP_INDEX = {op.name: i for i, op in enumerate(OPS)}
SIGNED = np.array([op.signed for op in OPS])
DEFAULT_BINS = 31
NEAREST = InterpolationMode.NEAREST  # torchvision RandAugment's default interpolation (fill 0)
#: ``student_augment: randaugment`` (NRR-DD Supp. A.2): (num_ops, magnitude), torchvision's defaults
STUDENT_RANDAUGMENT = (2, 9)


def recipe_suffix(num_ops: int, magnitude: int) -> str:
    """What a results row's ``recipe`` gains with RandAugment views, e.g. ``-ra2m9``."""
    return f"-ra{num_ops}m{magnitude}"


@lru_cache(maxsize=4096)
def op_magnitude(op: int, magnitude: int, num_bins: int = DEFAULT_BINS, size: int = 1) -> float:
    """Unsigned magnitude of op ``op`` at bin ``magnitude`` of ``num_bins`` (as torchvision
    computes it; translations in pixels of an image ``size`` wide/high)."""
    o = OPS[op]
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"magnitude {magnitude} outside the {num_bins} bins")
    if o.kind == "none":
        return 0.0
    if o.kind == "posterize":
        return float(8 - (torch.tensor(magnitude) / ((num_bins - 1) / 4)).round().int())
    high = o.high * size if o.kind == "translate" else o.high
    return float(torch.linspace(o.low, high, num_bins)[magnitude])   # float32, as torchvision


def sample_ops(rng: np.random.Generator, n: int, epochs: int, num_ops: int) -> tuple[np.ndarray, np.ndarray]:
    """Ops of ``epochs`` views of ``n`` images: ``(ops, sign)``, both int8 ``[n, epochs, num_ops]``.

    ``ops``: uniform indices into :data:`OPS`; ``sign``: -1 where a signed op is negated
    (probability 1/2, as torchvision), else +1.  A coin is drawn for every slot, so the
    numbers drawn do not depend on which ops came up.
    """
    if num_ops < 1:
        raise ValueError(f"num_ops must be >= 1, got {num_ops}")
    ops = rng.integers(0, len(OPS), size=(n, epochs, num_ops)).astype(np.int8)
    coin = rng.random((n, epochs, num_ops)) < 0.5
    sign = np.where(SIGNED[ops] & coin, -1, 1).astype(np.int8)
    return ops, sign


def _on_uint8(img01: torch.Tensor, fn) -> torch.Tensor:
    """Apply a uint8-only op to the uint8 quantization of a float image in [0, 1]."""
    q = (img01 * 255.0).round().clamp(0, 255).to(torch.uint8)
    return fn(q).float() / 255.0


def apply_op(img01: torch.Tensor, op: int, signed_magnitude: float) -> torch.Tensor:
    """One op on a float ``[C, H, W]`` image in [0, 1] (torchvision's ``_apply_op``, NEAREST, fill 0)."""
    name, m = OPS[op].name, signed_magnitude
    if name == "Identity":
        return img01
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(m))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return F.affine(img01, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=NEAREST,
                        center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(m), 0] if name == "TranslateX" else [0, int(m)]
        return F.affine(img01, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST)
    if name == "Rotate":
        return F.rotate(img01, m, interpolation=NEAREST)
    if name == "Brightness":
        return F.adjust_brightness(img01, 1.0 + m)
    if name == "Color":
        return F.adjust_saturation(img01, 1.0 + m)
    if name == "Contrast":
        return F.adjust_contrast(img01, 1.0 + m)
    if name == "Sharpness":
        return F.adjust_sharpness(img01, 1.0 + m)
    if name == "Posterize":
        return _on_uint8(img01, lambda q: F.posterize(q, int(m)))
    if name == "Solarize":
        return F.solarize(img01, m / 255.0)
    if name == "AutoContrast":
        return F.autocontrast(img01)
    if name == "Equalize":
        return _on_uint8(img01, F.equalize)
    raise ValueError(f"unknown RandAugment op {name!r}")


def apply_ops(img01: torch.Tensor, ops: Sequence[int] | np.ndarray, sign: Sequence[int] | np.ndarray,
              magnitude: int, num_bins: int = DEFAULT_BINS) -> torch.Tensor:
    """One view's ops, in order, on a float ``[C, H, W]`` image in [0, 1] (deterministic)."""
    h, w = int(img01.shape[-2]), int(img01.shape[-1])
    out = img01
    for op, s in zip(np.asarray(ops).tolist(), np.asarray(sign).tolist(), strict=True):
        size = w if OPS[op].name == "TranslateX" else h
        out = apply_op(out, op, float(s) * op_magnitude(op, magnitude, num_bins, size))
    return out
