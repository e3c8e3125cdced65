"""NRR-DD stage 2, NRR (Non-Critical Region Refinement, Sec. 3.3).

Refine every synthetic image with ``L_C = L_ce(T(x), y) + alpha_bn * L_bn`` (Eq. 2, 3), but
scale each pixel's update by the non-critical mask ``M = max(0, eps - C)`` (Eq. 4, 5) so
critical pixels (``C >= eps``) keep their instance-specific detail.  With label refinement
(Eq. 11-12) the loss also pulls the teacher's prediction on a mixed view towards both classes.
-> :func:`nrr_mask`, :func:`bn_statistics_loss`, :func:`refine`.  Stage 3, DBR labels
(Sec. 3.4), is :mod:`dd_assets.core.dbr`.

Hyper-parameters (supplementary A): ``alpha_bn = 10``, ``eps = 0.5``, ``r = 0.4``,
``alpha_lr = 1``; refinement with Adam(lr 0.05, betas (0.5, 0.9)), batch 100, 2000
iterations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.dbr import DEFAULT_R, ce_distances, sce_loss
from dd_assets.core.device_loops import upload
from dd_assets.core.imaging import as_tensor, to_model_input, to_uint8
from dd_assets.methods.nrr.cams import image_cams

NO_BN_MESSAGE = "NRR needs a batch-norm teacher: set teacher.arch_kwargs.norm: batch"


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
        lam_t = upload(torch.as_tensor(lam, dtype=x_org.dtype), x_org.device).view(b, 1, 1, 1)
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
    return torch.where(upload(box[:, None], x_org.device), x_aug, x_org)


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
            Without it the step loop never reads a value back from the device; with it,
            the step's floats come back in one transfer per step (the caller asked for them).

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
                terms = {"ce": l_ce, "bn": l_bn}  # device scalars; read back only for on_step
                if label_refine:
                    perm = upload(torch.from_numpy(rng.permutation(x.shape[0])), device)
                    # Deviation/reading: "update x_org by Eq. 11" -> the partner x_aug is
                    # detached; gradients of L_lr reach the pixels through x_org only.
                    x_mix = _mix_batch(x, x[perm].detach(), cfg.mix, cfg.mix_alpha, rng)
                    d_org, d_aug = ce_distances(teacher(x_mix), y, y[perm])
                    l_lr = sce_loss(d_org, d_aug, cfg.r)
                    loss = loss + cfg.alpha_lr * l_lr
                    terms["lr"] = l_lr
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
                if on_step is not None:  # one transfer for all the step's floats
                    terms["loss"] = loss
                    on_step(bi, it, dict(zip(terms, torch.stack([t.detach() for t in terms.values()]).tolist())))
            out[sl] = to_uint8(x.detach() * s_ + m_).cpu()
    finally:
        teacher.train(was_training)
    return out.numpy()
