"""DDPS selection and composition plan (Sec. 3.4, Sec. 4.2, supp. 5).

Selection from the stored table only (:func:`select_patches`): ``n = 4 * IPC`` patches
when ``IPC <= 10`` else ``IPC``; each of the top ``N = 10`` clusters gives its ``n // N``
patches nearest the centre, the rest are the best unused patches by ``R``.
``use_clusters=False`` is the "w/o Cluster" ablation (best ``n`` by ``R``).  Composition:
4 patches per image (2x2) for ``IPC <= 10``, one patch per image otherwise
(:func:`tiles_per_image`), stitched by the shared chain
(:func:`dd_assets.core.compose.compose_images`).

Stage registered here: ``("select", "ddps")`` -> :func:`ddps_select`.
"""

from __future__ import annotations

import math

import numpy as np

from dd_assets.methods.ddps.clusters import DDPSCandidates


def tiles_per_image(ipc: int, concat_max_ipc: int = 10, tiles: int = 4) -> int:
    """Patches per distilled image (Sec. 3.4): ``tiles`` (2x2) when ``ipc <= concat_max_ipc``,
    else 1.  ``tiles`` must be a perfect square (the grid is ``sqrt(tiles)`` per side)."""
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    if tiles < 1 or math.isqrt(tiles) ** 2 != tiles:
        raise ValueError(f"tiles must be a perfect square (1, 4, 9, ...), got {tiles}")
    return tiles if ipc <= concat_max_ipc else 1


def selection_quota(
    ipc: int, top_clusters: int = 10, concat_max_ipc: int = 10, tiles: int = 4
) -> tuple[int, int]:
    """``(patches needed, patches per top cluster)`` (supp. 5): ``n = tiles_per_image * ipc``
    and ``n // N``, i.e. ``4 * IPC // N`` for ``IPC <= 10`` else ``IPC // N``."""
    if top_clusters < 1:
        raise ValueError(f"top_clusters must be >= 1, got {top_clusters}")
    n = tiles_per_image(ipc, concat_max_ipc, tiles) * ipc
    return n, n // top_clusters


def select_patches(
    score: np.ndarray,
    cluster_rank: np.ndarray,
    distance: np.ndarray,
    ipc: int,
    top_clusters: int = 10,
    use_clusters: bool = True,
    concat_max_ipc: int = 10,
    tiles: int = 4,
) -> np.ndarray:
    """The final, IPC-dependent take from the stored table (Sec. 4.2, supp. 5).

    ``n, q = selection_quota(...)`` with ``N = min(top_clusters, #clusters)``.  For the
    clusters of rank ``0 .. N-1`` in order, the ``q`` patches nearest their centre (ties by
    index; all of them if the cluster is smaller); then the remaining ``n - taken`` patches
    are the best unused ones by ``score`` (ascending = best ``R`` first, ties by index).
    ``use_clusters=False``: the ``n`` best by ``score`` ("w/o Cluster", Tab. 5).

    Args:
        score: ``[K]`` lower = better (:attr:`DDPSCandidates.score`); cluster_rank,
            distance: ``[K]``.

    Returns:
        ``[n] int64`` indices, cluster picks (cluster rank, then distance) then fill order.
    """
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    rank = np.asarray(cluster_rank, dtype=np.int64).reshape(-1)
    dist = np.asarray(distance, dtype=np.float64).reshape(-1)
    k = s.shape[0]
    if rank.shape != (k,) or dist.shape != (k,):
        raise ValueError(f"score, cluster_rank, distance must all be [K={k}]")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_clusters = int(rank.max()) + 1 if k else 0
    n_top = max(1, min(top_clusters, n_clusters)) if use_clusters else top_clusters
    n, q = selection_quota(ipc, n_top, concat_max_ipc, tiles)
    if n > k:
        raise ValueError(f"{k} candidate patches, fewer than the {n} needed for ipc={ipc}")
    taken: list[int] = []
    if use_clusters:
        for cr in range(n_top):
            members = np.flatnonzero(rank == cr)
            members = members[np.lexsort((members, dist[members]))]
            taken.extend(members[:q].tolist())
    used = np.zeros(k, dtype=bool)
    used[taken] = True
    rest = [i for i in np.argsort(s, kind="stable").tolist() if not used[i]]
    taken.extend(rest[: n - len(taken)])
    return np.asarray(taken, dtype=np.int64)


def ddps_select(
    cands: DDPSCandidates,
    ipc: int,
    top_clusters: int = 10,
    use_clusters: bool = True,
    concat_max_ipc: int = 10,
    tiles: int = 4,
) -> np.ndarray:
    """:func:`select_patches` on a stored :class:`DDPSCandidates` table (no recomputation).

    Returns:
        ``[tiles_per_image(ipc) * ipc] int64`` indices into ``cands``.
    """
    return select_patches(cands.score, cands.cluster_rank, cands.distance, ipc, top_clusters,
                          use_clusters, concat_max_ipc, tiles)
