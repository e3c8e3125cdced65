"""Class activation maps: CAM (Zhou et al. CVPR 2016) as used by NRR-DD (Eq. 1), and
Grad-CAM (Selvaraju et al. ICCV 2017) as used by EDF (Eq. 3) and Comp-DD.

The two are different quantities and both are kept: :func:`class_activation_maps` weights
each feature location by the classifier row (no ReLU), :func:`grad_cam` by the spatially
averaged gradient of the class logit and clips with a ReLU.  They share the post-processing
(bilinear upsampling, ``align_corners=False``, then per-image min-max normalization,
:func:`normalize_minmax`).  :func:`cam_class_indices` maps a subset's labels to the CAM
model's own class indices by name.

CAM
---

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

from collections.abc import Sequence

import numpy as np
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
    return _upsample_normalized(cam, out_size)


def _upsample_normalized(cam: torch.Tensor, out_size: tuple[int, ...]) -> torch.Tensor:
    """``[B, h, w]`` -> bilinear (``align_corners=False``) to ``out_size``, then
    :func:`normalize_minmax`: the post-processing of both CAM and Grad-CAM."""
    cam = F.interpolate(cam[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]
    return normalize_minmax(cam)


# ============================================================================ Grad-CAM (EDF Eq. 3)


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    class_idx: torch.Tensor | np.ndarray | Sequence[int],
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al.; EDF Eq. 3) on the model's last feature map.

    With ``A = forward_features(x)`` ``[B, K, h, w]`` and ``y^c = forward_head(A)[c]``::

        alpha^c_k = 1/(h w) sum_ij d y^c / d A_k(i, j)
        M^c = ReLU(sum_k alpha^c_k A_k)

    then bilinear upsampling to ``size`` (``align_corners=False``) and per-image min-max
    normalization to [0, 1] (a constant map, e.g. all-zero after the ReLU, becomes 0).
    The model runs in eval mode (flag restored); only the feature map gets a gradient.

    Args:
        model: exposes ``forward_features`` and ``forward_head`` (timm interface, e.g.
            :class:`dd_assets.models.ConvNet` or a timm ResNet).
        x: normalized float ``[B, C, H, W]`` on the model's device.
        class_idx: ``[B]`` class index (in the model's label space) of each image.
        size: output ``(H', W')``; default ``x``'s ``(H, W)``.

    Returns:
        float32 ``[B, H', W']`` in [0, 1].
    """
    fwd_f, fwd_h = getattr(model, "forward_features", None), getattr(model, "forward_head", None)
    if not (callable(fwd_f) and callable(fwd_h)):
        raise ValueError(f"grad_cam needs forward_features/forward_head (timm interface); {type(model).__name__} lacks them")
    out_size = tuple(x.shape[-2:]) if size is None else tuple(size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feat = fwd_f(x.detach())
        if feat.ndim != 4:
            raise ValueError(f"forward_features must return [B, K, h, w], got {tuple(feat.shape)}")
        feat = feat.float().requires_grad_(True)
        with torch.enable_grad():
            logits = fwd_h(feat)
            cls = torch.as_tensor(np.asarray(class_idx) if not isinstance(class_idx, torch.Tensor) else class_idx,
                                  dtype=torch.long).reshape(-1).to(logits.device)
            if cls.shape[0] != feat.shape[0]:
                raise ValueError(f"{cls.shape[0]} class indices for {feat.shape[0]} images")
            if cls.numel() and (int(cls.min()) < 0 or int(cls.max()) >= logits.shape[1]):
                raise ValueError(f"class indices must be in [0, {logits.shape[1]}) for this model, "
                                 f"got [{int(cls.min())}, {int(cls.max())}]")
            (g,) = torch.autograd.grad(logits.gather(1, cls.view(-1, 1)).sum(), feat)
    finally:
        model.train(was_training)
    weights = g.mean(dim=(2, 3), keepdim=True)  # alpha^c_k   [B, K, 1, 1]
    cam = F.relu((weights * feat.detach()).sum(dim=1))  # [B, h, w]
    return _upsample_normalized(cam, out_size)


def cam_class_indices(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    class_names: Sequence[str],
    cam_class_names: Sequence[str],
) -> np.ndarray:
    """Map synthetic labels (indices into ``class_names``) to the CAM model's class indices.

    ``out[i] = cam_class_names.index(class_names[labels[i]])``: a subset label is looked up
    by *name* in the CAM model's own class list (e.g. a subset of ImageNet vs a 1000-class
    model), never reused as a raw index.

    Returns:
        int64 ``[N]``.  Raises ``ValueError`` naming any class of ``class_names`` that the
        CAM model lacks (only classes that occur in ``labels`` are required), duplicate CAM
        class names, or labels out of range.
    """
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    names = [str(c) for c in class_names]
    cam_names = [str(c) for c in cam_class_names]
    if len(set(cam_names)) != len(cam_names):
        raise ValueError("cam_class_names contains duplicates")
    if lab.size and (lab.min() < 0 or lab.max() >= len(names)):
        raise ValueError(f"labels must be in [0, {len(names)}) (len(class_names)), got [{lab.min()}, {lab.max()}]")
    where = {c: i for i, c in enumerate(cam_names)}
    used = sorted(set(lab.tolist()))
    missing = [names[i] for i in used if names[i] not in where]
    if missing:
        raise ValueError(f"the CAM model has no class named {missing} (cam_class_names has "
                         f"{len(cam_names)} classes, e.g. {cam_names[:5]})")
    table = np.array([where.get(c, -1) for c in names], dtype=np.int64)
    return table[lab]
