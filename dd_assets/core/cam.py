"""Class activation maps (CAM, Zhou et al. CVPR 2016) as used by NRR-DD (Eq. 1).

NRR-DD ("Non-Critical Region Refinement", Sec. 3.2 / 3.3) defines the CAM of image ``x``
for class ``y`` as

    C(x, y) = sum_k w_k^y T_k(x)                                             (Eq. 1)

with ``T_k`` the k-th feature map of the teacher's last feature layer and ``w_k^y`` the
k-th classifier weight of class ``y``.

Why our own ~80 lines instead of ``torchcam`` / ``pytorch-grad-cam``:

* no extra dependency (neither is installed; both pull in more than we need);
* our DD ConvNets classify the *flattened* feature map (``Linear(width*h*w, K)``), not a
  globally pooled vector; both libraries assume GAP heads (classic CAM) or fall back to
  gradients (Grad-CAM), which is a different quantity.  The spatially-resolved weighting
  below is exact for a flattened head;
* exact control of the post-processing that the thresholds depend on: NRR's mask
  ``max(0, eps - C)`` (Eq. 4) compares C against ``eps = 0.5``, so the upsampling mode and
  the per-image min-max normalization must be exactly what we say they are.

Definition used (one formula for both head types): the CAM at feature location ``(i, j)``
is that location's additive contribution to the class logit.

* GAP head, ``z_c = sum_k W[c, k] * mean_ij A_k(i, j) + b_c``:
  ``cam(i, j) = sum_k W[c, k] A_k(i, j)`` -- classic CAM (the ``1 / (h w)`` of the mean is
  dropped; it disappears in the min-max normalization anyway).
* Flattened head, ``z_c = sum_{k,i,j} W[c, k*h*w + i*w + j] A_k(i, j) + b_c`` (torch's
  ``flatten`` of ``[K, h, w]`` is channel-major): reshaping the class row to
  ``V_c = W[c].view(K, h, w)`` gives ``z_c = sum_ij [sum_k V_c[k, i, j] A_k(i, j)] + b_c``,
  so ``cam(i, j) = sum_k V_c[k, i, j] A_k(i, j)``.  It sums to ``z_c - b_c`` over the map,
  exactly as the classic CAM sums to ``h w (z_c - b_c)`` for a GAP head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _classifier_weight(model: nn.Module) -> torch.Tensor:
    """``[num_classes, in_features]`` weight of the model's final linear classifier."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            "class_activation_maps needs a model with get_classifier() returning an nn.Linear "
            f"(timm interface); got {type(head).__name__ if head is not None else 'no get_classifier'}"
        )
    return head.weight


def raw_class_activation_maps(
    model: nn.Module, x: torch.Tensor, class_idx: torch.Tensor
) -> torch.Tensor:
    """Un-normalized CAM at feature resolution (Eq. 1), see the module docstring.

    Args:
        model: exposes ``forward_features(x) -> [B, K, h, w]`` and ``get_classifier()``
            (an ``nn.Linear`` with ``in_features`` either ``K`` (GAP head) or ``K*h*w``
            (flattened head, e.g. :class:`dd_assets.models.ConvNet`)).  Run as is (the
            caller chooses train/eval mode and grad mode).
        x: normalized float ``[B, C, H, W]``.
        class_idx: ``[B]`` int64 class of each image.

    Returns:
        float32 ``[B, h, w]``: per-location contribution to the class logit (bias excluded).
    """
    weight = _classifier_weight(model)
    feat = model.forward_features(x)
    if feat.ndim != 4:
        raise ValueError(f"forward_features must return [B, K, h, w], got shape {tuple(feat.shape)}")
    b, k, h, w = feat.shape
    weight = weight.to(feat.dtype)
    cls = torch.as_tensor(class_idx, dtype=torch.long, device=feat.device).reshape(-1)
    if cls.shape[0] != b:
        raise ValueError(f"{cls.shape[0]} class indices for {b} images")
    rows = weight[cls]  # [B, in_features]
    if weight.shape[1] == k:  # GAP head: classic CAM
        cam = torch.einsum("bk,bkij->bij", rows, feat)
    elif weight.shape[1] == k * h * w:  # flattened head: spatially resolved weights
        cam = (rows.view(b, k, h, w) * feat).sum(dim=1)
    else:
        raise ValueError(
            f"classifier in_features={weight.shape[1]} matches neither the {k} feature channels "
            f"(GAP head) nor the flattened map {k}x{h}x{w}={k * h * w}"
        )
    return cam.float()


def normalize_minmax(cam: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalization of ``[B, H, W]`` to [0, 1].

    A constant map (max == min) becomes all zeros (nothing is "critical").
    """
    flat = cam.reshape(cam.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.clamp_(0.0, 1.0).view_as(cam)


def class_activation_maps(
    model: nn.Module,
    x: torch.Tensor,
    class_idx: torch.Tensor,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """CAM of each image for its class (Eq. 1), upsampled and min-max normalized.

    The model runs in eval mode under ``torch.no_grad()`` (its training flag is restored).

    Args:
        model: see :func:`raw_class_activation_maps`.
        x: normalized float ``[B, C, H, W]`` on the model's device.
        class_idx: ``[B]`` class of each image.
        size: output ``(H', W')``; default the input size ``(H, W)``.

    Returns:
        float32 ``[B, H', W']`` in [0, 1]: the feature-resolution CAM upsampled with
        bilinear interpolation (``align_corners=False``) and then min-max normalized per
        image (so every non-constant map has min 0 and max 1 exactly).
    """
    out_size = tuple(x.shape[-2:]) if size is None else tuple(size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cam = raw_class_activation_maps(model, x, class_idx)
    finally:
        model.train(was_training)
    cam = F.interpolate(cam[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]
    return normalize_minmax(cam)
