"""Per-image feature matrices of one class (``[N, D]``, e.g. a teacher's penultimate
activations), as the coreset selections (herding, k-means) take them."""

from __future__ import annotations

import numpy as np


def check_features(features: np.ndarray, k: int) -> np.ndarray:
    """``features`` as a float64 ``[N, D]`` array, checked for selecting ``1 <= k <= N`` rows."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {x.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > x.shape[0]:
        raise ValueError(f"cannot select k={k} from {x.shape[0]} samples")
    return x.astype(np.float64)
