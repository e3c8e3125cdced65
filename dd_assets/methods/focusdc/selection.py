"""FocusDC step 4: key images (top-M realism) and disjoint low-resolution context images,
and which of them each distilled image takes.

The top ``M = 3 IPC`` images by realism give key patches; ``N = IPC`` *other* images give
low-resolution whole-image views, drawn at random weighted by their prediction confidence
-> :func:`select_key_and_context`; :func:`arrange` deals them out to the ``ipc`` images.

Stage registered here: ``("select", "focusdc")`` -> :func:`select_key_and_context`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dd_assets.core.types import CandidateCrops
from dd_assets.methods.focusdc.compose import _factor
from dd_assets.methods.focusdc.realism import FocusScores, class_rng

DEFAULT_M_FACTOR = 3
VARIANTS = ("max_as", "min_as", "r_as")


# --------------------------------------------------------------------------------------
# 4. selection: key images (top-M realism) + disjoint low-res context images
# --------------------------------------------------------------------------------------


@dataclass
class FocusSelection:
    """``key [M] int64`` indices (key patches, in selection order), ``context [N] int64``
    indices (low-resolution views, disjoint from ``key``), ``context_weights [N] float64``
    the prediction confidence of each context image (the configured ``confidence``:
    max softmax or true-class probability, as carried by :class:`FocusScores`)."""

    key: np.ndarray
    context: np.ndarray
    context_weights: np.ndarray


def select_key_and_context(
    scores: FocusScores | np.ndarray,
    ipc: int,
    m_factor: int = DEFAULT_M_FACTOR,
    variant: str = "max_as",
    seed: int = 0,
    confidence: np.ndarray | None = None,
    context_sampling: str = "confidence",
    class_index: int | None = None,
    n_factor: int = 1,
) -> FocusSelection:
    """Pick ``M = m_factor * ipc`` key images and ``N = n_factor * ipc`` other context images
    (the paper: m = 3, n = 1, i.e. M = 3·IPC, N = IPC; Table 8 varies m + n = 4, down to
    m = 0 or n = 0).

    Key images (``variant``), Sec. 3.2 / Table 7:

    * ``"max_as"`` (default): the top-M by realism, descending (ties by index);
    * ``"min_as"``: the bottom-M by realism, ascending (ties by index);
    * ``"r_as"``: M images uniformly at random.

    # Deviation/reading: Table 7 names Max-AS / Min-AS / R-AS ("maximum / minimum /
    # random attention score") without a formula; here they are the orders in which the
    # realism-ranked images become key patches.  The other reading (which attention
    # window is cut) is available as scores_from_attention(window="max"|"min"|"random").

    Context: "randomly select N low-resolution images from S_c that were not chosen as key
    information patches. These images are weighted based on their prediction confidence".
    # Deviation/reading: with context_sampling="confidence" (default) the N images are
    # drawn without replacement with probability proportional to their confidence;
    # "uniform" draws them uniformly.  Either way context_weights returns the confidences.
    # "Prediction confidence" is the one Eq. 5 uses (FocusScores.confidence follows the
    # configured confidence: max softmax, or p[label] under confidence="true_class").

    Randomness comes from ``class_rng(seed, class_index)`` (``class_index`` defaults to
    ``scores.class_index``, else 0).

    Args:
        scores: :class:`FocusScores` (uses ``.score`` = realism and ``.confidence``) or a
            ``[K]`` realism array (then ``confidence`` may be given; default uniform).

    Returns:
        :class:`FocusSelection` with ``len(key) = m_factor * ipc``, ``len(context) = n_factor * ipc``.
    """
    if isinstance(scores, CandidateCrops):
        real = np.asarray(scores.score, dtype=np.float64)
        conf = getattr(scores, "confidence", None) if confidence is None else confidence
        cls = scores.class_index if class_index is None else class_index
    else:
        real = np.asarray(scores, dtype=np.float64).reshape(-1)
        conf = confidence
        cls = 0 if class_index is None else class_index
    k = len(real)
    conf = np.ones(k) if conf is None else np.asarray(conf, dtype=np.float64).reshape(-1)
    if len(conf) != k:
        raise ValueError(f"{k} scores but {len(conf)} confidences")
    if ipc < 1 or m_factor < 0 or n_factor < 0 or m_factor + n_factor < 1:
        raise ValueError(f"need ipc >= 1, m_factor >= 0, n_factor >= 0 and m_factor + n_factor >= 1, "
                         f"got {ipc}, {m_factor}, {n_factor}")
    m_total, n_total = m_factor * ipc, n_factor * ipc
    if m_total + n_total > k:
        raise ValueError(
            f"class {cls}: {k} images, fewer than M + N = {m_total} + {n_total} "
            "(key and context images must be disjoint)"
        )
    rng = class_rng(seed, cls)
    idx = np.arange(k)
    if variant == "max_as":
        key = np.lexsort((idx, -real))[:m_total]
    elif variant == "min_as":
        key = np.lexsort((idx, real))[:m_total]
    elif variant == "r_as":
        key = rng.permutation(k)[:m_total]
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    rest = np.setdiff1d(idx, key)  # ascending
    if context_sampling == "confidence":
        w = np.clip(conf[rest], 0.0, None)
        nz = int((w > 0).sum())
        if nz < n_total:  # not enough positive weights: fall back to uniform
            p = None
        else:
            p = w / w.sum()
        context = rng.choice(rest, size=n_total, replace=False, p=p)
    elif context_sampling == "uniform":
        context = rng.choice(rest, size=n_total, replace=False)
    else:
        raise ValueError(f"context_sampling must be 'confidence' or 'uniform', got {context_sampling!r}")
    context = np.asarray(context, dtype=np.int64)
    return FocusSelection(
        key=np.asarray(key, dtype=np.int64),
        context=context,
        context_weights=conf[context].astype(np.float64),
    )


# --------------------------------------------------------------------------------------
# which key / context images each distilled image takes (Eq. 8)
# --------------------------------------------------------------------------------------


def arrange(
    selection: FocusSelection, ipc: int, m: int, n: int, class_index: int, seed: int = 0, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which key / context candidates each of the ``ipc`` images takes (Eq. 8).

    "We randomly select m patches from T~_c and n low-resolution images from T'_c each
    time": with ``shuffle`` the key and context lists are permuted
    (``class_rng(seed, class_index, 1)``); image ``i`` then takes ``key[i m:(i+1) m]`` and
    ``context[i n:(i+1) n]``.  Returns ``(key [ipc*m], context [ipc*n], weights [ipc*n])``.
    """
    _factor(m, n)
    key = np.asarray(selection.key, dtype=np.int64)
    ctx = np.asarray(selection.context, dtype=np.int64)
    cw = np.asarray(selection.context_weights, dtype=np.float64)
    if len(key) < ipc * m or len(ctx) < ipc * n:
        raise ValueError(
            f"class {class_index}: {len(key)} key / {len(ctx)} context images, need {ipc * m} / {ipc * n}"
        )
    if shuffle:
        rng = class_rng(seed, class_index, 1)
        key = key[rng.permutation(len(key))]
        perm = rng.permutation(len(ctx))
        ctx, cw = ctx[perm], cw[perm]
    return key[: ipc * m], ctx[: ipc * n], cw[: ipc * n]

