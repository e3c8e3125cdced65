"""UDD: dataset distillation by mining under-utilized regions (core, pure torch/numpy).

Paper: "UDD: Dataset Distillation via Mining Underutilized Regions" (Wang, Zhang, Cheng),
/work/shared/papers/004_5acb7ff699889e9c.txt: Sec. 2.2-2.5, Eq. 1-10, Algorithm 1,
App. A (hyper-parameters) and App. E (mUE, Eq. 11-12).  Gradient matching itself lives in
:mod:`dd_assets.methods.gradient_matching`.

Per outer iteration a proxy network is randomly re-initialized (Algorithm 1 line 2); per
training step ``t`` and class ``c``:

1. **Candidate regions** (Sec. 2.2): ``N = 12`` windows per synthetic image, sizes
   ``H/3, H/2, 2H/3`` (square fractions of each side) in the four corners ->
   :func:`candidate_windows`.
2. **Under-used region search**, ``P`` lowest-scoring windows per image ->
   :func:`search_underused`:

   * response policy (Sec. 2.3, Eq. 1): ONE forward pass over the whole image and each
     window's score read off the last feature map (Fig. 4b), either the mean activation
     (:func:`activation_response`) or the mean gradient magnitude of the CE loss w.r.t. the
     feature map (:func:`gradient_response`);
   * data-jittering policy (Sec. 2.4, Eq. 2-4): ``M`` jittered copies (Gaussian noise by
     default), ``sigma_n = |Lambda_n - mean_m Lambda_hat_{n,m}|`` -> :func:`jitter_utilization`.

3. The chosen windows are cropped and bilinearly upsampled to ``H x W``
   (:func:`crop_upsample`, differentiable) and join the originals:
   ``S_c^train = S_c + R*`` (:func:`training_batch`).
4. ``L_syn = L_g + L_c`` (Eq. 10): gradient matching (Eq. 9) plus the category-wise feature
   contrastive loss (Eq. 7, :func:`cfc_loss`) against class centres kept as a moving average
   (Eq. 8, :class:`ClassCentres`).  The pixels take one SGD step per training step.
5. The proxy network takes an SGD step on a real mini-batch (Eq. 6, Algorithm 1 lines 9-10).

:func:`udd_distill` (``("synthesize", "udd")``) runs the whole loop; flags ``policy``
(``none`` / ``response`` / ``jitter``) and ``cfc`` give the ablation rows, and
:func:`dc_distill` (``("synthesize", "dc")``) is the plain gradient-matching row
(``policy="none"``, ``cfc=False``).  :func:`set_utilization` computes mUE (Eq. 11-12).

Hyper-parameters (App. A): ``N = 12, M = 2, P = 8, tau = 0.7, alpha = 0.5``; synthetic
learning rate 0.005 halved at iterations 1200, 1600, 1800 of 2000; proxy network lr 0.01
(fixed).  Everything else follows IDC (Kim et al., ICML'22), which UDD builds on; see
``docs/udd.md`` for the sources and every deliberate deviation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.methods.class_gradients import LayerTape, batched_support
from dd_assets.methods.gradient_matching import (
    DISTANCES,
    MATCH_PARAMS,
    Normalizer,
    RealPool,
    RealSource,
    fresh_network,
    gradient_distance,
    network_sgd,
    network_step,
    parameter_gradients,
    step_lr,
    to_unit_float,
)
from dd_assets.methods.registry import register

WINDOW_FRACTIONS = (1.0 / 3.0, 1.0 / 2.0, 2.0 / 3.0)
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
POLICIES = ("none", "response", "jitter")
RESPONSES = ("activation", "gradient")
JITTERS = ("gaussian", "uniform", "salt_pepper")
NET_TRAIN_ON = ("real", "synthetic")
OPTIMIZE_IN = ("pixels", "normalized")
VALUE_RANGES = ("zero_max", "min_max")
MUE_INTERVALS = (5, 6, 7, 8, 9, 10)

Features = Callable[[torch.Tensor], torch.Tensor]
Head = Callable[[torch.Tensor], torch.Tensor]

# ============================================================================ regions (Sec. 2.2)


def candidate_windows(height: int, width: int, fractions: Sequence[float] = WINDOW_FRACTIONS) -> np.ndarray:
    """The candidate regions of Sec. 2.2 for an ``height x width`` image.

    For every fraction ``f`` (default ``1/3, 1/2, 2/3``: small, medium, large) a window of
    ``round(f * H) x round(f * W)`` pixels (nearest integer, halves rounded up; at least 1)
    is placed in the top-left, top-right, bottom-left and bottom-right corner.

    Returns:
        int64 ``[4 * len(fractions), 4]`` half-open ``(x0, y0, x1, y1)`` boxes, size-major
        (all corners of the first fraction, then the next), corners in :data:`CORNERS` order.
        E.g. ``H = W = 12``: sizes 4, 6, 8; window 1 (small, top-right) is ``(8, 0, 12, 4)``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")
    if len(fractions) == 0:
        raise ValueError("window fractions must not be empty")
    out = []
    for f in fractions:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"window fractions must be in (0, 1], got {f}")
        sh = min(height, max(1, int(math.floor(height * float(f) + 0.5 + 1e-9))))
        sw = min(width, max(1, int(math.floor(width * float(f) + 0.5 + 1e-9))))
        out += [
            (0, 0, sw, sh),
            (width - sw, 0, width, sh),
            (0, height - sh, sw, height),
            (width - sw, height - sh, width, height),
        ]
    return np.asarray(out, dtype=np.int64)


def _cell_overlap(lo: float, hi: float, n_px: int, n_cells: int) -> np.ndarray:
    """Fraction of each of ``n_cells`` equal cells over ``[0, n_px)`` covered by ``[lo, hi)``."""
    step = n_px / n_cells
    edges = np.arange(n_cells + 1, dtype=np.float64) * step
    cover = np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1])
    return np.clip(cover, 0.0, None) / step


def footprint_weights(
    windows: np.ndarray, image_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Where each window falls on a ``gh x gw`` feature grid (Fig. 4b, "windows placed on the
    feature map, downsampled accordingly").

    Feature cell ``(i, j)`` is taken to cover pixels ``[i H/gh, (i+1) H/gh) x [j W/gw, (j+1) W/gw)``;
    a window's weight on a cell is the covered fraction of the cell's rows times that of its
    columns (exactly 0/1 when the window is aligned to the grid).

    Returns:
        ``(rows [N, gh], cols [N, gw])`` float64 coverage fractions.
    """
    h, w = image_hw
    gh, gw = grid_hw
    b = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    rows = np.stack([_cell_overlap(y0, y1, h, gh) for _, y0, _, y1 in b])
    cols = np.stack([_cell_overlap(x0, x1, w, gw) for x0, _, x1, _ in b])
    return rows, cols


def window_means(maps: torch.Tensor, windows: np.ndarray, image_hw: tuple[int, int]) -> torch.Tensor:
    """Mean of each map over each window's footprint (coverage-weighted, :func:`footprint_weights`).

    Args:
        maps: ``[B, gh, gw]`` response maps (one per image).
        windows: ``[N, 4]`` boxes in image pixels; image_hw: ``(H, W)`` of the image.

    Returns:
        ``[B, N]`` (same dtype/device as ``maps``).
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, gh, gw], got {tuple(maps.shape)}")
    rows, cols = footprint_weights(windows, image_hw, (maps.shape[-2], maps.shape[-1]))
    r = torch.as_tensor(rows, dtype=maps.dtype, device=maps.device)
    c = torch.as_tensor(cols, dtype=maps.dtype, device=maps.device)
    area = r.sum(1) * c.sum(1)  # [N]
    return torch.einsum("bhw,nh,nw->bn", maps, r, c) / area


# ============================================================================ responses (Sec. 2.3-2.4)


def activation_maps(features: Features, x: torch.Tensor) -> torch.Tensor:
    """Channel mean of ``|features(x)|``: ``[B, C, H, W]`` -> ``[B, gh, gw]``.

    ``features`` maps a batch to a feature map ``[B, K, gh, gw]`` (e.g. a ConvNet's
    ``forward_features`` after normalization).  The absolute value is a no-op on post-ReLU
    features and keeps the response an intensity for any other extractor.
    """
    fmap = features(x)
    if fmap.ndim != 4:
        raise ValueError(f"features must return [B, K, h, w] maps, got {tuple(fmap.shape)}")
    return fmap.abs().mean(1)


def activation_response(features: Features, x: torch.Tensor, windows: np.ndarray) -> torch.Tensor:
    """Activation ranking (Sec. 2.3, Eq. 1): ``Lambda_n`` = mean activation over window ``n``.

    One forward pass over the whole images ``x [B, C, H, W]`` (Fig. 4b); no gradient.

    Returns:
        ``[B, N]``.
    """
    with torch.no_grad():
        return window_means(activation_maps(features, x), windows, (x.shape[-2], x.shape[-1]))


def gradient_response(
    features: Features, head: Head, x: torch.Tensor, labels: torch.Tensor, windows: np.ndarray
) -> torch.Tensor:
    """Gradient ranking (Sec. 2.3): ``Lambda_n`` = mean ``|dL/dA|`` over window ``n``.

    ``L = CE(head(A), labels)`` (summed over the batch) and ``A = features(x)`` the feature map;
    ``|dL/dA|`` is averaged over channels and read off per window like the activations.  Only
    the feature map receives the gradient (the network's ``.grad`` fields are not touched).

    Args:
        x: ``[B, C, H, W]``; labels: ``[B]``; head: feature map -> logits ``[B, K]``.

    Returns:
        ``[B, N]``.
    """
    with torch.enable_grad():
        with torch.no_grad():
            fmap = features(x)
        if fmap.ndim != 4:
            raise ValueError(f"features must return [B, K, h, w] maps, got {tuple(fmap.shape)}")
        fmap = fmap.detach().requires_grad_(True)
        loss = F.cross_entropy(head(fmap), labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, fmap)
    return window_means(g.abs().mean(1), windows, (x.shape[-2], x.shape[-1]))


def jitter_images(
    x: torch.Tensor,
    copies: int,
    kind: str = "gaussian",
    std: float = 0.1,
    prob: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``M`` jittered copies of a batch (Eq. 2: ``R_hat_{n,m} = jitter(R_n)``), in pixel units.

    ``"gaussian"``: ``x + std * N(0, 1)``; ``"uniform"``: ``x + U(-std, std)``;
    ``"salt_pepper"``: each pixel (all channels) independently becomes 0 or 1 (equally likely)
    with probability ``prob``.  Noise is drawn on the CPU from ``generator`` and moved to
    ``x.device``.

    Args:
        x: ``[B, C, H, W]`` pixels in [0, 1].

    Returns:
        ``[M, B, C, H, W]``.
    """
    if copies < 1:
        raise ValueError(f"jitter_copies must be >= 1, got {copies}")
    shape = (copies,) + tuple(x.shape)
    if kind == "gaussian":
        noise = torch.randn(shape, generator=generator) * float(std)
        return x.unsqueeze(0) + noise.to(x.device, x.dtype)
    if kind == "uniform":
        noise = (torch.rand(shape, generator=generator) * 2.0 - 1.0) * float(std)
        return x.unsqueeze(0) + noise.to(x.device, x.dtype)
    if kind == "salt_pepper":
        b, _, h, w = x.shape
        hit = torch.rand((copies, b, 1, h, w), generator=generator) < float(prob)
        salt = (torch.rand((copies, b, 1, h, w), generator=generator) < 0.5).to(x.dtype)
        return torch.where(hit.to(x.device), salt.to(x.device), x.unsqueeze(0))
    raise ValueError(f"unknown jitter {kind!r}; choose one of {', '.join(JITTERS)}")


def jitter_utilization(
    features: Features,
    x: torch.Tensor,
    windows: np.ndarray,
    copies: int = 2,
    kind: str = "gaussian",
    std: float = 0.1,
    prob: float = 0.05,
    generator: torch.Generator | None = None,
    jittered: torch.Tensor | None = None,
) -> torch.Tensor:
    """Data-jittering utilization (Sec. 2.4, Eq. 2-4) of every window of every image.

    ``Lambda_n`` is the activation response of window ``n`` of the original image,
    ``Lambda_hat_{n,m}`` that of the ``m``-th jittered copy (same one-pass scheme, Sec. 2.3;
    the copies are jittered whole and read off per window), ``Lambda_bar_n = mean_m
    Lambda_hat_{n,m}`` (Eq. 3) and ``sigma_n = |Lambda_n - Lambda_bar_n|`` (Eq. 4).  Originals
    and copies go through one batched forward pass, without gradient.

    Args:
        x: ``[B, C, H, W]`` pixels; windows: ``[N, 4]``.
        jittered: ``[M, B, C, H, W]`` copies already drawn (:func:`jitter_images`); then
            ``copies``/``kind``/``std``/``prob``/``generator`` are not used.

    Returns:
        ``sigma [B, N]`` (low = the network is insensitive there = under-used).
    """
    b = x.shape[0]
    with torch.no_grad():
        xj = jitter_images(x, copies, kind, std, prob, generator) if jittered is None else jittered
        copies = xj.shape[0]
        maps = activation_maps(features, torch.cat([x, xj.flatten(0, 1)]))
        lam = window_means(maps, windows, (x.shape[-2], x.shape[-1])).view(1 + copies, b, -1)
        return (lam[0] - lam[1:].mean(0)).abs()


def select_underused(scores: torch.Tensor, top_p: int) -> torch.Tensor:
    """The ``top_p`` LOWEST-scoring windows of each image (ties: lower window index first).

    Args:
        scores: ``[B, N]``.

    Returns:
        int64 ``[B, top_p]`` window indices, ascending score.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, N], got {tuple(scores.shape)}")
    if not 0 <= top_p <= scores.shape[1]:
        raise ValueError(f"top_p must be in [0, N={scores.shape[1]}], got {top_p}")
    if torch.isnan(scores).any():
        raise ValueError("region scores contain NaN")
    order = torch.from_numpy(np.argsort(scores.detach().cpu().numpy(), axis=1, kind="stable"))
    return order[:, :top_p].to(torch.long)


@dataclass
class RegionSearch:
    """Result of :func:`search_underused`: ``choice [B, P]`` window indices (lowest first),
    ``scores [B, N]`` the policy's scores (None for ``policy="none"``)."""

    choice: torch.Tensor
    scores: torch.Tensor | None


def search_underused(
    features: Features,
    x: torch.Tensor,
    windows: np.ndarray,
    top_p: int,
    policy: str = "jitter",
    response: str = "activation",
    head: Head | None = None,
    labels: torch.Tensor | None = None,
    jitter: str = "gaussian",
    jitter_copies: int = 2,
    jitter_std: float = 0.1,
    jitter_prob: float = 0.05,
    generator: torch.Generator | None = None,
) -> RegionSearch:
    """Pick the ``top_p`` under-used candidate regions of every image (Sec. 2.3 / 2.4).

    ``policy="response"``: scores from :func:`activation_response` or, with
    ``response="gradient"``, :func:`gradient_response` (needs ``head`` and ``labels``);
    ``policy="jitter"``: scores ``sigma`` from :func:`jitter_utilization`; ``policy="none"``:
    no region (``choice`` is ``[B, 0]``).  ``x [B, C, H, W]`` pixels (no gradient flows).
    """
    b = x.shape[0]
    x = x.detach()
    if policy == "none":
        return RegionSearch(torch.zeros((b, 0), dtype=torch.long), None)
    if policy == "response":
        if response == "activation":
            scores = activation_response(features, x, windows)
        elif response == "gradient":
            if head is None or labels is None:
                raise ValueError("response='gradient' needs head and labels")
            scores = gradient_response(features, head, x, labels, windows)
        else:
            raise ValueError(f"unknown response {response!r}; choose one of {', '.join(RESPONSES)}")
    elif policy == "jitter":
        scores = jitter_utilization(features, x, windows, jitter_copies, jitter, jitter_std, jitter_prob, generator)
    else:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return RegionSearch(select_underused(scores, top_p), scores)


def crop_upsample(x: torch.Tensor, windows: np.ndarray, choice: torch.Tensor) -> torch.Tensor:
    """Crop the chosen windows and bilinearly upsample them to the full size (Sec. 2.4, Fig. 2).

    Differentiable: gradients flow back to the pixels of ``x`` inside the chosen windows.
    Bilinear with ``align_corners=False`` and no antialiasing (windows are never larger than
    the image).

    Args:
        x: ``[B, C, H, W]``; windows: ``[N, 4]`` boxes; choice: int ``[B, P]`` window indices.

    Returns:
        ``[B * P, C, H, W]``, image-major (row ``i * P + j`` is window ``choice[i, j]`` of image ``i``).
    """
    b, _, h, w = x.shape
    choice = torch.as_tensor(choice, dtype=torch.long).cpu()
    if choice.ndim != 2 or choice.shape[0] != b:
        raise ValueError(f"choice must be [B={b}, P], got {tuple(choice.shape)}")
    p = choice.shape[1]
    if p == 0:
        return x[:0]
    flat = choice.reshape(-1)
    if int(flat.min()) < 0 or int(flat.max()) >= len(windows):
        raise ValueError(f"choice holds window indices outside [0, {len(windows)})")
    img_of = torch.arange(b).repeat_interleave(p)
    pieces, positions = [], []
    for n in torch.unique(flat).tolist():
        pos = torch.nonzero(flat == n).reshape(-1)
        x0, y0, x1, y1 = (int(v) for v in windows[n])
        patch = x[img_of[pos].to(x.device), :, y0:y1, x0:x1]
        pieces.append(F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False))
        positions.append(pos)
    order = torch.argsort(torch.cat(positions))
    return torch.cat(pieces)[order.to(x.device)]


def training_batch(x: torch.Tensor, windows: np.ndarray, choice: torch.Tensor) -> torch.Tensor:
    """``S^train`` of Fig. 2: the originals followed by their upsampled under-used regions.

    ``x [B, C, H, W]``, ``choice [B, P]`` -> ``[B * (1 + P), C, H, W]`` (differentiable).
    """
    return torch.cat([x, crop_upsample(x, windows, choice)])


# ============================================================================ CFC (Sec. 2.5, Eq. 7-8)


def cfc_loss(
    features: torch.Tensor,
    class_index: int,
    centres: torch.Tensor,
    tau: float = 0.7,
    valid: torch.Tensor | None = None,
    include_positive: bool = False,
) -> torch.Tensor:
    """Category-wise feature contrastive loss (Eq. 7) of one class batch.

    ``f_bar_c`` = mean of ``features`` (the embedded synthetic training batch of class ``c``);
    ``s_i = cos(f_bar_c, F_bar_i) / tau`` against every class centre::

        L_c = -log( exp(s_c) / sum_{i != c} exp(s_i) ) = -s_c + logsumexp_{i != c} s_i      (Eq. 7)

    The denominator excludes the positive as Eq. 7's indicator ``1[i != c]`` says;
    ``include_positive=True`` gives the InfoNCE / SimCLR form (``i`` over all classes).
    Centres are constants here (no gradient through them).  Classes with ``valid[i] = False``
    (no centre yet) are left out; with no negative left the loss is 0 (still in the graph).

    Args:
        features: ``[B, D]``; centres: ``[C, D]``; valid: bool ``[C]`` or None (all valid).

    Returns:
        scalar tensor.
    """
    if features.ndim != 2 or centres.ndim != 2 or features.shape[1] != centres.shape[1]:
        raise ValueError(f"features [B, D] and centres [C, D] expected, got {tuple(features.shape)}, {tuple(centres.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    num = centres.shape[0]
    if not 0 <= class_index < num:
        raise ValueError(f"class_index {class_index} outside [0, {num})")
    ok = torch.ones(num, dtype=torch.bool, device=centres.device) if valid is None else valid.to(centres.device)
    if not bool(ok[class_index]):
        raise ValueError(f"class {class_index} has no centre yet (valid[{class_index}] is False)")
    f = features.mean(0, keepdim=True)
    s = F.cosine_similarity(f, centres.detach().to(f.dtype), dim=1, eps=1e-8) / tau  # [C]
    neg = ok.clone()
    neg[class_index] = False
    if not bool(neg.any()):
        return f.sum() * 0.0
    denom = neg.clone()
    if include_positive:
        denom[class_index] = True
    return -s[class_index] + torch.logsumexp(s[denom], dim=0)


class ClassCentres:
    """Class-mean features as a moving average (Eq. 8): ``F_bar_c <- alpha F_bar_c + (1 - alpha) f_bar_c``.

    ``centres [C, D]`` (detached) and ``valid [C]`` (a centre has been set).  The first
    :meth:`update` of a class sets its centre to ``f_bar_c`` (no average with zeros).
    """

    def __init__(self, num_classes: int, dim: int, alpha: float = 0.5, device: torch.device | str = "cpu") -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.centres = torch.zeros((num_classes, dim), device=device)
        self.valid = torch.zeros(num_classes, dtype=torch.bool, device=device)

    def update(self, class_index: int, batch_mean: torch.Tensor) -> None:
        """Eq. 8 with ``batch_mean [D]`` = ``f_bar_c^t`` (detached)."""
        f = batch_mean.detach().reshape(-1).to(self.centres)
        if bool(self.valid[class_index]):
            self.centres[class_index] = self.alpha * self.centres[class_index] + (1.0 - self.alpha) * f
        else:
            self.centres[class_index] = f
            self.valid[class_index] = True


# ============================================================================ mUE (App. E, Eq. 11-12)


def utilization_entropy(maps: torch.Tensor, intervals: int, value_range: str = "zero_max") -> np.ndarray:
    """``UE^d`` (Eq. 11, as read in docs/udd.md) of every activation map.

    The values ``X`` of one map are split into ``d`` equal-width intervals of ``[0, max X]``
    (``"zero_max"``; ``"min_max"``: ``[min X, max X]``), ``p_i`` = share of the ``|X|`` values
    in interval ``i`` (the maximum falls in the last one) and
    ``UE^d = -(1 / log d) sum_i p_i log p_i`` in [0, 1] (0: every value in one interval; 1:
    evenly spread).  A constant map has ``UE^d = 0``.

    Args:
        maps: ``[B, ...]`` activation maps (flattened per image); ``"zero_max"`` needs them >= 0.
        intervals: ``d >= 2``.

    Returns:
        float64 ``[B]``.
    """
    d = int(intervals)
    if d < 2:
        raise ValueError(f"intervals must be >= 2, got {intervals}")
    v = maps.detach().double().reshape(maps.shape[0], -1).cpu()
    if value_range == "zero_max":
        if bool((v < 0).any()):
            raise ValueError("value_range='zero_max' needs non-negative maps; use 'min_max'")
        lo = torch.zeros(v.shape[0], 1, dtype=v.dtype)
    elif value_range == "min_max":
        lo = v.min(1, keepdim=True).values
    else:
        raise ValueError(f"unknown value_range {value_range!r}; choose one of {', '.join(VALUE_RANGES)}")
    span = v.max(1, keepdim=True).values - lo
    u = torch.where(span > 0, (v - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(v))
    bins = (u * d).floor().clamp(0, d - 1).long()
    counts = torch.zeros(v.shape[0], d, dtype=v.dtype).scatter_add_(1, bins, torch.ones_like(v))
    p = counts / v.shape[1]
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return (-plogp.sum(1) / math.log(d)).numpy()


@dataclass
class Utilization:
    """mUE of a synthetic set: ``mue`` (mean over images) and ``per_image [N]`` (Eq. 12 per image)."""

    mue: float
    per_image: np.ndarray


def mean_utilization_entropy(
    maps: torch.Tensor, intervals: Sequence[int] = MUE_INTERVALS, value_range: str = "zero_max"
) -> Utilization:
    """mUE (Eq. 12): ``UE^d`` averaged over ``d in D`` (default ``D = {5, ..., 10}``, Fig. 7),
    per image, and the mean over the images.  ``maps [B, ...]``."""
    if len(intervals) == 0:
        raise ValueError("intervals must not be empty")
    per = np.mean([utilization_entropy(maps, d, value_range) for d in intervals], axis=0)
    return Utilization(mue=float(per.mean()) if per.size else float("nan"), per_image=per)


def set_utilization(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    intervals: Sequence[int] = MUE_INTERVALS,
    value_range: str = "zero_max",
    upsample: bool = True,
    batch_size: int = 256,
) -> Utilization:
    """mUE of a synthetic set under ``model`` (App. E).

    Activation map of an image = channel mean of ``|model.forward_features(x)|``, bilinearly
    upsampled to the image size when ``upsample`` (the maps of Fig. 3 / Fig. 9 are shown at
    image size); then :func:`mean_utilization_entropy`.  Eval mode, no gradient (flag restored).

    Args:
        images: uint8 or [0, 1] float ``[N, C, H, W]``; ``mean``/``std``: normalization.

    Returns:
        :class:`Utilization`.
    """
    _check_feature_model(model, "model")
    x_all = to_unit_float(images, "images")
    norm = Normalizer(mean, std, x_all.shape[1], device)
    maps = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start : start + batch_size].to(device)
            m = activation_maps(model.forward_features, norm(x))
            if upsample:
                m = F.interpolate(m[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
            maps.append(m.cpu())
    return mean_utilization_entropy(torch.cat(maps), intervals, value_range)


# ============================================================================ the distillation loop


@dataclass
class UDDConfig:
    """UDD / gradient-matching hyper-parameters.  Source of each default in brackets.

    Loops (Algorithm 1): ``iterations`` outer iterations, each with a freshly initialized proxy
    network [App. A: 2000]; ``inner_steps`` training steps per network [IDC inner_loop 100;
    UDD gives none].  Each training step: one matching step of every class, then
    ``net_steps`` SGD steps of the network [Alg. 1: 1] on ``net_batch_size`` images [IDC 64],
    real (Eq. 6, ``net_train_on="real"``) or synthetic (Eq. 5, DC); network SGD lr
    ``net_lr`` [App. A: 0.01, fixed], ``net_momentum`` 0.9 and ``net_weight_decay`` 5e-4 [IDC].

    Pixels: SGD ``lr_img`` [App. A: 0.005], ``momentum_img`` [DC/IDC: 0.5], multiplied by
    ``lr_gamma`` [0.5] at the ``lr_milestones`` fractions of ``iterations`` [App. A: 1200,
    1600, 1800 of 2000]; ``optimize_in="pixels"`` optimizes [0, 1] pixels (IDC) and
    ``"normalized"`` the normalized model input (DC); ``clamp`` clips to [0, 1] pixels at
    every outer iteration and at the end [IDC].

    Matching (Eq. 9): ``batch_real`` real images per class [IDC 64]; ``batch_syn_max``: at most
    this many images of ``S_c^train`` per matching step, a random subset otherwise [IDC 128;
    None = all]; ``distance`` (``"mse"`` Eq. 9 | ``"dc_cosine"`` DC) and ``match_params``
    (``"all"`` Eq. 9 | ``"conv"`` IDC).

    Regions (Sec. 2.2-2.4): ``policy`` (``"none"`` | ``"response"`` | ``"jitter"`` [Sec. 3:
    main results use jitter]); ``response`` (``"activation"`` | ``"gradient"``);
    ``window_fractions`` [Sec. 2.2: 1/3, 1/2, 2/3 -> N = 12]; ``top_p`` windows per image
    [App. A: P = 8]; ``jitter`` [Sec. 2.4: gaussian], ``jitter_copies`` [App. A: M = 2],
    ``jitter_std`` (pixel units; also the half-width of ``"uniform"``) [ours: 0.1],
    ``jitter_prob`` (salt and pepper) [ours: 0.05].

    CFC (Eq. 7-8, 10): ``cfc`` on/off, ``cfc_weight`` [Eq. 10: 1], ``tau`` [App. A: 0.7],
    ``alpha`` [App. A: 0.5], ``cfc_include_positive`` [Eq. 7: False].

    Proxy network: ``arch`` / ``arch_kwargs`` for :func:`dd_assets.models.create_model` when no
    ``model_fn`` is given [App. A: ConvNet-3; instance norm as DC/IDC].
    ``mue_intervals``: ``D`` of Eq. 12 [Fig. 7: 5..10].  ``seed``: every random draw.
    """

    iterations: int = 2000
    inner_steps: int = 100
    lr_img: float = 0.005
    momentum_img: float = 0.5
    lr_milestones: tuple[float, ...] = (0.6, 0.8, 0.9)
    lr_gamma: float = 0.5
    optimize_in: str = "pixels"
    clamp: bool = True
    batch_real: int = 64
    batch_syn_max: int | None = 128
    distance: str = "mse"
    match_params: str = "all"
    net_train_on: str = "real"
    net_lr: float = 0.01
    net_momentum: float = 0.9
    net_weight_decay: float = 5e-4
    net_batch_size: int = 64
    net_steps: int = 1
    policy: str = "jitter"
    response: str = "activation"
    window_fractions: tuple[float, ...] = WINDOW_FRACTIONS
    top_p: int = 8
    jitter: str = "gaussian"
    jitter_copies: int = 2
    jitter_std: float = 0.1
    jitter_prob: float = 0.05
    cfc: bool = True
    cfc_weight: float = 1.0
    tau: float = 0.7
    alpha: float = 0.5
    cfc_include_positive: bool = False
    arch: str = "convnet_d3"
    arch_kwargs: dict[str, Any] = field(default_factory=lambda: {"norm": "instance"})
    mue_intervals: tuple[int, ...] = MUE_INTERVALS
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        checks: list[tuple[str, bool, str]] = [
            ("iterations", self.iterations >= 0, ">= 0"),
            ("inner_steps", self.inner_steps >= 1, ">= 1"),
            ("lr_img", self.lr_img > 0, "> 0"),
            ("momentum_img", 0 <= self.momentum_img < 1, "in [0, 1)"),
            ("lr_gamma", self.lr_gamma > 0, "> 0"),
            ("lr_milestones", all(0 <= f <= 1 for f in self.lr_milestones), "fractions in [0, 1]"),
            ("optimize_in", self.optimize_in in OPTIMIZE_IN, f"one of {OPTIMIZE_IN}"),
            ("batch_real", self.batch_real >= 1, ">= 1"),
            ("batch_syn_max", self.batch_syn_max is None or self.batch_syn_max >= 1, "None or >= 1"),
            ("distance", self.distance in DISTANCES, f"one of {DISTANCES}"),
            ("match_params", self.match_params in MATCH_PARAMS, f"one of {MATCH_PARAMS}"),
            ("net_train_on", self.net_train_on in NET_TRAIN_ON, f"one of {NET_TRAIN_ON}"),
            ("net_lr", self.net_lr >= 0, ">= 0"),
            ("net_batch_size", self.net_batch_size >= 1, ">= 1"),
            ("net_steps", self.net_steps >= 0, ">= 0"),
            ("policy", self.policy in POLICIES, f"one of {POLICIES}"),
            ("response", self.response in RESPONSES, f"one of {RESPONSES}"),
            ("window_fractions", len(self.window_fractions) > 0
             and all(0 < f <= 1 for f in self.window_fractions), "non-empty fractions in (0, 1]"),
            ("top_p", 0 <= self.top_p <= 4 * len(self.window_fractions),
             f"in [0, N = 4 * len(window_fractions) = {4 * len(self.window_fractions)}]"),
            ("jitter", self.jitter in JITTERS, f"one of {JITTERS}"),
            ("jitter_copies", self.jitter_copies >= 1, ">= 1"),
            ("jitter_std", self.jitter_std >= 0, ">= 0"),
            ("jitter_prob", 0 <= self.jitter_prob <= 1, "in [0, 1]"),
            ("cfc_weight", self.cfc_weight >= 0, ">= 0"),
            ("tau", self.tau > 0, "> 0"),
            ("alpha", 0 <= self.alpha <= 1, "in [0, 1]"),
            ("mue_intervals", len(self.mue_intervals) > 0 and all(d >= 2 for d in self.mue_intervals),
             "non-empty, each >= 2"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"UDDConfig.{name} must be {want}, got {getattr(self, name)!r}")


def dc_reference_config(ipc: int, **overrides: Any) -> UDDConfig:
    """The original DC recipe (Zhao et al., ICLR'21) as a :class:`UDDConfig`.

    1000 iterations; (matching steps, network epochs) per network = (1, 1) / (10, 50) /
    (50, 10) for IPC 1 / 10 / 50; pixel SGD lr 0.1, momentum 0.5, no schedule, optimized in
    normalized space, no clamping; network SGD lr 0.01, momentum 0.5, trained on the
    synthetic set (Eq. 5, one step per epoch: batch 256 holds a small set); 256 real images
    per class; DC's per-output-channel cosine distance; no regions, no CFC.
    """
    loops = {1: (1, 1), 10: (10, 50), 50: (50, 10)}
    if ipc not in loops:
        raise ValueError(f"dc_reference_config knows ipc 1, 10, 50 (DC's table), got {ipc}; set the loops yourself")
    outer, inner = loops[ipc]
    cfg = UDDConfig(
        iterations=1000, inner_steps=outer, net_steps=inner, lr_img=0.1, momentum_img=0.5, lr_milestones=(),
        optimize_in="normalized", clamp=False, batch_real=256, batch_syn_max=None, distance="dc_cosine",
        match_params="all", net_train_on="synthetic", net_lr=0.01, net_momentum=0.5, net_weight_decay=0.0,
        net_batch_size=256, policy="none", cfc=False,
    )
    return dataclasses.replace(cfg, **overrides)


@dataclass
class UDDResult:
    """Output of :func:`udd_distill`.

    ``images``: float ``[N, C, H, W]`` pixels in [0, 1] (clamped), CPU, in the input order;
    ``labels`` int64 ``[N]``.  ``loss_curve``: one dict per outer iteration (``iteration``,
    ``loss`` = mean ``L_syn``, ``loss_g``, ``loss_c``, ``net_loss``, ``lr``, ``seconds``).
    ``utilization`` / ``utilization_per_image``: mUE (:func:`set_utilization`) of ``images``
    under the last proxy network; ``utilization_init``: mUE of the initial images under the
    same network.  ``region_counts [N_windows]``: how often each candidate window was mined.
    """

    images: torch.Tensor
    labels: torch.Tensor
    loss_curve: list[dict[str, float]]
    utilization: float
    utilization_per_image: np.ndarray
    utilization_init: float
    region_counts: np.ndarray
    config: UDDConfig
    seconds: float

    def images_uint8(self) -> np.ndarray:
        """uint8 ``[N, C, H, W]`` (rounded)."""
        return (self.images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _check_feature_model(model: nn.Module, name: str) -> None:
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(
            f"{name} must build a model with forward_features / forward_head (ConvNet, timm); "
            f"got {type(model).__name__}"
        )


def _embed(model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """Penultimate features ``[B, D]`` from a feature map (``phi_theta`` of Eq. 7)."""
    return model.forward_head(fmap, pre_logits=True).flatten(1)


@dataclass
class _StepContext:
    """What one matching step of Algorithm 1 (lines 4-8) needs, per outer iteration."""

    cfg: UDDConfig
    model: nn.Module
    norm: Normalizer
    windows: np.ndarray
    pool: RealPool
    g: torch.Generator
    device: torch.device
    centres: ClassCentres | None
    region_counts: np.ndarray

    def features(self, xp: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.norm(xp))

    @property
    def mining(self) -> bool:
        return self.cfg.policy != "none" and self.cfg.top_p > 0

    def labels(self, c: int, n: int) -> torch.Tensor:
        return torch.full((n,), c, dtype=torch.long, device=self.device)


#: per class: ``(L_syn, L_g, L_c)`` as floats
ClassLosses = dict[int, tuple[float, float, float]]


def _set_grads(leaves: dict[int, torch.Tensor], losses: dict[int, torch.Tensor]) -> None:
    """``leaf.grad = dL_syn,c / d leaf`` for every class in ``losses`` (one backward)."""
    cs = list(losses)
    grads = torch.autograd.grad([losses[c] for c in cs], [leaves[c] for c in cs])
    for c, grad in zip(cs, grads):
        leaves[c].grad = grad


def _match_loop(ctx: _StepContext, xs_by_class: dict[int, torch.Tensor], leaves: dict[int, torch.Tensor]) -> ClassLosses:
    """Reference matching step: every class ``c`` (ascending) on its own through the network.

    ``R* = search_underused(S_c)``; ``S_c^train = S_c + upsample(R*)`` (random subset of
    ``batch_syn_max``); ``L_syn = L_g(T_c, S_c^train) + cfc_weight L_c(S_c^train)`` (Eq. 9, 7,
    10); the centre of ``c`` then moves by Eq. 8; ``leaves[c].grad = dL_syn / d leaves[c]``
    (the class's optimized tensor, ``xs_by_class[c]`` is computed from it).  Random draws from
    ``ctx.g`` per class: jitter noise, subset, real batch.
    """
    cfg, model, out = ctx.cfg, ctx.model, {}
    for c, xs in xs_by_class.items():
        if ctx.mining:
            with _eval_mode(model):
                found = search_underused(
                    ctx.features, xs, ctx.windows, cfg.top_p, cfg.policy, cfg.response, model.forward_head,
                    ctx.labels(c, xs.shape[0]), cfg.jitter, cfg.jitter_copies, cfg.jitter_std, cfg.jitter_prob, ctx.g,
                )
            ctx.region_counts += np.bincount(found.choice.reshape(-1).numpy(), minlength=len(ctx.windows))
            x_train = training_batch(xs, ctx.windows, found.choice)
        else:
            x_train = xs
        if cfg.batch_syn_max is not None and x_train.shape[0] > cfg.batch_syn_max:
            keep = torch.randperm(x_train.shape[0], generator=ctx.g)[: cfg.batch_syn_max]
            x_train = x_train[keep.to(ctx.device)]
        x_real = ctx.pool.sample(c, cfg.batch_real, ctx.g)
        g_real = parameter_gradients(model, model(ctx.norm(x_real)), ctx.labels(c, x_real.shape[0]))
        fmap = model.forward_features(ctx.norm(x_train))
        g_syn = parameter_gradients(model, model.forward_head(fmap), ctx.labels(c, x_train.shape[0]), create_graph=True)
        l_g = gradient_distance(g_real, g_syn, cfg.distance, cfg.match_params)
        loss, l_c_val = l_g, 0.0
        if ctx.centres is not None:
            emb = _embed(model, fmap)
            l_c = cfc_loss(emb, c, ctx.centres.centres, cfg.tau, ctx.centres.valid, cfg.cfc_include_positive)
            loss = loss + cfg.cfc_weight * l_c
            l_c_val = float(l_c.detach())
            ctx.centres.update(c, emb.detach().mean(0))
        _set_grads(leaves, {c: loss})
        out[c] = (float(loss.detach()), float(l_g.detach()), l_c_val)
    return out


def _match_batched(ctx: _StepContext, xs_by_class: dict[int, torch.Tensor], leaves: dict[int, torch.Tensor]) -> ClassLosses:
    """:func:`_match_loop` with every class in ONE forward pass (same losses and pixel gradients
    up to float rounding; needs a model without sample coupling, see
    :mod:`dd_assets.methods.class_gradients`).

    The random draws are taken first, class by class in the loop's order (jitter noise,
    subset, real batch), so both paths see the same numbers; then one no-grad search forward
    over all classes' originals and jittered copies, one forward of all real batches and one
    of all ``S_c^train``, per-class parameter gradients by :class:`LayerTape`, and Eq. 9 /
    Eq. 7 per class (CFC centres still move class by class, Eq. 8).
    """
    cfg, model, g = ctx.cfg, ctx.model, ctx.g
    classes = list(xs_by_class)
    jit, keep, real = [], {}, []
    for c in classes:
        xs = xs_by_class[c]
        if ctx.mining and cfg.policy == "jitter":
            jit.append(jitter_images(xs.detach(), cfg.jitter_copies, cfg.jitter, cfg.jitter_std, cfg.jitter_prob, g))
        n_train = xs.shape[0] * (1 + cfg.top_p) if ctx.mining else xs.shape[0]
        if cfg.batch_syn_max is not None and n_train > cfg.batch_syn_max:
            keep[c] = torch.randperm(n_train, generator=g)[: cfg.batch_syn_max].to(ctx.device)
        real.append(ctx.pool.sample(c, cfg.batch_real, g))
    sizes = [xs_by_class[c].shape[0] for c in classes]
    x_all = torch.cat([xs_by_class[c] for c in classes])
    if ctx.mining:
        with _eval_mode(model):
            if cfg.policy == "jitter":
                scores = jitter_utilization(ctx.features, x_all.detach(), ctx.windows, jittered=torch.cat(jit, dim=1))
                choice = select_underused(scores, cfg.top_p)
            else:
                y_all = torch.cat([ctx.labels(c, n) for c, n in zip(classes, sizes)])
                choice = search_underused(ctx.features, x_all, ctx.windows, cfg.top_p, cfg.policy, cfg.response,
                                          model.forward_head, y_all).choice
        ctx.region_counts += np.bincount(choice.reshape(-1).numpy(), minlength=len(ctx.windows))
        choices = torch.split(choice, sizes)
    x_train = []
    for i, c in enumerate(classes):
        xt = training_batch(xs_by_class[c], ctx.windows, choices[i]) if ctx.mining else xs_by_class[c]
        x_train.append(xt[keep[c]] if c in keep else xt)
    n_syn, n_real = [x.shape[0] for x in x_train], [x.shape[0] for x in real]
    with LayerTape(model) as tape:
        logits = model(ctx.norm(torch.cat(real)))
    y_real = torch.cat([ctx.labels(c, n) for c, n in zip(classes, n_real)])
    g_real = tape.class_gradients(logits, y_real, n_real)
    with LayerTape(model) as tape:
        fmap = model.forward_features(ctx.norm(torch.cat(x_train)))
        logits = model.forward_head(fmap)
    y_syn = torch.cat([ctx.labels(c, n) for c, n in zip(classes, n_syn)])
    g_syn = tape.class_gradients(logits, y_syn, n_syn, create_graph=True)
    embs = torch.split(_embed(model, fmap), n_syn) if ctx.centres is not None else None
    out: ClassLosses = {}
    losses: dict[int, torch.Tensor] = {}
    for i, c in enumerate(classes):
        l_g = gradient_distance(g_real[i], g_syn[i], cfg.distance, cfg.match_params)
        loss, l_c_val = l_g, 0.0
        if ctx.centres is not None and embs is not None:
            l_c = cfc_loss(embs[i], c, ctx.centres.centres.clone(), cfg.tau, ctx.centres.valid.clone(),
                           cfg.cfc_include_positive)
            loss = loss + cfg.cfc_weight * l_c
            l_c_val = float(l_c.detach())
            ctx.centres.update(c, embs[i].detach().mean(0))  # after L_c (constants in Eq. 7)
        losses[c] = loss
        out[c] = (float(loss.detach()), float(l_g.detach()), l_c_val)
    _set_grads(leaves, losses)
    return out


@register("synthesize", "udd")
def udd_distill(
    real: RealSource,
    syn_init: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    cfg: UDDConfig | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_fn: Callable[[], nn.Module] | None = None,
    num_classes: int | None = None,
    vectorized: bool | None = None,
    class_chunk: int | None = None,
) -> UDDResult:
    """UDD (Algorithm 1): gradient matching with under-used region mining and CFC.

    For ``it`` in ``range(cfg.iterations)``: set the pixel lr (:func:`step_lr`), clamp, build a
    fresh proxy network (seed ``cfg.seed * 1_000_003 + it``), set every class centre to the
    mean embedding of the class's synthetic images (if ``cfg.cfc``); then ``cfg.inner_steps``
    times:

    * for every class ``c`` (ascending): ``S_c`` = its synthetic images;
      ``R* = search_underused(S_c)`` (proxy in eval mode, no gradient);
      ``S_c^train = S_c + upsample(R*)`` (random subset of ``batch_syn_max`` if larger);
      ``T_c`` = ``batch_real`` real images of ``c``;
      ``L_syn = L_g(T_c, S_c^train) + cfc_weight * L_c(S_c^train)`` (Eq. 9, 7, 10); the pixel
      gradient ``dL_syn/dS_c`` is stored; the centre of ``c`` moves by Eq. 8;
    * one SGD step of all pixels (Algorithm 1 line 7, see docs/udd.md);
    * ``cfg.net_steps`` SGD steps of the network on a real (Eq. 6) or synthetic (Eq. 5)
      mini-batch, skipped after the last training step (the network is discarded).

    Args:
        real: :data:`~dd_assets.methods.gradient_matching.RealSource`, ``{class: images}``
            (uint8 or [0, 1] float ``[N_c, C, H, W]``) or ``sampler(c, n, generator)``.
        syn_init: uint8 or [0, 1] float ``[N, C, H, W]`` initial synthetic images (UDD
            Sec. 2.1: real samples).
        labels: ``[N]`` class of each synthetic image.
        cfg: :class:`UDDConfig` (defaults: the paper's).
        device: where the network and pixels live.
        on_step: ``on_step(iteration, record)`` after every outer iteration (record as in
            :attr:`UDDResult.loss_curve`).
        mean, std: per-channel normalization of [0, 1] pixels for the network (None: 0 / 1).
        model_fn: builds a fresh proxy network (``forward_features`` / ``forward_head``
            needed); default ``create_model(cfg.arch, num_classes, in_channels=C,
            image_size=H, **cfg.arch_kwargs)``.
        num_classes: the network's number of outputs (default: ``max label + 1``).
        vectorized: match all classes of a step in one batched forward (:func:`_match_batched`,
            same result up to float rounding) instead of the per-class reference loop
            (:func:`_match_loop`).  ``None`` (default): batched on CUDA, where the loop is bound
            by kernel launches, and the loop on the CPU, where the step is bound by arithmetic
            and memory traffic and the batched forward measured slower
            (``benchmarks/udd_iteration.py``, docs/udd.md).  A model that
            :func:`~dd_assets.methods.class_gradients.batched_support` rejects (batch norm,
            dropout, other parameterized layers) always runs the loop.  Not part of the result
            (no config field).
        class_chunk: classes per batched forward (memory bound; default all classes).

    Returns:
        :class:`UDDResult`.
    """
    t_start = time.perf_counter()
    if class_chunk is not None and class_chunk < 1:
        raise ValueError(f"class_chunk must be None or >= 1, got {class_chunk}")
    cfg = cfg or UDDConfig()
    cfg.validate()
    device = torch.device(device)
    syn0 = to_unit_float(syn_init, "syn_init")
    n, ch, h, w = syn0.shape
    if n == 0:
        raise ValueError("syn_init holds no image")
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"syn_init has {n} images but labels has {lab.shape[0]} entries")
    if int(lab.min()) < 0:
        raise ValueError("labels must be >= 0")
    classes = sorted(int(c) for c in torch.unique(lab).tolist())
    num_classes = int(num_classes) if num_classes is not None else classes[-1] + 1
    if classes[-1] >= num_classes:
        raise ValueError(f"num_classes={num_classes} but labels go up to {classes[-1]}")
    chunk = len(classes) if class_chunk is None else int(class_chunk)
    use_batched = device.type == "cuda" if vectorized is None else bool(vectorized)
    pool = RealPool(real, device)
    missing = [c for c in classes if pool.sampler is None and c not in pool.pools]
    if missing:
        raise ValueError(f"real has no images of classes {missing}")
    if model_fn is None:
        from dd_assets.models import create_model

        arch, kwargs = cfg.arch, dict(cfg.arch_kwargs)

        def model_fn() -> nn.Module:
            return create_model(arch, num_classes, in_channels=ch, image_size=h, **kwargs)

    norm = Normalizer(mean, std, ch, device)
    windows = candidate_windows(h, w, cfg.window_fractions)
    g = torch.Generator().manual_seed(int(cfg.seed))
    in_pixels = cfg.optimize_in == "pixels"

    def to_pixels(v: torch.Tensor) -> torch.Tensor:
        return v if in_pixels else norm.inverse(v)

    index_of = {c: torch.nonzero(lab == c).reshape(-1) for c in classes}
    start = {c: syn0[index_of[c]].to(device) for c in classes}
    params = {c: (x if in_pixels else norm(x)).clone().requires_grad_(True) for c, x in start.items()}
    opt = torch.optim.SGD(list(params.values()), lr=cfg.lr_img, momentum=cfg.momentum_img)
    region_counts = np.zeros(len(windows), dtype=np.int64)
    curve: list[dict[str, float]] = []
    model: nn.Module | None = None

    def clamp_() -> None:
        with torch.no_grad():
            for p in params.values():
                p.copy_(p.clamp(0.0, 1.0) if in_pixels else norm(norm.inverse(p).clamp(0.0, 1.0)))

    for it in range(cfg.iterations):
        t0 = time.perf_counter()
        lr = step_lr(cfg.lr_img, it, cfg.iterations, cfg.lr_milestones, cfg.lr_gamma)
        for group in opt.param_groups:
            group["lr"] = lr
        if cfg.clamp:
            clamp_()
        model = fresh_network(model_fn, cfg.seed * 1_000_003 + it, device)
        _check_feature_model(model, "model_fn")
        net_opt = network_sgd(model, cfg.net_lr, cfg.net_momentum, cfg.net_weight_decay)
        batched = use_batched and batched_support(model) is None
        centres: ClassCentres | None = None
        if cfg.cfc:
            with torch.no_grad(), _eval_mode(model):
                embs = {c: _embed(model, model.forward_features(norm(to_pixels(params[c])))).mean(0) for c in classes}
            centres = ClassCentres(num_classes, next(iter(embs.values())).numel(), cfg.alpha, device)
            for c in classes:
                centres.update(c, embs[c])
        sums = {"loss": 0.0, "loss_g": 0.0, "loss_c": 0.0, "net_loss": 0.0}
        n_match = n_net = 0
        for t in range(cfg.inner_steps):
            opt.zero_grad(set_to_none=True)
            ctx = _StepContext(cfg, model, norm, windows, pool, g, device, centres, region_counts)
            blocks = [classes[i : i + chunk] for i in range(0, len(classes), chunk)] if batched else [classes]
            for block in blocks:
                xs = {c: to_pixels(params[c]) for c in block}
                per_class = (_match_batched if batched else _match_loop)(ctx, xs, params)
                for loss, l_g, l_c in per_class.values():
                    sums["loss"] += loss
                    sums["loss_g"] += l_g
                    sums["loss_c"] += l_c
                    n_match += 1
            opt.step()
            if t == cfg.inner_steps - 1:
                break
            for _ in range(cfg.net_steps):
                if cfg.net_train_on == "real":
                    xb, yb = pool.sample_mixed(classes, cfg.net_batch_size, g)
                else:
                    with torch.no_grad():
                        xb = torch.cat([to_pixels(params[c]) for c in classes])
                    yb = torch.cat([torch.full((params[c].shape[0],), c, dtype=torch.long) for c in classes]).to(device)
                    if xb.shape[0] > cfg.net_batch_size:
                        sub = torch.randperm(xb.shape[0], generator=g)[: cfg.net_batch_size].to(device)
                        xb, yb = xb[sub], yb[sub]
                sums["net_loss"] += network_step(model, net_opt, norm(xb), yb)
                n_net += 1
        record = {
            "iteration": float(it),
            "loss": sums["loss"] / max(1, n_match),
            "loss_g": sums["loss_g"] / max(1, n_match),
            "loss_c": sums["loss_c"] / max(1, n_match),
            "net_loss": sums["net_loss"] / max(1, n_net),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        curve.append(record)
        if on_step is not None:
            on_step(it, record)

    if cfg.clamp:
        clamp_()
    out = torch.empty((n, ch, h, w), dtype=torch.float32)
    with torch.no_grad():
        for c in classes:
            out[index_of[c]] = to_pixels(params[c]).clamp(0.0, 1.0).float().cpu()
    if model is None:
        model = fresh_network(model_fn, cfg.seed * 1_000_003, device)
        _check_feature_model(model, "model_fn")
    util = set_utilization(model, out, mean, std, device, cfg.mue_intervals)
    util0 = set_utilization(model, syn0.clamp(0.0, 1.0), mean, std, device, cfg.mue_intervals)
    return UDDResult(
        images=out,
        labels=lab.clone(),
        loss_curve=curve,
        utilization=util.mue,
        utilization_per_image=util.per_image,
        utilization_init=util0.mue,
        region_counts=region_counts,
        config=cfg,
        seconds=time.perf_counter() - t_start,
    )


@register("synthesize", "dc")
def dc_distill(
    real: RealSource,
    syn_init: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    cfg: UDDConfig | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    **kwargs: Any,
) -> UDDResult:
    """Plain gradient matching: :func:`udd_distill` with ``policy="none"`` and ``cfc=False``.

    Every other setting is taken from ``cfg`` (default :class:`UDDConfig`, i.e. the IDC-style
    loop UDD builds on: Eq. 6 real-data network training, Eq. 9 distance), so this is the
    ablation base row; :func:`dc_reference_config` gives the original DC recipe.
    """
    base = dataclasses.replace(cfg or UDDConfig(), policy="none", cfc=False)
    return udd_distill(real, syn_init, labels, base, device, on_step, **kwargs)
