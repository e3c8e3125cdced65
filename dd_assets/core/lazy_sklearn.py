"""scikit-learn's ``KMeans`` and threadpoolctl's ``threadpool_limits``, imported at first use.

Importing scikit-learn costs ~1.7 s, paid by every process that loads the definitions (each UI
run starts one; ``benchmarks/orchestration.md``) although only the k-means coreset and DDPS's
clustering use it.  Modules that need them keep module-level names bound to ``None`` and call
:func:`kmeans_backend` with them, so a caller may still bind a stand-in there
(``benchmarks/gpu_table.py`` does where scikit-learn is absent).
"""

from __future__ import annotations

from typing import Any


def kmeans_backend(kmeans: Any = None, limits: Any = None) -> tuple[Any, Any]:
    """``(KMeans class, threadpool_limits)``: the given ones, else scikit-learn's / threadpoolctl's."""
    if kmeans is None:
        from sklearn.cluster import KMeans as kmeans
    if limits is None:
        from threadpoolctl import threadpool_limits as limits
    return kmeans, limits
