"""Coreset baselines on per-image features: herding and k-means centres.

Both take the features of the images of ONE class, ``[N, D]`` float (e.g. penultimate
activations of a teacher), and return row indices into them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from dd_assets.methods.registry import register


def _check(features: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {x.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > x.shape[0]:
        raise ValueError(f"cannot select k={k} from {x.shape[0]} samples")
    return x.astype(np.float64)


@register("select", "herding")
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
    x = _check(features, k)
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


def nearest_unique(features: np.ndarray, centres: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """For each centre (processed in ``order``) the nearest sample not taken by an earlier one.

    Args:
        features: ``[N, D]`` samples.
        centres: ``[k, D]`` centres, ``k <= N``.
        order: permutation of ``range(k)``; earlier centres get first pick.

    Returns:
        ``[k] int64`` sample index per centre, indexed by centre (not by ``order``);
        distance ties go to the lower sample index.
    """
    x = np.asarray(features, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    d2 = np.stack([((x - ci) ** 2).sum(-1) for ci in c])  # [k, N]
    taken = np.zeros(x.shape[0], dtype=bool)
    out = np.full(c.shape[0], -1, dtype=np.int64)
    for ci in order:
        for i in np.argsort(d2[ci], kind="stable"):
            if not taken[i]:
                out[ci] = i
                taken[i] = True
                break
    return out


@register("select", "kmeans")
def kmeans_select(features: np.ndarray, k: int, seed: int, n_init: int = 10) -> np.ndarray:
    """K-means coreset: the real sample nearest each of ``k`` centres.

    Runs ``sklearn.cluster.KMeans(n_clusters=k, random_state=seed, n_init=n_init)`` on
    float64 features with one OpenMP thread (bitwise reproducible). Centres are served in
    order of cluster size (descending, then cluster label); each takes its nearest sample
    not already taken by a larger cluster.

    Args:
        features: ``[N, D]`` float features of one class.
        k: number of clusters / samples, ``1 <= k <= N``.
        seed: KMeans ``random_state``.
        n_init: KMeans restarts.

    Returns:
        ``[k] int64`` unique indices into ``features``, ordered by cluster size descending,
        then by sample index.
    """
    x = _check(features, k)
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(x)
    sizes = np.bincount(km.labels_, minlength=k)
    order = sorted(range(k), key=lambda c: (-sizes[c], c))
    picks = nearest_unique(x, km.cluster_centers_, order)
    final = sorted(range(k), key=lambda c: (-sizes[c], picks[c]))
    return picks[final].astype(np.int64)
