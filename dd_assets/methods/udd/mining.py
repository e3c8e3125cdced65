"""UDD under-used region search: response policy (Sec. 2.3, Eq. 1) and data-jittering policy
(Sec. 2.4, Eq. 2-4), pure torch/numpy.

Paper: /work/shared/papers/004_5acb7ff699889e9c.txt.  Every candidate window
(:mod:`dd_assets.methods.udd.regions`) of every image gets a score from ONE forward pass over the
whole image (Fig. 4b): the mean activation (:func:`activation_response`), the mean gradient
magnitude of the CE loss w.r.t. the feature map (:func:`gradient_response`) or the jitter
sensitivity ``sigma_n = |Lambda_n - mean_m Lambda_hat_{n,m}|`` (:func:`jitter_utilization`);
the ``P`` lowest-scoring windows are the under-used ones (:func:`select_underused`,
:func:`search_underused`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dd_assets.core.utilization import Features, activation_maps
from dd_assets.methods.udd.regions import window_means

POLICIES = ("none", "response", "jitter")
RESPONSES = ("activation", "gradient")
JITTERS = ("gaussian", "uniform", "salt_pepper")

Head = Callable[[torch.Tensor], torch.Tensor]

# ============================================================================ responses (Sec. 2.3-2.4)


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
