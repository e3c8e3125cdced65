"""FocusDC steps 1-2: class-token attention of a pre-trained ViT and the key window.

Paper: /work/shared/papers/000_48eff36882776368.txt (reference code ``edgeai1/FocusDC``,
built on the LF-ViT DeiT-S).  Per class ``c``:

1. Every real image ``x_i`` is downsampled to the ViT's input size (``x'_i``) and run
   through a pre-trained ViT, giving the prediction ``p_i^c`` and the class-token
   attention over the ``K = H/P x W/P`` patch tokens of the last block, averaged over
   heads (Eq. 3-4) -> :func:`cls_attention`, :func:`attention_maps` (what the
   ``focusdc_attention`` asset stores).
2. A window of ``floor(alpha h_p) x floor(alpha w_p)`` patches is placed where the summed
   attention is largest (Eq. 6-7, ``alpha = 0.8``) -> :func:`key_window`; it is mapped back
   to the full-resolution source image -> :func:`window_to_box`.

Realism (Eq. 5) is in :mod:`dd_assets.methods.focusdc.realism`, the key/context selection in
:mod:`dd_assets.methods.focusdc.selection`, the composite (Eq. 8) in
:mod:`dd_assets.methods.focusdc.compose`, Dynamic Fine-Tuning in
:mod:`dd_assets.methods.focusdc.dft`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dd_assets.core.imaging import as_tensor, resize_float, to_model_input
from dd_assets.core.types import Box

DEFAULT_ALPHA = 0.8


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
# the attention maps of a class (what the focusdc_attention asset stores)
# --------------------------------------------------------------------------------------


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

