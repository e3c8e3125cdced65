"""Common Pattern Dropout (EDF Sec. 2.1, Eq. 1-2), pure torch.

The matching loss (Eq. 1) is split into one term per parameter, ``l_i = (theta_hat_{s+N,i} -
theta*_{s+M,i})^2``; the ``floor(alpha * P)`` smallest terms are dropped (they carry "common
patterns") and the rest is summed and normalized -> :func:`dropout_count`,
:func:`common_pattern_dropout` (:func:`per_tensor_terms` for one term per parameter tensor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


# ============================================================================ CPD (Eq. 1-2)


def dropout_count(alpha: float, num_terms: int) -> int:
    """``floor(alpha * P)`` of Eq. 2 (a 1e-9 slack absorbs float error such as
    ``0.7 * 10 = 7.000000000000001`` / ``6.9999...``)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha (CPD dropout ratio) must be in [0, 1), got {alpha}")
    return int(math.floor(alpha * num_terms + 1e-9))


def per_tensor_terms(num: torch.Tensor, den: torch.Tensor, numels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the per-element terms ``[P]`` over each parameter tensor -> ``([T], [T])``."""
    if sum(numels) != num.shape[0]:
        raise ValueError(f"numels sum to {sum(numels)}, terms have {num.shape[0]}")
    return (torch.stack([t.sum() for t in torch.split(num, list(numels))]),
            torch.stack([t.sum() for t in torch.split(den, list(numels))]))


def common_pattern_dropout(
    num: torch.Tensor, den: torch.Tensor, alpha: float, normalize: str = "kept"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Common Pattern Dropout (Eq. 2) on the per-parameter terms of Eq. 1.

    Sorts ``num`` ascending (stable: ties keep index order), drops the first
    ``d = floor(alpha * P)`` and returns

    * ``normalize="kept"``: ``sum_{i kept} num_i / sum_{i kept} den_i`` (reference code:
      numerator and normalizer over the same kept parameters; equals Eq. 1 at alpha = 0);
    * ``normalize="full"``: ``sum_{i kept} num_i / sum_i den_i``.

    Args:
        num: ``[P]`` ``(theta_hat_{s+N} - theta*_{s+M})^2`` terms (differentiable).
        den: ``[P]`` ``(theta*_s - theta*_{s+M})^2`` terms.

    Returns:
        ``(loss scalar, keep [P] bool)``; dropped terms get no gradient.
    """
    if num.ndim != 1 or num.shape != den.shape:
        raise ValueError(f"num and den must be equal [P] vectors, got {tuple(num.shape)}, {tuple(den.shape)}")
    if normalize not in ("kept", "full"):
        raise ValueError(f"normalize must be 'kept' or 'full', got {normalize!r}")
    p = num.shape[0]
    d = dropout_count(alpha, p)
    keep = torch.ones(p, dtype=torch.bool, device=num.device)
    if d > 0:
        order = torch.argsort(num.detach(), stable=True)
        keep[order[:d]] = False
    loss_num = num[keep].sum()
    loss_den = den[keep].sum() if normalize == "kept" else den.sum()
    return loss_num / loss_den, keep
