"""K-means coreset on per-image features of one class: the real sample nearest each centre.

Takes the features of the images of ONE class, ``[N, D]`` float (e.g. penultimate
activations of a teacher), and returns row indices into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dd_assets.core.features import check_features
from dd_assets.core.lazy_sklearn import kmeans_backend

#: scikit-learn's ``KMeans`` / threadpoolctl's ``threadpool_limits``, imported at first use
#: (:mod:`dd_assets.core.lazy_sklearn`); a stand-in may be bound here instead.
KMeans: Any = None
threadpool_limits: Any = None


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
    x = check_features(features, k)
    kmeans_cls, limits = kmeans_backend(KMeans, threadpool_limits)
    with limits(limits=1):
        km = kmeans_cls(n_clusters=k, random_state=seed, n_init=n_init).fit(x)
    sizes = np.bincount(km.labels_, minlength=k)
    order = sorted(range(k), key=lambda c: (-sizes[c], c))
    picks = nearest_unique(x, km.cluster_centers_, order)
    final = sorted(range(k), key=lambda c: (-sizes[c], picks[c]))
    return picks[final].astype(np.int64)
