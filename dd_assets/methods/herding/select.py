"""Herding coreset (Welling 2009) on per-image features of one class.

Takes the features of the images of ONE class, ``[N, D]`` float (e.g. penultimate
activations of a teacher), and returns row indices into them.
"""

from __future__ import annotations

import numpy as np

from dd_assets.core.features import check_features


def herding(features: np.ndarray, k: int) -> np.ndarray:
    """Greedy herding (Welling 2009, as used by dataset-distillation baselines).

    At step ``t`` (0-based) pick, among the samples not yet chosen, the one whose addition
    makes the running mean of chosen features closest (L2) to the class mean ``mu``::

        i_t = argmin_i || mu - (sum_{s<t} x_{i_s} + x_i) / (t + 1) ||

    Ties go to the lowest index. Computed in float64.

    Args:
        features: ``[N, D]`` float features of one class.
        k: number to select, ``1 <= k <= N``.

    Returns:
        ``[k] int64`` indices into ``features`` in selection order.
    """
    x = check_features(features, k)
    n = x.shape[0]
    mu = x.mean(axis=0)
    running = np.zeros_like(mu)
    available = np.ones(n, dtype=bool)
    out = np.empty(k, dtype=np.int64)
    for t in range(k):
        # distance of the would-be mean to mu, scaled by (t + 1) (argmin is unchanged)
        diff = (t + 1) * mu - running - x
        d2 = np.einsum("nd,nd->n", diff, diff)
        d2[~available] = np.inf
        i = int(np.argmin(d2))
        out[t] = i
        available[i] = False
        running += x[i]
    return out
