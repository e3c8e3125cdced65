"""FocusDC step 6, optional Dynamic Fine-Tuning (App. 6.2.1): after training on the
distilled set, fine-tune on a fresh random IPC-per-class real subset every epoch ->
:func:`dynamic_finetune_subsets` (the loop is ``dd_assets.core.student_training.dynamic_finetune``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def dynamic_finetune_subsets(
    train_ids_per_class: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
    ipc: int,
    epochs: int,
    seed: int,
) -> list[np.ndarray]:
    """A fresh random real subset of ``ipc`` images per class for every DFT epoch.

    App. 6.2.1: "images are randomly selected at an IPC level from each category to form
    new datasets for fine-tuning ... a unique dataset for fine-tuning in every cycle".
    Epoch ``e``, class number ``k`` (classes in ascending key order for a mapping, list
    order otherwise) draws ``min(ipc, n_k)`` ids without replacement from
    ``np.random.default_rng([seed, e, k])`` (a class with fewer than ``ipc`` real images
    contributes all of them).

    Returns:
        ``epochs`` arrays ``int64``, each the concatenation over classes of that epoch's
        ids (class blocks in class order, ids ascending within a block).
    """
    if ipc < 1 or epochs < 0:
        raise ValueError(f"ipc must be >= 1 and epochs >= 0, got {ipc}, {epochs}")
    if isinstance(train_ids_per_class, Mapping):
        pools = [np.asarray(train_ids_per_class[c], dtype=np.int64) for c in sorted(train_ids_per_class)]
    else:
        pools = [np.asarray(p, dtype=np.int64) for p in train_ids_per_class]
    out: list[np.ndarray] = []
    for e in range(epochs):
        parts = []
        for k, pool in enumerate(pools):
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, e, k])
            take = min(ipc, len(pool))
            parts.append(np.sort(rng.choice(pool, size=take, replace=False)))
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    return out
