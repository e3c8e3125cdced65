"""NRR-DD: Non-Critical Region Refinement dataset distillation (core, pure torch/numpy).

Paper: "Dataset Distillation via ... Non-Critical Region Refinement" (NRR-DD), Sec. 3.2-3.4,
Algorithm 1 and supplementary A.  Three stages:

1. **CIDD** (Critical-based Initial Data Discovery, Sec. 3.2): per real image, compute its
   CAM (Eq. 1, :mod:`dd_assets.core.cam`), draw ``k`` random crops, keep the ``t``
   CAM-critical crops -- those with the highest *mean* CAM (``crop_score``, see
   :func:`crop_scores`) -- resize them to the full image size and score each with the
   teacher (Alg. 1 line 8: ``s(p) = L_ce(p)``, the true-class cross-entropy; or the highest
   softmax probability, ``confidence``).  Per class keep the ``beta * IPC`` *least
   confident* crops (highest CE / lowest max-probability; RDED keeps the most confident,
   lowest-CE ones) and stitch ``beta`` of them into each synthetic image
   (``beta = factor**2`` in {1, 4, 9, ...}; ``beta: auto`` = RDED's factor at the image
   size squared, :func:`resolve_beta`; :func:`dd_assets.core.compose.compose_class`).
   -> :func:`cidd_candidates` (``("score", "cidd")``), :func:`cidd_select`
   (``("select", "cidd")``), :func:`cidd_distill_class` (all three steps for one class).
2. **NRR** (Sec. 3.3): refine every synthetic image with
   ``L_C = L_ce(T(x), y) + alpha_bn * L_bn`` (Eq. 2, 3), but scale each pixel's update by
   the non-critical mask ``M = max(0, eps - C)`` (Eq. 4, 5) so critical pixels
   (``C >= eps``) keep their instance-specific detail.  With label refinement (Eq. 11-12)
   the loss also pulls the teacher's prediction on a mixed view towards both classes.
   -> :func:`nrr_mask`, :func:`bn_statistics_loss`, :func:`refine`.
3. **DBR** labels (Sec. 3.4): :mod:`dd_assets.core.dbr`.

Hyper-parameters (supplementary A): ``alpha_bn = 10``, ``eps = 0.5``, ``r = 0.4``,
``alpha_lr = 1``; refinement with Adam(lr 0.05, betas (0.5, 0.9)), batch 100, 2000
iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.evaluation.protocol import rded_factor
from dd_assets.core.cam import normalize_minmax, raw_class_activation_maps
from dd_assets.core.compose import compose_class
from dd_assets.core.dbr import DEFAULT_R, ce_distances, sce_loss
from dd_assets.core.imaging import as_tensor, class_inputs, resize_float, to_model_input, to_uint8
from dd_assets.methods.rded import class_generator, sample_crop_boxes, score_crops
from dd_assets.methods.registry import register
from dd_assets.core.types import CandidateCrops, Tile

NO_BN_MESSAGE = "NRR needs a batch-norm teacher: set teacher.arch_kwargs.norm: batch"

# ============================================================================ CIDD (Sec. 3.2)


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

    Returns:
        ``[N, t] float32``.
    """
    n = as_tensor(images).shape[0]
    if confidence not in CONFIDENCES:
        raise ValueError(f"methods.nrr.confidence must be one of {', '.join(CONFIDENCES)}, got {confidence!r}")
    if confidence == "true_class_ce":
        if labels is None:
            raise ValueError("confidence 'true_class_ce' needs the labels of the images")
        return score_crops(model, images, labels, boxes, out_size, mean, std,
                           batch_size=batch_size, device=device, stat="ce")
    return score_crops(model, images, np.zeros(n, np.int64), boxes, out_size, mean, std,
                       batch_size=batch_size, device=device, stat="max_prob")


def raw_image_cams(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    model_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Un-normalized CAM of each image for its label at the teacher's feature resolution
    (Eq. 1, :func:`dd_assets.core.cam.raw_class_activation_maps`) -- what the
    ``cam_maps`` asset stores (small at any image size).  Images are resized to
    ``model_size`` when their size differs (a flattened-head ConvNet only accepts its
    training size).  The model runs in eval mode without gradients.

    Args:
        images: uint8 ``[N, C, H, W]``; labels: ``[N]``.

    Returns:
        float32 ``[N, h, w]`` on CPU.
    """
    imgs = as_tensor(images)
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    h, w = imgs.shape[-2:]
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, imgs.shape[0], batch_size):
                x = to_model_input(imgs[start : start + batch_size], mean, std, device)
                if (h, w) != (model_size, model_size):
                    x = resize_float(x, (model_size, model_size))
                y = lab[start : start + batch_size].to(x.device)
                out.append(raw_class_activation_maps(model, x, y).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty((0, 1, 1))


def upsample_cams(raw: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Raw ``[N, h, w]`` CAMs -> ``[N, H, W]`` in [0, 1]: bilinear upsampling
    (``align_corners=False``), then per-image min-max normalization -- exactly the steps of
    :func:`dd_assets.core.cam.class_activation_maps`."""
    cam = torch.as_tensor(np.asarray(raw) if not isinstance(raw, torch.Tensor) else raw, dtype=torch.float32)
    cam = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return normalize_minmax(cam)


def image_cams(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    model_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Normalized CAM of each image for its label, at the image's own resolution
    (:func:`raw_image_cams` then :func:`upsample_cams`).

    Args:
        images: uint8 ``[N, C, H, W]``; labels: ``[N]``.

    Returns:
        float32 ``[N, H, W]`` in [0, 1] on CPU.
    """
    imgs = as_tensor(images)
    raw = raw_image_cams(model, imgs, labels, model_size, mean, std, batch_size, device)
    return upsample_cams(raw, tuple(imgs.shape[-2:])) if len(raw) else torch.empty((0, *imgs.shape[-2:]))


@register("score", "cidd")
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
) -> CandidateCrops:
    """CIDD candidates of one class (Sec. 3.2, Algorithm 1 lines 2-8).

    Per image (visited in ascending ``source_id`` order): CAM for its label (Eq. 1,
    :func:`image_cams`); ``num_crop`` square random crops (:func:`rded.sample_crop_boxes`,
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
    conf = crop_confidence(model, imgs, chosen, out_size, mean, std, batch_size, device,
                           labels=lab, confidence=confidence)
    return CandidateCrops(
        class_index=class_index,
        source_id=np.repeat(ids[order], top_t),
        boxes=chosen.reshape(-1, 4).astype(np.int32),
        score=conf.reshape(-1).astype(np.float32),
    )


@register("select", "cidd")
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


def cidd_distill_class(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    source_ids: np.ndarray,
    ipc: int,
    beta: int | str,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    class_index: int,
    num_crop: int = 5,
    top_t: int = 1,
    grouping: str = "interleave",
    confidence: str = "true_class_ce",
    **score_kwargs: object,
) -> tuple[np.ndarray, list[list[Tile]], CandidateCrops]:
    """CIDD for one class: candidates -> ``beta * ipc`` least confident -> ``ipc`` images.

    Each synthetic image stitches ``beta`` crops (:func:`resolve_beta` at ``out_size``;
    ``"auto"`` follows RDED's factor) on a ``sqrt(beta)``-per-side grid with
    :func:`dd_assets.core.compose.compose_class` (Algorithm 1 lines 10-11).

    Returns:
        ``(images uint8 [ipc, C, out_size, out_size], tiles, candidates)``.
    """
    # Deviation/reading: the paper says only "similar to RDED" for how patches are grouped
    # into images; default is RDED's "interleave" order.
    beta = resolve_beta(beta, out_size)
    factor = beta_to_factor(beta)
    cands = cidd_candidates(
        model, images, labels, source_ids, num_crop, out_size, mean, std, seed, class_index,
        top_t=top_t, confidence=confidence, **score_kwargs,  # type: ignore[arg-type]
    )
    chosen = cidd_select(cands, beta * ipc, confidence=confidence)
    imgs = as_tensor(images)
    ids = np.asarray(source_ids, dtype=np.int64).reshape(-1)
    sources = {int(i): imgs[j] for j, i in enumerate(ids)}
    out, tiles = compose_class(sources, cands, chosen, ipc, out_size, factor, grouping=grouping)
    return out, tiles, cands


# ============================================================================ NRR (Sec. 3.3)


def nrr_mask(cam: torch.Tensor | np.ndarray, eps: float = 0.5) -> torch.Tensor:
    """Non-critical mask ``M = max(0, eps - C)`` (Eq. 4).

    Graded, not binary: 0 where ``C >= eps`` (critical pixels are frozen), ``eps - C``
    in ``(0, eps]`` elsewhere (the less critical, the larger the update weight).

    Args:
        cam: ``[..., H, W]`` normalized CAM in [0, 1].

    Returns:
        float32 tensor of the same shape.
    """
    c = torch.as_tensor(cam, dtype=torch.float32)
    return (eps - c).clamp_min(0.0)


class BNStatistics:
    """Forward hooks on every ``BatchNorm2d`` of ``model`` collecting the Eq. 3 terms.

    Usage::

        with BNStatistics(model) as bn:
            logits = model(x)
            loss_bn = bn.loss()

    Each hooked forward appends, per BN layer ``l``,
    ``||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2`` where ``mu_l`` /
    ``var_l`` are the per-channel mean / biased variance of the layer's *input* over
    ``(N, H, W)``.  Raises ``ValueError`` when the model has no BN layer with running stats.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(f"{NO_BN_MESSAGE} ({type(model).__name__} has no BatchNorm2d layer)")
        if any(m.running_mean is None or m.running_var is None for m in self.layers):
            raise ValueError(f"{NO_BN_MESSAGE} (a BatchNorm2d layer has track_running_stats=False)")
        self.terms: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()
        mu = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        assert module.running_mean is not None and module.running_var is not None
        self.terms.append(
            torch.linalg.vector_norm(mu - module.running_mean.float())
            + torch.linalg.vector_norm(var - module.running_var.float())
        )

    def __enter__(self) -> BNStatistics:
        self.terms = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def loss(self) -> torch.Tensor:
        """Sum of the collected terms (Eq. 3), then clears them."""
        if not self.terms:
            raise RuntimeError("no BatchNorm2d layer ran; call the model inside the context first")
        out = torch.stack(self.terms).sum()
        self.terms = []
        return out


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``L_bn`` of Eq. 3 for a batch ``x`` (normalized float ``[B, C, H, W]``).

    ``sum_l ||mu_l(x) - mu_l||_2 + ||sigma_l^2(x) - sigma_l^2||_2`` over all
    ``BatchNorm2d`` layers (SRe2L-style; biased batch variance).  The model runs in eval
    mode (BN normalizes with, and does not update, its running statistics; training flag
    restored).  Differentiable w.r.t. ``x``.

    Returns:
        scalar tensor.  Raises ``ValueError`` (:data:`NO_BN_MESSAGE`) without BN layers.
    """
    stats = BNStatistics(model)
    was_training = model.training
    model.eval()
    try:
        with stats:
            model(x)
            return stats.loss()
    finally:
        model.train(was_training)


@dataclass
class NRRConfig:
    """Refinement hyper-parameters (supplementary A unless marked).

    ``alpha_bn``: weight of ``L_bn`` (Eq. 2); ``eps``: CAM threshold of Eq. 4;
    ``lr``, ``betas``: Adam; ``iterations``: optimizer steps per batch; ``batch_size``:
    images optimized together (BN statistics are batch statistics); ``seed``: draws of the
    label-refinement mixing.  ``mask_on``: ``"grad"`` multiplies the pixel gradient by M
    before the Adam step; ``"step"`` multiplies Adam's parameter update by M (Eq. 5 read
    with Adam's step in place of ``eta * grad``).  Label refinement (Eq. 11-12):
    ``alpha_lr`` (1), ``r`` (0.4), ``mix`` (``"cutmix"`` | ``"mixup"``), ``mix_alpha``
    (Beta(a, a) for the mixing ratio; ours, the paper gives none).
    """

    alpha_bn: float = 10.0
    eps: float = 0.5
    lr: float = 0.05
    betas: tuple[float, float] = (0.5, 0.9)
    iterations: int = 2000
    batch_size: int = 100
    seed: int = 0
    mask_on: str = "grad"
    alpha_lr: float = 1.0
    r: float = DEFAULT_R
    mix: str = "cutmix"
    mix_alpha: float = 1.0


def _mix_batch(
    x_org: torch.Tensor, x_aug: torch.Tensor, mode: str, alpha: float, rng: np.random.Generator
) -> torch.Tensor:
    """``A(x_org, x_aug)`` of Eq. 6 with a per-sample ratio ``lam ~ Beta(alpha, alpha)``.

    CutMix: a box of area ``~(1 - lam) H W`` (CutMix rule, clipped to the image) of
    ``x_aug`` pasted into ``x_org``; Mixup: ``lam x_org + (1 - lam) x_aug``.
    """
    b, _, h, w = x_org.shape
    lam = rng.beta(alpha, alpha, size=b)
    if mode == "mixup":
        lam_t = torch.as_tensor(lam, dtype=x_org.dtype, device=x_org.device).view(b, 1, 1, 1)
        return lam_t * x_org + (1.0 - lam_t) * x_aug
    if mode != "cutmix":
        raise ValueError(f"unknown mix {mode!r}; use 'cutmix' or 'mixup'")
    cut_h = (h * np.sqrt(1.0 - lam)).astype(np.int64)
    cut_w = (w * np.sqrt(1.0 - lam)).astype(np.int64)
    cy = rng.integers(0, h, size=b)
    cx = rng.integers(0, w, size=b)
    y0, y1 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    x0, x1 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    box = (
        (rows >= torch.from_numpy(y0).view(b, 1, 1)) & (rows < torch.from_numpy(y1).view(b, 1, 1))
        & (cols >= torch.from_numpy(x0).view(b, 1, 1)) & (cols < torch.from_numpy(x1).view(b, 1, 1))
    )
    return torch.where(box[:, None].to(x_org.device), x_aug, x_org)


def refine(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    teacher: nn.Module,
    cam: np.ndarray | torch.Tensor | None,
    cfg: NRRConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    label_refine: bool = False,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> np.ndarray:
    """Non-Critical Region Refinement of synthetic images (Eq. 2-5; Eq. 11-12 optionally).

    Images are refined in consecutive batches of ``cfg.batch_size`` (index order), each
    for ``cfg.iterations`` steps of a fresh Adam over the *normalized* float pixels::

        L = L_ce(T(x), y) + alpha_bn * L_bn(x)                        (Eq. 2, 3)
          [+ alpha_lr * L_lr(A(x, x[perm]))]                         (Eq. 11, 12; label_refine)
        g = dL/dx;  x <- Adam step with gradient M * g  (mask_on="grad")
                    x <- x + M * AdamStep(g)            (mask_on="step")   (Eq. 5)
        x <- clamp(x, per-channel valid range of [0, 1] pixels)

    ``M = nrr_mask(cam, eps)`` is broadcast over channels; pixels with ``M = 0`` get a
    zero gradient (Adam's moments stay 0, its step is exactly 0) resp. a zero update, so
    they come back bit-identical.  The teacher runs in eval mode (flag restored); only
    the pixels receive gradients.

    Args:
        images: uint8 ``[N, C, H, W]`` synthetic images (e.g. from CIDD).
        labels: ``[N]`` int64 class of each image.
        teacher: model with ``BatchNorm2d`` layers (else ``ValueError``), on ``device``.
        cam: ``[N, H, W]`` CAM in [0, 1] of each image for its label, or ``None`` to
            compute it with :func:`class_activation_maps` on the input images (Sec. 3.3:
            "the CAM matrix C of (x, y) using Eq. 1").
        label_refine: add ``alpha_lr * L_lr`` (Eq. 11-12).
        on_step: ``on_step(batch_index, iteration, {"loss", "ce", "bn"[, "lr"]})`` per step.

    Returns:
        uint8 ``[N, C, H, W]`` numpy array.
    """
    # Deviation/reading: Eq. 5 is a plain gradient step while supplementary A uses Adam.
    # Adam normalizes each pixel's gradient by its own running RMS, so with the default
    # mask_on="grad" a constant per-pixel factor M cancels out: only M = 0 vs M > 0
    # matters (frozen vs free pixel).  mask_on="step" keeps the graded weighting of Eq. 5
    # by scaling Adam's update instead.  The paper mentions no LR schedule, jitter/flip
    # augmentation or per-layer BN weights (SRe2L uses them): none here.
    imgs = as_tensor(images)
    n, c, h, w = imgs.shape
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"{n} images but {lab.shape[0]} labels")
    if cfg.mask_on not in ("grad", "step"):
        raise ValueError(f"unknown mask_on {cfg.mask_on!r}; use 'grad' or 'step'")
    if cfg.iterations < 0 or cfg.batch_size < 1:
        raise ValueError(f"need iterations >= 0 and batch_size >= 1, got {cfg.iterations}, {cfg.batch_size}")
    stats = BNStatistics(teacher)  # raises the no-BN error before any work
    device = torch.device(device)
    if cam is None:
        cam_t = image_cams(teacher, imgs, lab, h, mean, std, cfg.batch_size, device)
    else:
        cam_t = torch.as_tensor(np.asarray(cam) if not isinstance(cam, torch.Tensor) else cam).float().cpu()
    if tuple(cam_t.shape) != (n, h, w):
        raise ValueError(f"cam must be [N, H, W] = {(n, h, w)}, got {tuple(cam_t.shape)}")
    mask_all = nrr_mask(cam_t, cfg.eps)[:, None]  # [N, 1, H, W]
    m_ = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s_ = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    lo, hi = (0.0 - m_) / s_, (1.0 - m_) / s_
    rng = np.random.default_rng(cfg.seed)
    out = torch.empty((n, c, h, w), dtype=torch.uint8)
    was_training = teacher.training
    teacher.eval()
    try:
        for bi, start in enumerate(range(0, n, cfg.batch_size)):
            sl = slice(start, min(start + cfg.batch_size, n))
            x = to_model_input(imgs[sl], mean, std, device).requires_grad_(True)
            y = lab[sl].to(device)
            mask = mask_all[sl].to(device)
            opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas)
            for it in range(cfg.iterations):
                with stats:
                    logits = teacher(x)
                    l_bn = stats.loss()
                l_ce = F.cross_entropy(logits, y)
                loss = l_ce + cfg.alpha_bn * l_bn
                parts = {"ce": float(l_ce.detach()), "bn": float(l_bn.detach())}
                if label_refine:
                    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(device)
                    # Deviation/reading: "update x_org by Eq. 11" -> the partner x_aug is
                    # detached; gradients of L_lr reach the pixels through x_org only.
                    x_mix = _mix_batch(x, x[perm].detach(), cfg.mix, cfg.mix_alpha, rng)
                    d_org, d_aug = ce_distances(teacher(x_mix), y, y[perm])
                    l_lr = sce_loss(d_org, d_aug, cfg.r)
                    loss = loss + cfg.alpha_lr * l_lr
                    parts["lr"] = float(l_lr.detach())
                (grad,) = torch.autograd.grad(loss, x)
                with torch.no_grad():
                    if cfg.mask_on == "grad":
                        x.grad = grad * mask
                        opt.step()
                    else:
                        before = x.detach().clone()
                        x.grad = grad
                        opt.step()
                        x.copy_(before + mask * (x - before))
                    x.copy_(torch.minimum(torch.maximum(x, lo), hi))
                if on_step is not None:
                    parts["loss"] = float(loss.detach())
                    on_step(bi, it, parts)
            out[sl] = to_uint8(x.detach() * s_ + m_).cpu()
    finally:
        teacher.train(was_training)
    return out.numpy()
