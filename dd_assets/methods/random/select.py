"""Random real-image baseline: a seeded subset of ``ipc`` images of one class."""

from __future__ import annotations

import numpy as np



def select_random(source_ids: np.ndarray, ipc: int, seed: int, class_index: int) -> np.ndarray:
    """Pick ``ipc`` distinct ids of one class uniformly at random.

    Args:
        source_ids: ``[N]`` integer manifest ids of the images of class ``class_index``
            (any order; they are sorted first so the result does not depend on it).
        ipc: images per class to keep, ``1 <= ipc <= N``.
        seed: run seed (non-negative).
        class_index: the class; the generator is ``np.random.default_rng([seed, class_index])``
            so classes draw independent streams.

    Returns:
        ``[ipc] int64`` chosen ids, sorted ascending.
    """
    ids = np.sort(np.asarray(source_ids, dtype=np.int64).reshape(-1))
    if ipc < 1:
        raise ValueError(f"class {class_index}: ipc must be >= 1, got {ipc}")
    if len(ids) < ipc:
        raise ValueError(
            f"class {class_index} has {len(ids)} images, fewer than ipc={ipc}"
        )
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"class {class_index}: source_ids contain duplicates")
    rng = np.random.default_rng([seed, class_index])
    pick = rng.choice(len(ids), size=ipc, replace=False)
    return np.sort(ids[pick])
