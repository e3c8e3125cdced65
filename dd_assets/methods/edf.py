"""EDF: Emphasize Discriminative Features for dataset distillation (core, pure torch/numpy).

Paper: "Emphasizing Discriminative Features for Dataset Distillation in Complex Scenarios"
(EDF), Sec. 2, Algorithm 1, Sec. 3 / App. D (Comp-DD), App. B Table 8.  EDF is trajectory
matching (:mod:`dd_assets.methods.trajectories`: MTT with DATM's options) plus two modules:

1. **Common Pattern Dropout** (CPD, Sec. 2.1, Eq. 1-2): the matching loss (Eq. 1) is split
   into one term per parameter, ``l_i = (theta_hat_{s+N,i} - theta*_{s+M,i})^2``; the
   ``floor(alpha * P)`` smallest terms are dropped (they carry "common patterns") and the
   rest is summed and normalized -> :func:`dropout_count`, :func:`common_pattern_dropout`.
2. **Discriminative Area Enhancement** (DAE, Sec. 2.2, Eq. 3-5): Grad-CAM maps ``M`` of the
   synthetic images from a model ``G`` trained on real data (Eq. 3, :func:`grad_cam`),
   recomputed every ``K`` iterations; the pixel gradient is multiplied element-wise by
   ``F(M, beta)`` = 1 below the image's mean activation, ``beta + M`` at or above it
   (Eq. 4-5) -> :func:`dae_weights`, :func:`synthetic_cams`, :func:`cam_class_indices`.
3. **Comp-DD complexity** (Sec. 3, App. D): per image ``1 - share of Grad-CAM >= 0.5``, per
   class the mean; classes ranked to form easy / hard subsets -> :func:`image_complexity`,
   :func:`class_complexity`, :func:`dataset_complexity`, :func:`split_easy_hard`.

:func:`edf_distill` (``("synthesize", "edf")``) runs Algorithm 1 with CPD and DAE switchable
for the ablation rows (MTT / +CPD / +DAE / EDF, Table 4).  :func:`edf_config` builds the
App. B Table 8 settings per IPC (and per ImageNet subset).  See ``docs/edf.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.cam import normalize_minmax
from dd_assets.core.imaging import resize_float, to_model_input
from dd_assets.methods.registry import register
from dd_assets.methods.trajectories import (
    DistillResult,
    ExpertTrajectories,
    MatchConfig,
    eq1_loss,
    trajectory_matching_distill,
)

# ============================================================================ defaults (App. B)

#: App. B Table 8, rows shared by all six ImageNet subsets (ImageNette values):
#: ``alpha`` (CPD), ``beta`` / ``cam_every`` = K (DAE), ``iterations`` = T, ``batch_syn``,
#: ``lr_img`` (lr_pixel), ``lr_label``, ``syn_steps``.
TABLE8: dict[int, dict[str, float]] = {
    1: dict(alpha=0.0, beta=1.0, cam_every=50, iterations=10000, batch_syn=1000, lr_img=10000.0, lr_label=2.0, syn_steps=40),
    10: dict(alpha=0.25, beta=1.0, cam_every=100, iterations=10000, batch_syn=400, lr_img=1000.0, lr_label=2.0, syn_steps=40),
    50: dict(alpha=0.375, beta=2.0, cam_every=200, iterations=10000, batch_syn=200, lr_img=100.0, lr_label=5.0, syn_steps=40),
}

#: Table 8 cells that differ from :data:`TABLE8` per subset (lower-case subset name, IPC).
TABLE8_OVERRIDES: dict[tuple[str, int], dict[str, float]] = {
    ("imagewoof", 10): {"beta": 2.0},
    ("imagewoof", 50): {"beta": 1.0},
    ("imagemeow", 1): {"lr_label": 3.0},
    ("imageyellow", 1): {"lr_label": 3.0},
    ("imageyellow", 10): {"lr_label": 3.0},
    ("imagefruit", 1): {"lr_label": 3.0},
    ("imagesquawk", 1): {"lr_label": 3.0},
    ("imagesquawk", 10): {"lr_label": 3.0},
}

#: Settings the paper does not state, from the authors' public ImageNet-subset configs
#: (``configs/ImageNet/*/ConvIN/IPC{1,10,50}.yaml``): M, the DATM start-epoch window, the
#: lr of the learned student lr, its initial value, the label momentum and the loss cap.
PUBLIC_CONFIG: dict[int, dict[str, Any]] = {
    1: dict(expert_epochs=2, max_start_epoch=10, initial_max_start_epoch=5, expansion_end_iteration=1000),
    10: dict(expert_epochs=2, max_start_epoch=20, initial_max_start_epoch=10, expansion_end_iteration=1000),
    50: dict(expert_epochs=2, max_start_epoch=40, initial_max_start_epoch=20, expansion_end_iteration=2000),
}
PUBLIC_COMMON: dict[str, Any] = dict(lr_lr=1e-5, lr_init=0.01, label_momentum=0.9, max_loss=1.5,
                                     soft_labels=True, sequential=True, img_momentum=0.5, lr_momentum=0.5)


@dataclass
class EDFConfig:
    """EDF hyper-parameters.

    ``match``: the trajectory-matching loop (:class:`MatchConfig`: T, N, M, lr_pixel,
    batch_syn, DATM options).  CPD: ``alpha`` (dropout ratio of Eq. 2),
    ``cpd_granularity`` (``"element"``: one term per scalar parameter, the paper's and
    reference code's reading; ``"tensor"``: one term per parameter tensor),
    ``cpd_normalize`` (``"kept"``: divide by the kept terms' share of
    ``||theta*_s - theta*_{s+M}||^2``, reference code; ``"full"``: by the whole of it).
    DAE: ``beta`` (enhancement factor of Eq. 4), ``cam_every`` (K), ``cam_threshold``
    (``None`` = per-image mean activation, Eq. 4; a float = the fixed threshold of the
    Table 6b ablation), ``cam_image_size`` (resize synthetic images to this for the CAM
    model; ``None`` = as they are), ``cam_batch_size``.  ``use_cpd`` / ``use_dae`` switch
    the modules (Table 4 ablation).
    """

    match: MatchConfig = field(default_factory=MatchConfig)
    alpha: float = 0.25
    cpd_granularity: str = "element"
    cpd_normalize: str = "kept"
    beta: float = 1.0
    cam_every: int = 100
    cam_threshold: float | None = None
    cam_image_size: int | None = None
    cam_batch_size: int = 256
    use_cpd: bool = True
    use_dae: bool = True


def table8_row(ipc: int, dataset: str | None = None) -> dict[str, float]:
    """Table 8 values for ``ipc`` (row 1 for IPC 1, row 10 for 2-10, row 50 above) and,
    when ``dataset`` names one of the six ImageNet subsets, its cell overrides."""
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    key = 1 if ipc == 1 else 10 if ipc <= 10 else 50
    row = dict(TABLE8[key])
    if dataset is not None:
        row.update(TABLE8_OVERRIDES.get((dataset.lower(), key), {}))
    return row


def edf_config(ipc: int, dataset: str | None = None, **overrides: Any) -> EDFConfig:
    """EDF settings of App. B Table 8 for ``ipc`` (see :func:`table8_row`), the rest from
    :data:`PUBLIC_CONFIG` / :data:`PUBLIC_COMMON`.  ``overrides`` replace any
    :class:`EDFConfig` or :class:`MatchConfig` field by name."""
    row = table8_row(ipc, dataset)
    key = 1 if ipc == 1 else 10 if ipc <= 10 else 50
    match_kw: dict[str, Any] = dict(PUBLIC_COMMON)
    match_kw.update(PUBLIC_CONFIG[key])
    match_kw.update(iterations=int(row["iterations"]), batch_syn=int(row["batch_syn"]), lr_img=row["lr_img"],
                    lr_label=row["lr_label"], syn_steps=int(row["syn_steps"]))
    edf_kw: dict[str, Any] = dict(alpha=row["alpha"], beta=row["beta"], cam_every=int(row["cam_every"]))
    match_fields = set(MatchConfig.__dataclass_fields__)
    edf_fields = set(EDFConfig.__dataclass_fields__) - {"match"}
    for name, value in overrides.items():
        if name in edf_fields:
            edf_kw[name] = value
        elif name in match_fields:
            match_kw[name] = value
        else:
            raise ValueError(f"unknown EDF parameter {name!r}; EDFConfig: {sorted(edf_fields)}, "
                             f"MatchConfig: {sorted(match_fields)}")
    return EDFConfig(match=MatchConfig(**match_kw), **edf_kw)


# ============================================================================ CPD (Eq. 1-2)


def dropout_count(alpha: float, num_terms: int) -> int:
    """``floor(alpha * P)`` of Eq. 2 (a 1e-9 slack absorbs float error such as
    ``0.7 * 10 = 7.000000000000001`` / ``6.9999...``)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha (CPD dropout ratio) must be in [0, 1), got {alpha}")
    return int(math.floor(alpha * num_terms + 1e-9))


def per_tensor_terms(num: torch.Tensor, den: torch.Tensor, numels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the per-element terms ``[P]`` over each parameter tensor -> ``([T], [T])``."""
    if sum(numels) != num.shape[0]:
        raise ValueError(f"numels sum to {sum(numels)}, terms have {num.shape[0]}")
    return (torch.stack([t.sum() for t in torch.split(num, list(numels))]),
            torch.stack([t.sum() for t in torch.split(den, list(numels))]))


def common_pattern_dropout(
    num: torch.Tensor, den: torch.Tensor, alpha: float, normalize: str = "kept"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Common Pattern Dropout (Eq. 2) on the per-parameter terms of Eq. 1.

    Sorts ``num`` ascending (stable: ties keep index order), drops the first
    ``d = floor(alpha * P)`` and returns

    * ``normalize="kept"``: ``sum_{i kept} num_i / sum_{i kept} den_i`` (reference code:
      numerator and normalizer over the same kept parameters; equals Eq. 1 at alpha = 0);
    * ``normalize="full"``: ``sum_{i kept} num_i / sum_i den_i``.

    Args:
        num: ``[P]`` ``(theta_hat_{s+N} - theta*_{s+M})^2`` terms (differentiable).
        den: ``[P]`` ``(theta*_s - theta*_{s+M})^2`` terms.

    Returns:
        ``(loss scalar, keep [P] bool)``; dropped terms get no gradient.
    """
    if num.ndim != 1 or num.shape != den.shape:
        raise ValueError(f"num and den must be equal [P] vectors, got {tuple(num.shape)}, {tuple(den.shape)}")
    if normalize not in ("kept", "full"):
        raise ValueError(f"normalize must be 'kept' or 'full', got {normalize!r}")
    p = num.shape[0]
    d = dropout_count(alpha, p)
    keep = torch.ones(p, dtype=torch.bool, device=num.device)
    if d > 0:
        order = torch.argsort(num.detach(), stable=True)
        keep[order[:d]] = False
    loss_num = num[keep].sum()
    loss_den = den[keep].sum() if normalize == "kept" else den.sum()
    return loss_num / loss_den, keep


# ============================================================================ DAE (Eq. 3-5)


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
    cam = F.interpolate(cam[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]
    return normalize_minmax(cam)


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


def synthetic_cams(
    cam_model: nn.Module,
    images: torch.Tensor,
    cam_idx: np.ndarray | torch.Tensor,
    cam_image_size: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Grad-CAM maps ``M [N, H, W]`` in [0, 1] of normalized float ``images [N, C, H, W]``
    for CAM-model classes ``cam_idx [N]`` (Eq. 3), batched; images are resized to
    ``cam_image_size`` for the model when given and the maps returned at ``(H, W)``."""
    n, _, h, w = images.shape
    idx = torch.as_tensor(np.asarray(cam_idx) if not isinstance(cam_idx, torch.Tensor) else cam_idx,
                          dtype=torch.long).reshape(-1)
    if idx.shape[0] != n:
        raise ValueError(f"{n} images but {idx.shape[0]} CAM class indices")
    out = []
    for s in range(0, n, batch_size):
        xb = images[s : s + batch_size].detach()
        if cam_image_size is not None:
            xb = resize_float(xb, (cam_image_size, cam_image_size))
        out.append(grad_cam(cam_model, xb, idx[s : s + batch_size], size=(h, w)))
    return torch.cat(out) if out else images.new_zeros((0, h, w))


def dae_weights(cam: torch.Tensor, beta: float, threshold: float | None = None) -> torch.Tensor:
    """``F(M, beta)`` of Eq. 4, broadcastable over channels.

    ``F(M^i_hw) = 1`` if ``M^i_hw < thr_i`` and ``beta + M^i_hw`` if ``M^i_hw >= thr_i``,
    where ``thr_i = mean(M^i)`` (per image; Eq. 4) or the fixed ``threshold``.

    Args:
        cam: ``[N, H, W]`` activation maps in [0, 1].

    Returns:
        float32 ``[N, 1, H, W]``; Eq. 5 is ``grad * F`` (element-wise, every channel).
    """
    if cam.ndim != 3:
        raise ValueError(f"cam must be [N, H, W], got {tuple(cam.shape)}")
    if beta < 0:
        raise ValueError(f"beta (enhancement factor) must be >= 0, got {beta}")
    m = cam.float()
    thr = m.mean(dim=(1, 2), keepdim=True) if threshold is None else torch.full_like(m[:, :1, :1], float(threshold))
    return torch.where(m >= thr, beta + m, torch.ones_like(m))[:, None]


def discriminative_share(cam: torch.Tensor) -> torch.Tensor:
    """Per-image share of pixels at or above the image's mean activation (Sec. 5 /
    Fig. 5b statistic); ``cam [N, H, W]`` -> ``[N]``."""
    return (cam >= cam.mean(dim=(1, 2), keepdim=True)).float().mean(dim=(1, 2))


# ============================================================================ Comp-DD (Sec. 3, App. D)


def image_complexity(cams: torch.Tensor | np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Comp-DD image complexity ``1 - (1/HW) sum_hw 1[M_hw >= threshold]`` (Sec. 3, App. D.2).

    Args:
        cams: ``[N, H, W]`` Grad-CAM maps in [0, 1].

    Returns:
        float64 ``[N]`` in [0, 1]; higher = smaller high-activation area = more complex.
    """
    m = torch.as_tensor(np.asarray(cams) if not isinstance(cams, torch.Tensor) else cams).detach().cpu()
    if m.ndim != 3:
        raise ValueError(f"cams must be [N, H, W], got {tuple(m.shape)}")
    share = (m >= threshold).double().mean(dim=(1, 2))
    return (1.0 - share).numpy()


def class_complexity(
    complexity: np.ndarray, labels: np.ndarray | Sequence[int], class_names: Sequence[str]
) -> pd.DataFrame:
    """Per-class mean of the image complexities (Sec. 3).

    Returns:
        DataFrame with one row per class of ``class_names`` (in index order): ``class_index``,
        ``class_name``, ``complexity`` (mean over the class's images; NaN without images),
        ``high_activation_share`` (``1 - complexity``), ``n_images``.
    """
    c = np.asarray(complexity, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if c.shape != lab.shape:
        raise ValueError(f"{c.shape[0]} complexities but {lab.shape[0]} labels")
    k = len(class_names)
    if lab.size and (lab.min() < 0 or lab.max() >= k):
        raise ValueError(f"labels must be in [0, {k}) (len(class_names))")
    count = np.bincount(lab, minlength=k)
    total = np.bincount(lab, weights=c, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return pd.DataFrame({
        "class_index": np.arange(k, dtype=np.int64),
        "class_name": [str(n) for n in class_names],
        "complexity": mean,
        "high_activation_share": 1.0 - mean,
        "n_images": count.astype(np.int64),
    })


def dataset_complexity(
    model: nn.Module,
    batches: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    target: str = "label",
    cam_class_names: Sequence[str] | None = None,
    image_size: int | None = None,
) -> pd.DataFrame:
    """Comp-DD class complexities of a streamed dataset (Sec. 3): Grad-CAM of every image,
    :func:`image_complexity`, :func:`class_complexity`.  Only per-image scalars are kept.

    Args:
        model: the complexity model (the paper: a pre-trained ResNet), on ``device``.
        batches: ``(uint8 [B, C, H, W], labels [B])`` with labels indexing ``class_names``.
        target: ``"label"`` (CAM of the image's own class, mapped by name through
            ``cam_class_names`` when given) or ``"predicted"`` (the model's argmax class, as
            the authors' extraction script does).
        image_size: resize images to this before the model (``None`` = as they are).
    """
    if target not in ("label", "predicted"):
        raise ValueError(f"target must be 'label' or 'predicted', got {target!r}")
    comps, labs = [], []
    for images, labels in batches:
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
        x = to_model_input(images, mean, std, device)
        if image_size is not None:
            x = resize_float(x, (image_size, image_size))
        if target == "predicted":
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    idx = model(x).argmax(1).cpu().numpy()
            finally:
                model.train(was)
        elif cam_class_names is not None:
            idx = cam_class_indices(lab, class_names, cam_class_names)
        else:
            idx = lab
        comps.append(image_complexity(grad_cam(model, x, idx), threshold))
        labs.append(lab)
    if not comps:
        raise ValueError("dataset_complexity got no batches")
    return class_complexity(np.concatenate(comps), np.concatenate(labs), class_names)


@dataclass
class EasyHardSplit:
    """``easy`` / ``hard``: rows of the :func:`class_complexity` table (ascending resp.
    descending complexity)."""

    easy: pd.DataFrame
    hard: pd.DataFrame


def split_easy_hard(table: pd.DataFrame, k: int | None = 10, threshold: float | None = None) -> EasyHardSplit:
    """Comp-DD subset selection (Sec. 3 "Subset Selection").

    By rank (``threshold=None``, the paper): classes sorted by complexity descending (ties
    by ``class_index``); ``hard`` = the ``k`` most complex, ``easy`` = the ``k`` least
    complex; needs ``2k`` classes with images (the paper uses categories of >= 20 classes).
    By threshold: ``hard`` = complexity >= threshold, ``easy`` = below (``k`` ignored).
    Classes without images (NaN complexity) are left out.
    """
    t = table.dropna(subset=["complexity"])
    desc = t.sort_values(["complexity", "class_index"], ascending=[False, True], kind="mergesort")
    if threshold is not None:
        hard = desc[desc["complexity"] >= threshold]
        easy = desc[desc["complexity"] < threshold].iloc[::-1]
    else:
        if k is None or k < 1:
            raise ValueError(f"k must be >= 1 when splitting by rank, got {k}")
        if 2 * k > len(desc):
            raise ValueError(f"need 2k={2 * k} classes with images to split into easy/hard, have {len(desc)}")
        hard = desc.iloc[:k]
        easy = desc.iloc[::-1].iloc[:k]
    return EasyHardSplit(easy=easy.reset_index(drop=True), hard=hard.reset_index(drop=True))


# ============================================================================ EDF loop (Algorithm 1)


def _validate(cfg: EDFConfig) -> None:
    if cfg.cpd_granularity not in ("element", "tensor"):
        raise ValueError(f"EDFConfig.cpd_granularity must be 'element' or 'tensor', got {cfg.cpd_granularity!r}")
    if cfg.cpd_normalize not in ("kept", "full"):
        raise ValueError(f"EDFConfig.cpd_normalize must be 'kept' or 'full', got {cfg.cpd_normalize!r}")
    dropout_count(cfg.alpha, 1)  # range check
    if cfg.cam_every < 1:
        raise ValueError(f"EDFConfig.cam_every (K) must be >= 1, got {cfg.cam_every}")
    if cfg.beta < 0:
        raise ValueError(f"EDFConfig.beta must be >= 0, got {cfg.beta}")


def check_config(cfg: EDFConfig, num_experts: int, num_epochs: int) -> None:
    """Raise a ``ValueError`` when ``cfg`` cannot run on trajectories of ``num_experts``
    experts x ``num_epochs`` epochs (checked before any expert is trained): EDF ranges, the
    start-epoch window (``max_start_epoch - 1 + expert_epochs <= E``), ``syn_steps``/``batch_syn``."""
    from types import SimpleNamespace

    from dd_assets.methods.trajectories import _validate_match

    m = cfg.match
    if m.syn_steps < 1 or (m.batch_syn is not None and m.batch_syn < 1):
        raise ValueError(f"syn_steps and batch_syn must be >= 1, got {m.syn_steps}, {m.batch_syn}")
    _validate(cfg)
    _validate_match(m, SimpleNamespace(num_epochs=int(num_epochs), num_experts=int(num_experts)))


@register("synthesize", "edf")
def edf_distill(
    real_init: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    trajectories: ExpertTrajectories,
    cam_model: nn.Module | None,
    cfg: EDFConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
    cam_class_names: Sequence[str] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> DistillResult:
    """EDF (Algorithm 1): trajectory matching with Common Pattern Dropout and
    Discriminative Area Enhancement.

    Per iteration ``t`` (see :func:`trajectory_matching_distill` for the matching part)::

        (num, den) = per-parameter terms of Eq. 1
        L_edf = common_pattern_dropout(num, den, alpha)          (Eq. 2; use_cpd)  else Eq. 1
        if t mod K == 0: M = GradCAM_G(D_syn) for each image's class   (Eq. 3; use_dae)
        grad_x <- grad_x * F(M, beta)                            (Eq. 4-5; use_dae)
        D_syn <- SGD step (lr_pixel, momentum)                   (line 19)

    With both modules off this is exactly :func:`dd_assets.methods.trajectories.mtt_distill`.

    Args:
        real_init: uint8 ``[N, C, H, W]`` initial synthetic images (real images, chosen by
            the caller).
        labels: ``[N]`` class indices (into ``class_names`` and the experts' label space).
        trajectories: expert trajectories (:func:`dd_assets.methods.trajectories.train_experts`).
        cam_model: Grad-CAM model ``G`` trained on real data, with ``forward_features`` /
            ``forward_head``; it sees the synthetic images normalized with the same
            ``mean``/``std`` (resized to ``cfg.cam_image_size`` when set).  Moved to
            ``device``.  May be ``None`` when ``use_dae`` is off.
        class_names: names of the label indices; cam_class_names: the CAM model's class
            names in its index order.  Required with DAE: each label is mapped by *name*
            (:func:`cam_class_indices`); a class missing from the CAM model is a ``ValueError``.
        on_step: ``on_step(t, {"loss", "lr", "expert", "start_epoch", "skipped"[, "cpd_dropped"]})``.

    Returns:
        :class:`DistillResult`; ``extra`` holds ``cam_iterations`` (when the maps were
        recomputed), ``discriminative_share`` (mean share of pixels >= the image mean at
        each recomputation) and ``cpd_dropped`` (terms dropped in the last iteration).
    """
    _validate(cfg)
    device = torch.device(device)
    extra: dict[str, Any] = {"cam_iterations": [], "discriminative_share": [], "cpd_dropped": 0}
    numels = [math.prod(s) for s in trajectories.shapes]

    def cpd_reduce(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        if cfg.cpd_granularity == "tensor":
            num, den = per_tensor_terms(num, den, numels)
        loss, keep = common_pattern_dropout(num, den, cfg.alpha, cfg.cpd_normalize)
        extra["cpd_dropped"] = int((~keep).sum())
        return loss

    grad_hook: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    if cfg.use_dae:
        if cam_model is None:
            raise ValueError("edf_distill with use_dae=True needs cam_model (a model trained on real data)")
        if class_names is None or cam_class_names is None:
            raise ValueError("edf_distill with use_dae=True needs class_names and cam_class_names "
                             "to map each synthetic label to the CAM model's class index by name")
        cam_idx = torch.from_numpy(cam_class_indices(labels, class_names, cam_class_names))
        cam_model.to(device)
        state: dict[str, torch.Tensor] = {}

        def dae_hook(it: int, images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            if it % cfg.cam_every == 0 or "w" not in state:  # Algorithm 1 lines 15-17
                cams = synthetic_cams(cam_model, images, cam_idx, cfg.cam_image_size, cfg.cam_batch_size)
                state["w"] = dae_weights(cams, cfg.beta, cfg.cam_threshold).to(grad.device)
                extra["cam_iterations"].append(it)
                extra["discriminative_share"].append(float(discriminative_share(cams).mean()))
            return grad * state["w"]  # Eq. 5

        grad_hook = dae_hook

    def step_cb(it: int, metrics: dict[str, float]) -> None:
        if on_step is not None:
            if cfg.use_cpd:
                metrics = {**metrics, "cpd_dropped": float(extra["cpd_dropped"])}
            on_step(it, metrics)

    result = trajectory_matching_distill(real_init, labels, trajectories, cfg.match, mean, std, device,
                                         reduce=cpd_reduce if cfg.use_cpd else eq1_loss, grad_hook=grad_hook,
                                         on_step=step_cb)
    result.extra.update(extra)
    return result


def ablation_configs(cfg: EDFConfig) -> dict[str, EDFConfig]:
    """The four Table 4 rows from one config: ``"mtt"`` (no module), ``"cpd"``, ``"dae"``,
    ``"edf"`` (both)."""
    return {
        "mtt": replace(cfg, use_cpd=False, use_dae=False),
        "cpd": replace(cfg, use_cpd=True, use_dae=False),
        "dae": replace(cfg, use_cpd=False, use_dae=True),
        "edf": replace(cfg, use_cpd=True, use_dae=True),
    }
