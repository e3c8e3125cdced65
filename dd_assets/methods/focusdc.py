"""FocusDC: Focused Dataset Condensation (CPAL 2026, "resolution-independent" DD with a ViT).

Paper: /work/shared/papers/000_48eff36882776368.txt (reference code ``edgeai1/FocusDC``,
built on the LF-ViT DeiT-S).  Per class ``c``:

1. Every real image ``x_i`` is downsampled to the ViT's input size (``x'_i``) and run
   through a pre-trained ViT, giving the prediction ``p_i^c`` and the class-token
   attention over the ``K = H/P x W/P`` patch tokens of the last block, averaged over
   heads (Eq. 3-4) -> :func:`cls_attention`.
2. A window of ``floor(alpha h_p) x floor(alpha w_p)`` patches is placed where the summed
   attention is largest (Eq. 6-7, ``alpha = 0.8``) -> :func:`key_window`; it is mapped back
   to the full-resolution source image -> :func:`window_to_box`.
3. Realism ``s_real = max softmax(p) + eta * s_area`` (Eq. 5, ``eta = 30``), ``s_area``
   the key window's mean patch-normalized attention (on the paper's ~1e-2 scale; see
   :func:`area_score`) -> :func:`realism_scores`.
4. The top ``M = 3 IPC`` images by realism give key patches; ``N = IPC`` *other* images
   give low-resolution whole-image views, drawn at random weighted by their prediction
   confidence -> :func:`select_key_and_context`.
5. Each distilled image is a ``2 x 2`` grid: ``m = 3`` key patches + ``n = 1``
   low-resolution view (Eq. 8) -> :func:`focus_composite`.  Students are then trained on
   region-level soft labels (FKD; see ``soft_labels``).
6. Optional Dynamic Fine-Tuning (App. 6.2.1): after training on the distilled set,
   fine-tune on a fresh random IPC-per-class real subset every epoch ->
   :func:`dynamic_finetune_subsets`.

Stages registered here: ``("score", "focusdc")`` -> :func:`score_class`,
``("select", "focusdc")`` -> :func:`select_key_and_context`,
``("compose", "focusdc")`` -> :func:`compose_class`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.compose import compose_images
from dd_assets.core.imaging import as_tensor, class_inputs, resize_float, to_model_input
from dd_assets.methods.registry import register
from dd_assets.core.types import Box, CandidateCrops, Tile

DEFAULT_ALPHA = 0.8
DEFAULT_ETA = 30.0
DEFAULT_M_FACTOR = 3
VARIANTS = ("max_as", "min_as", "r_as")
AREA_SCORES = ("mean", "sum")
DEFAULT_AREA_SCORE = "mean"


# --------------------------------------------------------------------------------------
# 1. class-token attention (Eq. 3-4)
# --------------------------------------------------------------------------------------


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = (int(x) for x in v)
    return a, b


def _grid_size(vit: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    pe = vit.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        return tuple(int(v) for v in pe.dynamic_feat_size(hw))  # type: ignore[return-value]
    ph, pw = _pair(pe.patch_size)
    return hw[0] // ph, hw[1] // pw


def cls_attention(
    vit: nn.Module, x: torch.Tensor, query: str = "cls"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-token attention over the patch tokens of the LAST block, averaged over heads.

    Eq. 3: ``A = softmax(Q K^T / sqrt(d))`` per head (``d`` = head dim, timm's
    ``attn.scale``, after timm's optional q/k-norm); Eq. 4: heads averaged.  The row of the
    class token (token 0) is kept and its columns for the ``vit.num_prefix_tokens`` prefix
    tokens (cls + register tokens) are dropped, so values are the softmax weights of the
    patches (they sum to ``1 - weight on prefix tokens`` <= 1; not renormalized).

    Implementation: timm's ``Attention`` uses fused ``F.scaled_dot_product_attention``,
    which never materializes the weights.  For the duration of the call the last block's
    ``attn.fused_attn`` is set to ``False`` and a forward hook on its ``attn.attn_drop``
    (applied to the post-softmax weights in timm's explicit path; identity in eval mode)
    records them.  The model runs in eval mode under ``no_grad``; the flag, the hook and
    the training mode are restored afterwards, even on error.  Works for any timm
    ``VisionTransformer`` whose blocks use timm's ``Attention`` (ViT, DeiT, reg-token ViTs,
    qk-norm variants).

    Args:
        vit: timm ``VisionTransformer`` with a class token, on ``x``'s device.
        x: normalized float input ``[B, C, H, W]`` at the model's input size.
        query: ``"cls"`` (default) the class-token row; ``"mean"`` the mean of the
            patch-token rows instead.
            # Deviation/reading: Eq. 4 literally writes s = (1/K) sum_k A^k over the K rows
            # of A; the text, LF-ViT (whose DeiT-S the paper uses) and the brief use the
            # class token's row ("cls"), which is the default; "mean" is the literal one.

    Returns:
        ``(attn, logits)``: ``attn [B, h_p, w_p] float32`` (``h_p = H / P``) and
        ``logits [B, num_classes] float32`` (the normal forward's output).
    """
    if getattr(vit, "cls_token", None) is None and query == "cls":
        raise ValueError("cls_attention needs a ViT with a class token (vit.cls_token is None)")
    if query not in ("cls", "mean"):
        raise ValueError(f"query must be 'cls' or 'mean', got {query!r}")
    attn_mod = vit.blocks[-1].attn
    if not hasattr(attn_mod, "attn_drop") or not hasattr(attn_mod, "fused_attn"):
        raise TypeError(
            f"last block's attention {type(attn_mod).__name__} is not a timm Attention "
            "(needs .fused_attn and .attn_drop)"
        )
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        captured.append(inputs[0].detach())

    was_training = vit.training
    had_fused = "fused_attn" in vars(attn_mod)
    old_fused = attn_mod.fused_attn
    handle = attn_mod.attn_drop.register_forward_hook(hook)
    attn_mod.fused_attn = False
    vit.eval()
    try:
        with torch.no_grad():
            logits = vit(x).float()
    finally:
        handle.remove()
        if had_fused:
            attn_mod.fused_attn = old_fused
        else:  # was a class attribute: drop the instance override
            del attn_mod.fused_attn
        vit.train(was_training)
    if len(captured) != 1:
        raise RuntimeError(f"expected one attention map from the last block, got {len(captured)}")
    a = captured[0].float()  # [B, heads, T, T]
    npt = int(getattr(vit, "num_prefix_tokens", 1))
    rows = a[:, :, 0, npt:] if query == "cls" else a[:, :, npt:, npt:].mean(dim=2)
    s = rows.mean(dim=1)  # [B, K]  (Eq. 4: average over heads)
    h_p, w_p = _grid_size(vit, (int(x.shape[-2]), int(x.shape[-1])))
    if h_p * w_p != s.shape[1]:
        raise RuntimeError(f"{s.shape[1]} patch tokens do not form a {h_p}x{w_p} grid")
    return s.reshape(-1, h_p, w_p).contiguous(), logits


# --------------------------------------------------------------------------------------
# 2. key window (Eq. 6-7)
# --------------------------------------------------------------------------------------


def window_shape(h_p: int, w_p: int, alpha: float = DEFAULT_ALPHA) -> tuple[int, int]:
    """``(h, w) = (floor(alpha h_p), floor(alpha w_p))``, each at least 1 (Eq. 6)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    # 1e-9 guards against 0.29 * 100 = 28.999999999999996 style floor errors.
    return max(1, math.floor(alpha * h_p + 1e-9)), max(1, math.floor(alpha * w_p + 1e-9))


def window_sums(attn: np.ndarray | torch.Tensor, h: int, w: int) -> np.ndarray:
    """Summed attention of every ``h x w`` window fully inside ``attn [h_p, w_p]``.

    2-D cumulative sum (integral image) in float64.

    Returns:
        ``[h_p - h + 1, w_p - w + 1] float64``, entry ``[r, c]`` = sum of
        ``attn[r:r+h, c:c+w]``.
    """
    a = attn.detach().cpu().numpy() if isinstance(attn, torch.Tensor) else np.asarray(attn)
    a = a.astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"attn must be [h_p, w_p], got shape {a.shape}")
    h_p, w_p = a.shape
    if not (1 <= h <= h_p and 1 <= w <= w_p):
        raise ValueError(f"window {h}x{w} does not fit a {h_p}x{w_p} grid")
    ii = np.zeros((h_p + 1, w_p + 1), dtype=np.float64)
    ii[1:, 1:] = a.cumsum(0).cumsum(1)
    return ii[h:, w:] - ii[:-h, w:] - ii[h:, :-w] + ii[:-h, :-w]


def key_window(
    attn: np.ndarray | torch.Tensor, alpha: float = DEFAULT_ALPHA, mode: str = "max"
) -> tuple[int, int, int, int]:
    """The ``floor(alpha h_p) x floor(alpha w_p)`` window with the largest summed attention.

    Eq. 6 maximizes over window centres ``(i, j)`` the sum of ``s`` over the window whose
    top-left patch is ``(i - floor(h/2), j - floor(w/2))``; Eq. 7 maps that window to the
    source image.  Here the window is returned by its top-left patch, and only windows that
    lie fully inside the grid are candidates.  Ties (within 1e-12 of the total absolute
    attention) go to the smallest row, then the smallest column.

    Args:
        attn: ``[h_p, w_p]`` attention map (e.g. one map of :func:`cls_attention`).
        alpha: side ratio (paper: 0.8).
        mode: ``"max"`` (Eq. 6) or ``"min"`` (the least-attended window, for the
            Min-AS ablation under the window reading).

    Returns:
        ``(row, col, h, w)`` in patch units: rows ``row:row+h``, cols ``col:col+w``.
    """
    a = attn.detach().cpu().numpy() if isinstance(attn, torch.Tensor) else np.asarray(attn)
    if a.ndim != 2:
        raise ValueError(f"attn must be [h_p, w_p], got shape {a.shape}")
    h, w = window_shape(a.shape[0], a.shape[1], alpha)
    sums = window_sums(a, h, w)
    if mode == "max":
        target = sums.max()
    elif mode == "min":
        target = sums.min()
    else:
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    tol = 1e-12 * (float(np.abs(a).sum()) + 1e-300)
    r, c = np.argwhere(np.abs(sums - target) <= tol)[0]  # row-major -> smallest row, col
    return int(r), int(c), h, w


def window_to_box(
    row: int,
    col: int,
    h: int,
    w: int,
    patch_size: int | Sequence[int],
    image_size: int | Sequence[int],
    grid_size: Sequence[int] | None = None,
) -> Box:
    """Map a patch window to a pixel box ``(x0, y0, x1, y1)`` of the source image (Eq. 7, rho).

    Args:
        row, col, h, w: window in patch units (from :func:`key_window`).
        patch_size: ``P`` or ``(P_h, P_w)`` of the ViT.
        image_size: ``S`` or ``(H, W)`` of the image the box refers to (the source).
        grid_size: ``(h_p, w_p)`` of the attention map.  ``None``: the source *is* the ViT
            input, so patch ``r`` covers pixel rows ``r P : (r+1) P``.  Given (the source was
            downsampled to ``h_p P x w_p P`` for the ViT): rows are scaled by
            ``H / h_p`` with the start floored and the end ceiled, so the box covers the
            whole window.

    Returns:
        :class:`Box`, clipped to the image.
    """
    ph, pw = _pair(patch_size)
    ih, iw = _pair(image_size)
    if h < 1 or w < 1 or row < 0 or col < 0:
        raise ValueError(f"bad window {(row, col, h, w)}")
    if grid_size is None:
        y0, y1 = row * ph, (row + h) * ph
        x0, x1 = col * pw, (col + w) * pw
    else:
        gh, gw = (int(v) for v in grid_size)
        if row + h > gh or col + w > gw:
            raise ValueError(f"window {(row, col, h, w)} outside grid {(gh, gw)}")
        y0, y1 = (row * ih) // gh, -((-(row + h) * ih) // gh)
        x0, x1 = (col * iw) // gw, -((-(col + w) * iw) // gw)
    y1, x1 = min(y1, ih), min(x1, iw)
    if y0 >= y1 or x0 >= x1:
        raise ValueError(f"window {(row, col, h, w)} maps outside a {ih}x{iw} image")
    return Box(int(x0), int(y0), int(x1), int(y1))


# --------------------------------------------------------------------------------------
# 3. realism (Eq. 5)
# --------------------------------------------------------------------------------------


def area_score(
    attn: np.ndarray | torch.Tensor, row: int, col: int, h: int, w: int, mode: str = DEFAULT_AREA_SCORE
) -> float:
    """``s_area`` of Eq. 5 for the key window ``(row, col, h, w)`` of one attention map.

    ``mode="mean"`` (default): the window's MEAN attention after normalizing the map to a
    distribution over the ``K = h_p w_p`` patches,
    ``s_area = (sum_window s_k / sum_all s_k) / (h w)``; ``mode="sum"``: the window's raw
    attention SUM (the project's reading before v2, kept for ablation).

    Derivation of the scale (Eq. 4-6).  Eq. 4's ``s`` is the head-averaged class-token
    softmax row; over the patch tokens it sums to ``1 - (weight on prefix tokens)``.
    Normalizing it over the patches (``s_k / sum s``) leaves a distribution, and the
    window of Eq. 6 then holds a share ``rho in [h w / K, 1]`` of it (``h w / K`` = flat
    attention, 1 = all of it inside the window).  ``rho`` is O(1): with ``eta = 30`` a
    window SUM contributes up to 17-30 to Eq. 5 on the project's 8x8 grid (6x6 window;
    measured 12-100x the confidence term), far beyond the whole ``[1/C, 1]`` range of the
    confidence term, so confidence never matters and ``eta`` (Table 9 tunes it around 30)
    would be inert.  The mean over the window's
    ``h w`` patches, ``rho / (h w) in [1/K, 1/(h w)]``, is what a "region score" on the
    paper's scale is:

    * the paper's ImageNet scorer (LF-ViT DeiT-S, location stage at 112 px: 7x7 grid;
      ``alpha = 0.8`` gives LF-ViT's own 5x5 region) -> ``s_area in [1/49, 1/25]
      = [0.020, 0.040]``, ``eta s_area in [0.61, 1.22]``;
    * the project's CIFAR ViT (32 px, patch 4: 8x8 grid, 6x6 window) ->
      ``[0.0156, 0.0278]``, ``eta s_area in [0.47, 0.83]``.

    Either way the attention term spans at most ~0.4-0.6 across images, the same order as
    max softmax, so ``eta = 30`` balances the two.  Cross-check with the paper's scorer
    code: LF-ViT's region score is the 5x5-window SUM of an EMA (``beta = 0.99``, blocks
    3-11) of class-token attention, whose total mass over tokens is
    ``1 - 0.99^9 = 0.086``; its window sums therefore lie in ~[0.01, 0.09] -- the same
    O(1e-2) scale as this mean (within ~2x), two orders below a window sum.  On finer grids
    the mean shrinks as 1/K (16x16, the paper's Tiny-ImageNet scorer: eta s_area spans
    <= 0.1).
    A per-image positive factor does not move the argmax of Eq. 6, so the key window
    (and its box, Eq. 7) is identical under both modes; only Eq. 5's balance changes.

    # Deviation/reading: Eq. 5 names s_area "the highest attention region score" with no
    # formula.  We do not copy LF-ViT's EMA constant (0.086 depends on the scorer's depth
    # and chosen blocks; the project reads only the last block, Eq. 4), but take the
    # definition that is on that scale for any ViT.  The normalization over patches
    # removes the per-image weight the class token puts on itself, which is no property
    # of any region.  A map with no positive mass counts as flat (``s_area = 1/K``).

    Returns:
        ``s_area`` as a float.
    """
    a = attn.detach().cpu().numpy() if isinstance(attn, torch.Tensor) else np.asarray(attn)
    a = a.astype(np.float64)
    win = float(window_sums(a, h, w)[row, col])
    if mode == "sum":
        return win
    if mode != "mean":
        raise ValueError(f"area_score must be one of {AREA_SCORES}, got {mode!r}")
    total = float(a.sum())
    if total <= 0.0:
        return 1.0 / a.size
    return win / total / (h * w)


def confidence_from_logits(
    logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None = None,
    confidence: str = "max",
) -> np.ndarray:
    """``max softmax(p)`` (``confidence="max"``, Eq. 5) or ``softmax(p)[label]``
    (``"true_class"``) per row of ``logits [N, C]``; returns ``[N] float64``."""
    lg = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    probs = F.softmax(lg.detach().double().cpu(), dim=1)
    if confidence == "max":
        return probs.max(dim=1).values.numpy()
    if confidence == "true_class":
        if labels is None:
            raise ValueError("confidence='true_class' needs labels")
        lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        return probs.gather(1, lab[:, None])[:, 0].numpy()
    raise ValueError(f"confidence must be 'max' or 'true_class', got {confidence!r}")


def realism_scores(
    logits: np.ndarray | torch.Tensor,
    s_area: np.ndarray | torch.Tensor,
    eta: float = DEFAULT_ETA,
    labels: np.ndarray | torch.Tensor | None = None,
    confidence: str = "max",
) -> np.ndarray:
    """Realism ``s_real_i = max(softmax(p_i^c)) + eta * s_area_i`` (Eq. 5), higher = better.

    ``s_area_i`` is "the highest attention region score" of image ``i``: what
    :func:`score_class` passes is :func:`area_score` of the Eq. 6 key window -- by default
    the window's MEAN patch-normalized class-token attention (Eq. 4), on the paper's
    O(1e-2) scale so that ``eta = 30`` balances confidence and attention (derivation in
    :func:`area_score`); ``area_score="sum"`` gives the old window SUM, with which the
    attention term is 12-100x the confidence term.  This function adds whatever it is
    given.

    # Deviation/reading: "max(softmax(p))" is read literally: the top-1 probability
    # whatever the class; confidence="true_class" uses p[label] instead.

    Args:
        logits: ``[N, C]`` ViT logits ``p_i^c``.
        s_area: ``[N]`` key-window area scores (:func:`area_score`).
        eta: balancing factor (paper: 30).

    Returns:
        ``[N] float64`` realism scores.
    """
    conf = confidence_from_logits(logits, labels, confidence)
    area = np.asarray(
        s_area.detach().cpu().numpy() if isinstance(s_area, torch.Tensor) else s_area,
        dtype=np.float64,
    ).reshape(-1)
    if area.shape != conf.shape:
        raise ValueError(f"{conf.shape[0]} logits rows but {area.shape[0]} s_area values")
    return conf + float(eta) * area


# --------------------------------------------------------------------------------------
# score stage
# --------------------------------------------------------------------------------------


@dataclass
class FocusScores(CandidateCrops):
    """Per-image FocusDC scores of one class (one candidate = one image's key window).

    Inherited: ``source_id [K] int64``, ``boxes [K, 4] int32`` key window in source pixels,
    ``score [K] float32`` realism (Eq. 5; HIGHER is better).  Added, aligned with them:
    ``attention [K, h_p, w_p] float32`` (Eq. 4), ``pred [K] int64`` argmax class,
    ``confidence [K] float32`` the configured confidence (``"max"``: max softmax,
    ``"true_class"``: ``p[label]``; used by Eq. 5 and to weight the context images),
    ``windows [K, 4] int32`` ``(row, col, h, w)`` in patches, ``s_area [K] float32`` the
    window's :func:`area_score`.
    """

    attention: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    windows: np.ndarray
    s_area: np.ndarray


def class_rng(seed: int, class_index: int, *extra: int) -> np.random.Generator:
    """Independent numpy stream per (seed, class, ...)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(class_index) & 0xFFFFFFFF, *extra])


@register("score", "focusdc")
def score_class(
    vit: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    source_ids: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    class_index: int,
    alpha: float = DEFAULT_ALPHA,
    eta: float = DEFAULT_ETA,
    input_size: int | Sequence[int] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    confidence: str = "max",
    window: str = "max",
    seed: int = 0,
    area: str = DEFAULT_AREA_SCORE,
) -> FocusScores:
    """Run the ViT over one class and score every image (Sec. 3.2, Eq. 3-7, Eq. 5).

    Each uint8 source ``[C, H, W]`` is normalized and resized (bilinear, antialiased) to
    the ViT input ``input_size`` (default ``vit.patch_embed.img_size``; the paper's
    downsampled ``x'_i``), ``batch_size`` at a time.  Per image: :func:`cls_attention`
    map, :func:`key_window` (``window="max"`` Eq. 6; ``"min"`` / ``"random"`` are the
    Min-AS / R-AS ablations under the window reading, ``"random"`` drawn from
    ``class_rng(seed, class_index)``), its source-pixel box (:func:`window_to_box`),
    ``s_area`` = the window's :func:`area_score` (``area``: ``"mean"`` default, ``"sum"``)
    and realism (:func:`realism_scores`).

    Args:
        images: uint8 ``[N, C, H, W]`` real images of the class.
        labels: ``[N]`` class index (used only by ``confidence="true_class"``).
        source_ids: ``[N]`` unique manifest ids.

    Returns:
        :class:`FocusScores`, rows sorted by ``source_id``.
    """
    imgs, lab, ids = class_inputs(images, labels, source_ids, class_index)
    order = np.argsort(ids, kind="stable")
    imgs, ids, lab = imgs[torch.from_numpy(order)], ids[order], lab[order]
    attn, logits = attention_maps(vit, imgs, mean, std, input_size, batch_size, device)
    return scores_from_attention(
        attn, logits, lab, ids, class_index, _pair(vit.patch_embed.patch_size),
        (int(imgs.shape[-2]), int(imgs.shape[-1])), alpha, eta, confidence, window, seed, area,
    )


def attention_maps(
    vit: nn.Module,
    images: torch.Tensor | np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    input_size: int | Sequence[int] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The expensive, alpha/eta-independent part of scoring: per image the class-token
    attention map (Eq. 3-4) and the ViT logits, ``batch_size`` images at a time.

    Returns ``(attention [N, h_p, w_p] float32, logits [N, C] float32)``.
    """
    imgs = as_tensor(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if input_size is None:
        img_size = getattr(vit.patch_embed, "img_size", None)
        in_hw = _pair(img_size) if img_size is not None else (imgs.shape[-2], imgs.shape[-1])
    else:
        in_hw = _pair(input_size)
    maps: list[torch.Tensor] = []
    logit_chunks: list[torch.Tensor] = []
    for start in range(0, imgs.shape[0], batch_size):
        x = to_model_input(imgs[start : start + batch_size], mean, std, device)
        x = resize_float(x, in_hw)
        a, lg = cls_attention(vit, x)
        maps.append(a.cpu())
        logit_chunks.append(lg.cpu())
    return torch.cat(maps).numpy().astype(np.float32), torch.cat(logit_chunks).numpy().astype(np.float32)


def scores_from_attention(
    attn: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    source_ids: np.ndarray,
    class_index: int,
    patch: tuple[int, int],
    src_hw: tuple[int, int],
    alpha: float = DEFAULT_ALPHA,
    eta: float = DEFAULT_ETA,
    confidence: str = "max",
    window: str = "max",
    seed: int = 0,
    area: str = DEFAULT_AREA_SCORE,
) -> FocusScores:
    """Key windows (Eq. 6-7), their source boxes and realism (Eq. 5) from stored maps.

    ``attn [N, h_p, w_p]``, ``logits [N, C]``, ``labels``/``source_ids [N]`` (rows in
    ``source_id`` order), ``patch`` = the ViT patch size, ``src_hw`` = source image size.
    ``s_area`` = :func:`area_score` of each window (``area``); ``confidence`` (``"max"`` or
    ``"true_class"``) feeds both Eq. 5 and the stored ``confidence`` that weights the
    context images in :func:`select_key_and_context`.
    Cheap: re-run when alpha or eta change while the attention maps are reused.
    """
    if window not in ("max", "min", "random"):
        raise ValueError(f"window must be 'max', 'min' or 'random', got {window!r}")
    if area not in AREA_SCORES:
        raise ValueError(f"area_score must be one of {AREA_SCORES}, got {area!r}")
    n = attn.shape[0]
    grid = attn.shape[1:]
    rng = class_rng(seed, class_index)
    windows = np.zeros((n, 4), dtype=np.int32)
    boxes = np.zeros((n, 4), dtype=np.int32)
    s_area = np.zeros(n, dtype=np.float64)
    for i in range(n):
        if window == "random":
            h, w = window_shape(grid[0], grid[1], alpha)
            r = int(rng.integers(0, grid[0] - h + 1))
            c = int(rng.integers(0, grid[1] - w + 1))
        else:
            r, c, h, w = key_window(attn[i], alpha, mode=window)
        windows[i] = (r, c, h, w)
        s_area[i] = area_score(attn[i], r, c, h, w, area)
        boxes[i] = window_to_box(r, c, h, w, patch, src_hw, grid_size=grid).as_tuple()
    lg = torch.as_tensor(logits)
    lab = np.asarray(labels, dtype=np.int64)
    # one confidence for Eq. 5 and the context weights (before v2 the weights were always max softmax)
    real = realism_scores(lg, s_area, eta, labels=lab, confidence=confidence)
    conf = confidence_from_logits(lg, lab, confidence)
    return FocusScores(
        class_index=class_index,
        source_id=np.asarray(source_ids, dtype=np.int64),
        boxes=boxes,
        score=real.astype(np.float32),
        attention=attn,
        pred=lg.argmax(dim=1).numpy().astype(np.int64),
        confidence=conf.astype(np.float32),
        windows=windows,
        s_area=s_area.astype(np.float32),
    )


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


@register("select", "focusdc")
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
    # window is cut) is available as score_class(window="max"|"min"|"random").

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
# 5. information reconstruction (Eq. 8)
# --------------------------------------------------------------------------------------


def _factor(m: int, n: int) -> int:
    f = math.isqrt(m + n)
    if m < 0 or n < 0 or m + n < 1 or f * f != m + n:
        raise ValueError(f"m + n must be a positive square number, got m={m}, n={n}")
    return f


def focus_composite(
    key_patches: Sequence[tuple[torch.Tensor | np.ndarray, Box | Sequence[int]]],
    context: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    out_size: int,
    m: int = 3,
    n: int = 1,
    key_ids: Sequence[int] | None = None,
    context_ids: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
) -> tuple[torch.Tensor, list[Tile]]:
    """One distilled image: ``m`` key patches + ``n`` low-resolution whole-image views (Eq. 8).

    ``concat`` of Eq. 8 is a ``sqrt(m+n) x sqrt(m+n)`` grid (``compose.tile_layout``;
    default 2 x 2): tiles ``0..m-1`` (row-major) are the key patches ``x*`` (crop ``box``
    of the full-resolution source, resized to the tile), tiles ``m..m+n-1`` the
    low-resolution views ``x'`` (the WHOLE context image resized to the tile).  Pixels
    come from ``compose.compose_images``.

    Args:
        key_patches: ``m`` pairs ``(source uint8 [C, H, W], box (x0, y0, x1, y1))``.
        context: one uint8 ``[C, H, W]`` image (``n = 1``) or ``n`` of them.
        key_ids / context_ids: manifest ids for the lineage (default ``-1``).
        scores: ``m + n`` per-tile scores for the lineage (default NaN).

    Returns:
        ``(image uint8 [C, out_size, out_size], tiles)`` with ``m + n`` :class:`Tile`.
    """
    factor = _factor(m, n)
    ctx = [context] if (isinstance(context, (torch.Tensor, np.ndarray)) and context.ndim == 3) else list(context)
    if len(key_patches) != m or len(ctx) != n:
        raise ValueError(f"need {m} key patches and {n} context images, got {len(key_patches)}, {len(ctx)}")
    kids = [-1] * m if key_ids is None else [int(v) for v in key_ids]
    cids = [-1] * n if context_ids is None else [int(v) for v in context_ids]
    if len(kids) != m or len(cids) != n:
        raise ValueError("key_ids / context_ids lengths must be m / n")
    sources = [p[0] for p in key_patches] + ctx
    boxes = [p[1] for p in key_patches] + [
        Box(0, 0, int(c.shape[-1]), int(c.shape[-2])) for c in ctx
    ]
    return compose_images(sources, boxes, out_size, factor, kids + cids, scores)


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


@register("compose", "focusdc")
def compose_class(
    sources_by_id: Mapping[int, torch.Tensor | np.ndarray],
    scores: FocusScores,
    selection: FocusSelection,
    ipc: int,
    out_size: int,
    m: int = 3,
    n: int = 1,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[np.ndarray, list[list[Tile]]]:
    """``ipc`` FocusDC images of one class (Eq. 8).

    "We randomly select m patches from T~_c and n low-resolution images from T'_c each
    time": with ``shuffle`` the key and context index lists are permuted
    (``class_rng(seed, class_index, 1)``) and image ``i`` takes key
    ``[i m, (i+1) m)`` and context ``[i n, (i+1) n)`` of them, so with ``M = m ipc`` and
    ``N = n ipc`` every selected image is used exactly once.  Tile scores: realism for key
    tiles, the context weight for low-res tiles.

    Returns:
        ``(images uint8 [ipc, C, out_size, out_size], tiles)``.
    """
    key, ctx, cw = arrange(selection, ipc, m, n, scores.class_index, seed, shuffle)
    images: list[torch.Tensor] = []
    all_tiles: list[list[Tile]] = []
    for i in range(ipc):
        kk, cc = key[i * m : (i + 1) * m], ctx[i * n : (i + 1) * n]
        kid = [int(scores.source_id[j]) for j in kk]
        cid = [int(scores.source_id[j]) for j in cc]
        missing = [s for s in kid + cid if s not in sources_by_id]
        if missing:
            raise KeyError(f"class {scores.class_index}: source images missing for ids {missing}")
        img, tiles = focus_composite(
            [(sources_by_id[s], scores.boxes[j]) for s, j in zip(kid, kk, strict=True)],
            [sources_by_id[s] for s in cid],
            out_size,
            m,
            n,
            key_ids=kid,
            context_ids=cid,
            scores=[float(scores.score[j]) for j in kk] + [float(v) for v in cw[i * n : (i + 1) * n]],
        )
        images.append(img)
        all_tiles.append(tiles)
    return torch.stack(images).numpy(), all_tiles


# --------------------------------------------------------------------------------------
# 6. Dynamic Fine-Tuning subsets (App. 6.2.1)
# --------------------------------------------------------------------------------------


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
