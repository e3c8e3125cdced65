"""DDPS Stage II, visual-element aggregation (Sec. 3.3, Alg. 1 lines 14-17): k-means with 32
centres on the DIFT features (:func:`cluster_patches`), clusters ranked by the median ``R``
of their patches, patches inside a cluster by distance to the centre.  All of this is
IPC-independent and stored as one table (:class:`DDPSCandidates`,
:meth:`DDPSCandidates.to_table`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dd_assets.core.lazy_sklearn import kmeans_backend
from dd_assets.core.types import CandidateCrops
from dd_assets.methods.ddps.config import _sign

#: scikit-learn's ``KMeans`` / threadpoolctl's ``threadpool_limits``, imported at first use
#: (:mod:`dd_assets.core.lazy_sklearn`); a stand-in may be bound here instead.
KMeans: Any = None
threadpool_limits: Any = None


@dataclass
class PatchClusters:
    """k-means result on candidate patches (aligned arrays of length K, M clusters).

    ``labels [K]`` k-means cluster id; ``distance [K]`` Euclidean distance to its centre;
    ``cluster_rank [K]`` rank of the patch's cluster (0 = best); ``order [M']`` non-empty
    cluster ids best first; ``median_r [M]`` median raw ``R`` per cluster id (NaN if empty).
    """

    labels: np.ndarray
    distance: np.ndarray
    cluster_rank: np.ndarray
    order: np.ndarray
    median_r: np.ndarray


def cluster_patches(
    features: np.ndarray,
    r: np.ndarray,
    prefer: str = "low",
    n_clusters: int = 32,
    seed: int = 0,
    n_init: int = 10,
) -> PatchClusters:
    """Static k-means on DIFT features and the two ranking rules of Sec. 3.3.

    ``KMeans(n_clusters=min(n_clusters, K), random_state=seed, n_init=n_init)`` on float64
    features, one OpenMP thread (bitwise reproducible).  *Inter-cluster*: clusters sorted by
    the median ``R`` of their patches, ascending for ``prefer="low"`` (descending for
    ``"high"``), ties by cluster id.  *Intra-cluster*: by distance to the centre (used by
    :func:`select_patches`).

    Args:
        features: ``[K, D]``; r: ``[K]`` raw ``R(p|c)``.
    """
    x = np.asarray(features, dtype=np.float64)
    rr = np.asarray(r, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != rr.shape[0] or x.shape[0] == 0:
        raise ValueError(f"features must be [K, D] with K = len(r) > 0, got {x.shape} and {rr.shape}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    sign = _sign(prefer)
    m = min(n_clusters, x.shape[0])
    kmeans_cls, limits = kmeans_backend(KMeans, threadpool_limits)
    with limits(limits=1):
        km = kmeans_cls(n_clusters=m, random_state=seed, n_init=n_init).fit(x)
    labels = km.labels_.astype(np.int64)
    dist = np.linalg.norm(x - km.cluster_centers_[labels], axis=1)
    median = np.full(m, np.nan)
    for k in np.unique(labels):
        median[k] = np.median(rr[labels == k])
    present = np.unique(labels)
    order = np.array(sorted(present.tolist(), key=lambda k: (sign * median[k], k)), dtype=np.int64)
    rank_of = np.full(m, -1, dtype=np.int64)
    rank_of[order] = np.arange(len(order))
    return PatchClusters(labels=labels, distance=dist, cluster_rank=rank_of[labels], order=order, median_r=median)


@dataclass
class DDPSCandidates(CandidateCrops):
    """DDPS candidates of one class: the IPC-independent table (a :class:`CandidateCrops`).

    Besides the base arrays (``score [K]`` = ``R`` for ``prefer="low"``, ``-R`` for
    ``"high"``, so lower is always preferred), aligned ``[K]`` arrays: ``r`` raw ``R(p|c)``,
    ``cluster`` k-means id, ``distance`` to its centre, ``cluster_rank`` (0 = best cluster);
    ``features [K, D]`` DIFT features (optional, to re-cluster without the diffusion model).
    """

    r: np.ndarray = None  # type: ignore[assignment]
    cluster: np.ndarray = None  # type: ignore[assignment]
    distance: np.ndarray = None  # type: ignore[assignment]
    cluster_rank: np.ndarray = None  # type: ignore[assignment]
    prefer: str = "low"
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        k = len(self.source_id)
        for name in ("r", "cluster", "distance", "cluster_rank"):
            v = getattr(self, name)
            if v is None or np.asarray(v).shape != (k,):
                raise ValueError(f"DDPSCandidates.{name} must be [K={k}], got {None if v is None else np.shape(v)}")
        if self.features is not None and np.asarray(self.features).shape[0] != k:
            raise ValueError(f"DDPSCandidates.features must have K={k} rows, got {np.shape(self.features)}")
        _sign(self.prefer)

    def to_table(self) -> dict[str, np.ndarray]:
        """Columns ``patch_id, source_id, x0, y0, x1, y1, r, score, cluster, distance,
        cluster_rank`` (e.g. for a Parquet file)."""
        b = np.asarray(self.boxes)
        return {
            "patch_id": np.arange(len(self.source_id), dtype=np.int64),
            "source_id": np.asarray(self.source_id, np.int64),
            "x0": b[:, 0].astype(np.int32), "y0": b[:, 1].astype(np.int32),
            "x1": b[:, 2].astype(np.int32), "y1": b[:, 3].astype(np.int32),
            "r": np.asarray(self.r, np.float32), "score": np.asarray(self.score, np.float32),
            "cluster": np.asarray(self.cluster, np.int64),
            "distance": np.asarray(self.distance, np.float64),
            "cluster_rank": np.asarray(self.cluster_rank, np.int64),
        }

    @classmethod
    def from_table(cls, table: Mapping[str, np.ndarray], class_index: int, prefer: str = "low") -> DDPSCandidates:
        """Rebuild from :meth:`to_table` columns (rows sorted by ``patch_id``); ``score`` is
        recomputed from ``r`` and ``prefer``.  ``table``: the columns as a dict, or the stored
        table as a Polars (the graph) or pandas (``benchmarks/gpu_table.py``) frame; extra
        columns are ignored."""
        order = np.argsort(np.asarray(table["patch_id"]), kind="stable")
        col = {k: np.asarray(table[k])[order]
               for k in ("source_id", "x0", "y0", "x1", "y1", "r", "cluster", "distance", "cluster_rank")}
        r = col["r"].astype(np.float32)
        return cls(
            class_index=class_index, source_id=col["source_id"].astype(np.int64),
            boxes=np.stack([col[k] for k in ("x0", "y0", "x1", "y1")], axis=1).astype(np.int32),
            score=(_sign(prefer) * r).astype(np.float32), r=r,
            cluster=col["cluster"].astype(np.int64), distance=col["distance"].astype(np.float64),
            cluster_rank=col["cluster_rank"].astype(np.int64), prefer=prefer,
        )
