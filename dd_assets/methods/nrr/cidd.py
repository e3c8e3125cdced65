"""NRR-DD stage 1, CIDD (Critical-based Initial Data Discovery, Sec. 3.2, Algorithm 1).

Per real image, compute its CAM (Eq. 1, :mod:`dd_assets.methods.nrr.cams`), draw ``k``
random crops, keep the ``t`` CAM-critical crops -- those with the highest *mean* CAM
(``crop_score``, see :func:`crop_scores`) -- resize them to the full image size and score
each with the teacher (Alg. 1 line 8: ``s(p) = L_ce(p)``, the true-class cross-entropy; or
the highest softmax probability, ``confidence``).  Per class keep the ``beta * IPC`` *least
confident* crops (highest CE / lowest max-probability; RDED keeps the most confident,
lowest-CE ones) and stitch ``beta`` of them into each synthetic image (``beta = factor**2``
in {1, 4, 9, ...}; ``beta: auto`` = RDED's factor at the image size squared,
:func:`resolve_beta`; the stitching is the shared composition of the asset graph,
``dd_assets.defs.chain.compose_method``).
-> :func:`cidd_candidates` (``("score", "cidd")``), :func:`cidd_select`
(``("select", "cidd")``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.device_loops import check_inference_options
from dd_assets.core.imaging import as_tensor, class_inputs
from dd_assets.core.types import CandidateCrops
from dd_assets.evaluation.protocol import rded_factor
from dd_assets.methods.nrr.cams import image_cams, upsample_cams
from dd_assets.methods.rded.crops import class_generator, sample_crop_boxes, score_crops


def beta_to_factor(beta: int) -> int:
    """Patches per synthetic image ``beta`` in {1, 4, 9, ...} -> tiles per side ``sqrt(beta)``."""
    f = math.isqrt(int(beta))
    if beta < 1 or f * f != beta:
        raise ValueError(f"beta must be a perfect square (1, 4, 9, ...), got {beta}")
    return f


def resolve_beta(beta: int | str | None, image_size: int, where: str = "methods.nrr.beta") -> int:
    """Patches per synthetic image (Sec. 3.2, Alg. 1 lines 9-11) at working resolution ``image_size``.

    ``"auto"`` (or ``None``) -> ``rded_factor(image_size) ** 2``: 1 (whole images) up to
    64 px, 4 (2x2 composites) above.  The paper groups patches "similar to RDED [21]"
    (Sec. 3.2), and RDED's factor is 1 at CIFAR's 32 px / Tiny-ImageNet's 64 px and 2 at
    ImageNet scale; the paper's beta = 4 is its ImageNet setting.  An explicit integer wins
    and must be a square (1, 4, 9, ...).

    >>> resolve_beta("auto", 32), resolve_beta("auto", 224), resolve_beta(9, 32)
    (1, 4, 9)

    Raises:
        ValueError naming ``where`` for anything else.
    """
    if beta is None or beta == "auto":
        return rded_factor(image_size) ** 2
    if isinstance(beta, bool) or not isinstance(beta, (int, np.integer)):
        raise ValueError(f"{where} must be 'auto' or a square number of patches (1, 4, 9, ...), got {beta!r}")
    f = math.isqrt(max(int(beta), 0))
    if beta < 1 or f * f != beta:
        raise ValueError(f"{where} = {beta} must be 'auto' or a square number of patches (1, 4, 9, ...)")
    return int(beta)


#: How a crop's CAM is summarized to pick the CAM-critical crops (Alg. 1 line 5).
CROP_SCORES = ("mean", "sum")
#: What "lowest confidence" ranks by (Alg. 1 lines 8-9).
CONFIDENCES = ("true_class_ce", "max_prob")


def cam_mass(cam: torch.Tensor, boxes: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """CAM inside each crop of one image.

    Args:
        cam: ``[H, W]`` CAM of the image (normalized, :func:`class_activation_maps`).
        boxes: ``[k, 4]`` ``(x0, y0, x1, y1)`` half-open crops.
        reduce: ``"sum"`` (CAM mass in the crop) or ``"mean"`` (average CAM = mass / area).

    Returns:
        ``[k] float64``.
    """
    c = cam.double().cpu()
    # integral image: ii[y, x] = sum of cam[:y, :x]
    ii = F.pad(c.cumsum(0).cumsum(1), (1, 0, 1, 0)).numpy()
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    x0, y0, x1, y1 = b.T
    s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    if reduce == "sum":
        return s
    if reduce == "mean":
        return s / ((x1 - x0) * (y1 - y0))
    raise ValueError(f"unknown cam reduce {reduce!r}; use 'sum' or 'mean'")


def crop_scores(cam: torch.Tensor, boxes: np.ndarray, crop_score: str = "mean") -> np.ndarray:
    """How CAM-critical each crop of one image is (Alg. 1 line 5: "select the top t patches
    with the highest values in the CAMs matrix"); higher = more critical.

    ``"mean"`` (default): the crop's average CAM, i.e. its CAM mass normalized by its area.
    ``"sum"``: the crop's CAM mass (the rule before; kept for the ablation).

    Why the mean: the CAM is min-max normalized to [0, 1] (Eq. 1 + normalization), so the
    mass of a crop can only grow when the crop grows -- a crop containing another always has
    at least its mass.  With RandomResizedCrop scales (0.08, 1) the sum therefore ranks
    crops by *size*, and "CAM-critical" reduces to "the largest crop", nearly the whole
    image, wherever the object is.  The mean asks for crops whose pixels have high CAM
    values ("highest values", Alg. 1; "high CAM ratio", Fig. 2), is scale-free and needs no
    extra threshold (the share of pixels with ``C >= eps`` would add one and ties every crop
    lying wholly inside the critical region).

    Args:
        cam: ``[H, W]`` normalized CAM; boxes: ``[k, 4]`` ``(x0, y0, x1, y1)``.

    Returns:
        ``[k] float64``.
    """
    if crop_score not in CROP_SCORES:
        raise ValueError(f"methods.nrr.crop_score must be one of {', '.join(CROP_SCORES)}, got {crop_score!r}")
    return cam_mass(cam, boxes, crop_score)


def crop_confidence(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    boxes: np.ndarray,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    labels: torch.Tensor | np.ndarray | None = None,
    confidence: str = "max_prob",
    precision: str = "fp32",
    channels_last: bool = False,
) -> np.ndarray:
    """Teacher score of every crop (Alg. 1 line 8).

    Crop ``j`` of image ``n`` is ``boxes[n, j]`` of ``images[n]`` (float [0, 1]) resized to
    ``out_size x out_size`` (the full image size, Sec. 3.2), normalized, forwarded in
    eval mode under ``no_grad`` (training flag restored).

    Args:
        images: uint8 ``[N, C, H, W]``; boxes: ``[N, t, 4]``.
        labels: ``[N]`` class of each image (needed for ``"true_class_ce"``).
        confidence: ``"true_class_ce"`` -> ``L_ce(T(p), y) = -log softmax(T(p))_y``
            (higher = less confident); ``"max_prob"`` -> ``max_c softmax(T(p))_c``
            (lower = less confident).
        precision, channels_last: CUDA-only switches of the teacher forward
            (:func:`dd_assets.methods.rded.crops.score_crops`); defaults change nothing.

    Returns:
        ``[N, t] float32``.
    """
    n = as_tensor(images).shape[0]
    if confidence not in CONFIDENCES:
        raise ValueError(f"methods.nrr.confidence must be one of {', '.join(CONFIDENCES)}, got {confidence!r}")
    if confidence == "true_class_ce":
        if labels is None:
            raise ValueError("confidence 'true_class_ce' needs the labels of the images")
        return score_crops(model, images, labels, boxes, out_size, mean, std, batch_size=batch_size,
                           device=device, stat="ce", precision=precision, channels_last=channels_last)
    return score_crops(model, images, np.zeros(n, np.int64), boxes, out_size, mean, std, batch_size=batch_size,
                       device=device, stat="max_prob", precision=precision, channels_last=channels_last)


def cidd_candidates(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    source_ids: np.ndarray,
    num_crop: int,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    class_index: int,
    top_t: int = 1,
    scale: tuple[float, float] = (0.08, 1.0),
    crop_score: str = "mean",
    confidence: str = "true_class_ce",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    raw_cams: torch.Tensor | np.ndarray | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> CandidateCrops:
    """CIDD candidates of one class (Sec. 3.2, Algorithm 1 lines 2-8).

    Per image (visited in ascending ``source_id`` order): CAM for its label (Eq. 1,
    :func:`image_cams`); ``num_crop`` square random crops (:func:`rded.crops.sample_crop_boxes`,
    one generator seeded ``seed * 1_000_003 + class_index``, so input order does not
    matter); keep the ``top_t`` most CAM-critical crops (:func:`crop_scores`: highest mean
    CAM by default, ties to the earlier-drawn crop; Alg. 1 line 5); resize each to
    ``out_size`` and score it with the teacher (:func:`crop_confidence`; Alg. 1 line 8).

    Args:
        images: uint8 ``[N, C, H, W]`` pool of the class; labels: ``[N]``;
        source_ids: ``[N]`` unique manifest ids; out_size: teacher input / synthetic size.
        crop_score: ``"mean"`` | ``"sum"`` (:func:`crop_scores`).
        confidence: ``"true_class_ce"`` (score = CE of the true class, Alg. 1 line 8) |
            ``"max_prob"`` (score = highest softmax probability, Sec. 3.2's wording).
        raw_cams: optional stored ``[N, h, w]`` raw CAMs of ``images`` (same order; the
            ``cam_maps`` asset, :func:`raw_image_cams`) instead of recomputing them.
        precision, channels_last: CUDA-only switches of the confidence scoring forward
            (:func:`crop_confidence`; the CAMs stay fp32); the defaults change nothing.

    Returns:
        :class:`CandidateCrops` with ``K = N * top_t`` candidates, image-major in ascending
        ``source_id``, within an image by descending crop score; ``score [K]`` = the
        ``confidence`` statistic (:func:`cidd_select` keeps the least confident: highest
        CE, resp. lowest max-probability).
    """
    # Deviation/reading: the paper gives no values for k (crops per image) or t (kept per
    # image); defaults follow RDED (k = 5 crops with RandomResizedCrop scale (0.08, 1),
    # ratio 1) and t = 1.  "Highest values in the CAM" is read as the crop's mean CAM
    # (crop_scores explains why the sum, which only measures crop size, is not used).
    # Reading: Algorithm 1 line 8 writes s(p) = L_ce(p) while Sec. 3.2 describes the score
    # as "the highest prediction probability"; Table 9's "Highest-Score (Direct)" row equals
    # RDED's published numbers, and RDED ranks by true-class CE, so the default ranks by
    # true-class CE (highest CE = lowest confidence); confidence="max_prob" is the text's
    # wording.  Crops are scored resized to the full image size (Sec. 3.2), not
    # zero-padded tiles as RDED does.
    imgs, lab, ids = class_inputs(images, labels, source_ids, class_index)
    n = imgs.shape[0]
    if not 1 <= top_t <= num_crop:
        raise ValueError(f"top_t must be in [1, num_crop={num_crop}], got {top_t}")
    if crop_score not in CROP_SCORES:
        raise ValueError(f"methods.nrr.crop_score must be one of {', '.join(CROP_SCORES)}, got {crop_score!r}")
    if confidence not in CONFIDENCES:
        raise ValueError(f"methods.nrr.confidence must be one of {', '.join(CONFIDENCES)}, got {confidence!r}")
    check_inference_options(device, precision, channels_last)
    order = np.argsort(ids, kind="stable")
    imgs = imgs[torch.from_numpy(order)]
    lab = lab[order]
    g = class_generator(seed, class_index)
    h, w = imgs.shape[-2:]
    boxes = np.stack([sample_crop_boxes(h, w, num_crop, g, scale) for _ in range(n)])  # [N, k, 4]
    if raw_cams is None:
        cams = image_cams(model, imgs, lab, out_size, mean, std, batch_size, device)
    else:
        raw = torch.as_tensor(np.asarray(raw_cams), dtype=torch.float32)
        if raw.ndim != 3 or raw.shape[0] != n:
            raise ValueError(f"raw_cams must be [N={n}, h, w], got {tuple(raw.shape)}")
        cams = upsample_cams(raw[torch.from_numpy(order)], (h, w))
    keep = np.empty((n, top_t), dtype=np.int64)
    for i in range(n):
        keep[i] = np.argsort(-crop_scores(cams[i], boxes[i], crop_score), kind="stable")[:top_t]
    chosen = np.take_along_axis(boxes, keep[:, :, None], axis=1)  # [N, t, 4]
    conf = crop_confidence(model, imgs, chosen, out_size, mean, std, batch_size, device, labels=lab,
                           confidence=confidence, precision=precision, channels_last=channels_last)
    return CandidateCrops(
        class_index=class_index,
        source_id=np.repeat(ids[order], top_t),
        boxes=chosen.reshape(-1, 4).astype(np.int32),
        score=conf.reshape(-1).astype(np.float32),
    )


def cidd_select(cands: CandidateCrops | np.ndarray, n: int, confidence: str = "true_class_ce") -> np.ndarray:
    """Indices of the ``n`` LEAST confident candidates (Algorithm 1 line 9), least
    confident first, ties by index.

    Args:
        cands: :class:`CandidateCrops` (its ``score``) or a ``[K]`` score array.
        n: ``beta * IPC``.
        confidence: what the scores are (:func:`cidd_candidates`): ``"true_class_ce"`` ->
            the ``n`` highest CEs; ``"max_prob"`` -> the ``n`` lowest max-probabilities.

    Returns:
        ``[n] int64`` indices into the candidates.
    """
    scores = np.asarray(cands.score if isinstance(cands, CandidateCrops) else cands, dtype=np.float64).reshape(-1)
    if confidence not in CONFIDENCES:
        raise ValueError(f"methods.nrr.confidence must be one of {', '.join(CONFIDENCES)}, got {confidence!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > len(scores):
        raise ValueError(f"{len(scores)} candidate crops, fewer than n={n}")
    if np.isnan(scores).any():
        raise ValueError("candidate scores contain NaN")
    key = -scores if confidence == "true_class_ce" else scores
    return np.argsort(key, kind="stable")[:n].astype(np.int64)

