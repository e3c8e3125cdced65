"""DD-Ranking's metrics and the paired comparison with the random real subset.

Units: every accuracy passed in here is a **fraction** in [0, 1] (not percent).  DD-Ranking
(Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation", 2025; its
``ddranking/metrics``) defines

* IOR = Acc(syn, any labels) - Acc(random subset, same labels and recipe)       (improvement over random)
* HLR = Acc(full real data, hard labels) - Acc(syn, hard labels)                (hard label recovery; lower is better)
* LRS = (exp(a) - exp(-1)) / (e - exp(-1)),  a = w * IOR - (1 - w) * HLR         (label-robust score, w = 0.5)

With IOR and HLR as fractions, ``a`` lies in [-1, 1] and LRS in [0, 1]; in percent the
exponential would saturate, which is why dd_assets fixes the unit to fractions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Two-sided 95 % Student-t quantiles t_{0.975, df} for df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """t_{0.975, df}: table for df <= 30, Cornish-Fisher expansion above (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _check_fraction(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or not -1.0 <= v <= 1.0:
        raise ValueError(f"{name} = {value!r}: accuracies and their differences are fractions in [-1, 1], not percent")
    return v


def ior(syn_acc: float, random_acc: float) -> float:
    """Improvement over random (fraction): ``syn_acc - random_acc`` under the identical recipe."""
    return _check_fraction("syn_acc", syn_acc) - _check_fraction("random_acc", random_acc)


def hlr(full_hard_acc: float, syn_hard_acc: float) -> float:
    """Hard label recovery (fraction): full-data hard-label accuracy minus the distilled set's."""
    return _check_fraction("full_hard_acc", full_hard_acc) - _check_fraction("syn_hard_acc", syn_hard_acc)


def lrs(ior_value: float, hlr_value: float, w: float = 0.5) -> float:
    """Label-robust score in [0, 1] from IOR and HLR given as fractions (DD-Ranking, w = 0.5)."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"LRS weight w must be in [0, 1], got {w}")
    a = w * _check_fraction("IOR", ior_value) - (1.0 - w) * _check_fraction("HLR", hlr_value)
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


@dataclass(frozen=True)
class PairedDiff:
    """Mean paired difference (method - random) over ``n`` seeds and its 95 % t-interval."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0.0 or self.hi < 0.0)


def paired_difference(method: Mapping[int, float], random: Mapping[int, Sequence[float]]) -> PairedDiff:
    """Paired difference of a method against the random real subset, per student seed.

    ``method[seed]``: the method's test accuracy with that student seed; ``random[seed]``: the
    accuracies of every random draw with the same seed (same initialization and batch order).
    Each seed contributes ``method[seed] - mean(random[seed])``; the interval is the two-sided
    95 % Student-t interval of their mean (``n - 1`` degrees of freedom).  Seeds missing on
    either side are left out; fewer than 2 shared seeds give a NaN interval.
    """
    seeds = sorted(s for s in method if s in random and len(random[s]) > 0)
    if not seeds:
        return PairedDiff(float("nan"), float("nan"), float("nan"), 0)
    d = np.array([float(method[s]) - float(np.mean(random[s])) for s in seeds], np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return PairedDiff(mean, float("nan"), float("nan"), len(d))
    half = t975(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return PairedDiff(mean, mean - half, mean + half, len(d))
