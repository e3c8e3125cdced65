"""Trajectory matching (MTT, with DATM's options): the outer distillation loop, pure torch/numpy.

Papers: MTT = Cazenavette et al., "Dataset Distillation by Matching Training Trajectories"
(CVPR 2022); DATM = Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned
Trajectory Matching" (ICLR 2024).  EDF (:mod:`dd_assets.methods.edf.distill`) is built on this
module; its Sec. 2.1 restates MTT's loss as its Eq. 1.

Per distillation iteration draw an expert ``k`` and a start epoch ``s`` (uniform in
``[min_start_epoch, max_start_epoch)``), start a student at ``theta*_s``, take ``N =
syn_steps`` SGD steps on (augmented) synthetic batches with a *learnable* learning rate
``alpha`` (:func:`dd_assets.methods.edf.student.unroll_student`), and compare with the expert
``M = expert_epochs`` epochs later::

    L = ||theta_hat_{s+N} - theta*_{s+M}||^2 / ||theta*_s - theta*_{s+M}||^2     (Eq. 1)

-> :class:`MatchConfig`, :func:`trajectory_matching_distill` (the outer loop, with hooks used
by EDF) and :func:`mtt_distill` (``("synthesize", "mtt")``).

DATM options (all off by default): learnable soft labels initialized from an expert's logits
(trained with a soft cross-entropy), a start-epoch window whose upper bound grows linearly
from ``initial_max_start_epoch`` to ``max_start_epoch`` over ``expansion_end_iteration``
iterations ("sequential generation"), and skipping the update when the matching loss exceeds
``max_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dd_assets.core.dsa import DSAConfig
from dd_assets.core.imaging import as_tensor, to_model_input, to_uint8
from dd_assets.methods.edf.experts import ExpertTrajectories, expert_logits
from dd_assets.methods.edf.student import FunctionalModel, eq1_loss, param_match_terms, unroll_student


@dataclass
class MatchConfig:
    """Outer-loop hyper-parameters of trajectory matching (MTT, DATM options).

    ``iterations`` (T); ``syn_steps`` (N student steps); ``expert_epochs`` (M);
    start epoch ``s`` uniform in ``[min_start_epoch, max_start_epoch)`` (needs
    ``max_start_epoch - 1 + expert_epochs <= E``); ``batch_syn``: synthetic images per
    student step (``None`` = all); ``lr_img`` / ``img_momentum``: SGD on the normalized
    pixels; ``lr_init``: initial student learning rate (``None`` = the experts' lr);
    ``lr_lr`` / ``lr_momentum``: SGD on it; ``lr_param``: ``"raw"`` learns ``alpha``
    itself (MTT code), ``"log"`` learns ``log alpha`` (always positive); ``augment``: DSA
    of the synthetic batches (``None`` = off); ``seed``.

    DATM options: ``soft_labels`` (learnable logits initialized from expert
    ``soft_label_expert``'s final checkpoint on the initial images, SGD ``lr_label`` /
    ``label_momentum``); ``sequential``: the upper start-epoch bound grows linearly from
    ``initial_max_start_epoch`` at iteration 0 to ``max_start_epoch`` at
    ``expansion_end_iteration``; ``max_loss``: skip all updates of an iteration whose
    matching loss exceeds it (``None`` = never skip).
    """

    iterations: int = 5000
    syn_steps: int = 20
    expert_epochs: int = 2
    min_start_epoch: int = 0
    max_start_epoch: int = 20
    batch_syn: int | None = None
    lr_img: float = 1000.0
    img_momentum: float = 0.5
    lr_init: float | None = None
    lr_lr: float = 1e-5
    lr_momentum: float = 0.5
    lr_param: str = "raw"
    augment: DSAConfig | None = field(default_factory=DSAConfig)
    seed: int = 0
    soft_labels: bool = False
    soft_label_expert: int = 0
    lr_label: float = 2.0
    label_momentum: float = 0.9
    sequential: bool = False
    initial_max_start_epoch: int = 10
    expansion_end_iteration: int = 1000
    max_loss: float | None = None


def start_epoch_bound(cfg: MatchConfig, iteration: int) -> int:
    """Exclusive upper bound of the start epoch at ``iteration`` (DATM sequential
    generation: ``initial + floor((max - initial) * it / expansion_end)``, capped at
    ``max_start_epoch``; constant ``max_start_epoch`` otherwise)."""
    if not cfg.sequential:
        return cfg.max_start_epoch
    grow = int((cfg.max_start_epoch - cfg.initial_max_start_epoch) * iteration / max(1, cfg.expansion_end_iteration))
    return min(cfg.initial_max_start_epoch + grow, cfg.max_start_epoch)


def _validate_match(cfg: MatchConfig, traj: ExpertTrajectories) -> None:
    e = traj.num_epochs
    if cfg.iterations < 0:
        raise ValueError(f"MatchConfig.iterations must be >= 0, got {cfg.iterations}")
    if cfg.expert_epochs < 1:
        raise ValueError(f"MatchConfig.expert_epochs must be >= 1, got {cfg.expert_epochs}")
    if not 0 <= cfg.min_start_epoch < cfg.max_start_epoch:
        raise ValueError(f"need 0 <= min_start_epoch < max_start_epoch, got {cfg.min_start_epoch}, {cfg.max_start_epoch}")
    if cfg.max_start_epoch - 1 + cfg.expert_epochs > e:
        raise ValueError(f"max_start_epoch={cfg.max_start_epoch} with expert_epochs={cfg.expert_epochs} needs "
                         f"trajectories of >= {cfg.max_start_epoch - 1 + cfg.expert_epochs} epochs, they have {e}")
    if cfg.sequential and not cfg.min_start_epoch < cfg.initial_max_start_epoch <= cfg.max_start_epoch:
        raise ValueError(f"need min_start_epoch < initial_max_start_epoch <= max_start_epoch, got "
                         f"{cfg.min_start_epoch}, {cfg.initial_max_start_epoch}, {cfg.max_start_epoch}")
    if cfg.lr_param not in ("raw", "log"):
        raise ValueError(f"MatchConfig.lr_param must be 'raw' or 'log', got {cfg.lr_param!r}")
    if not 0 <= cfg.soft_label_expert < traj.num_experts:
        raise ValueError(f"MatchConfig.soft_label_expert={cfg.soft_label_expert} not in [0, {traj.num_experts})")


@dataclass
class DistillResult:
    """Output of :func:`trajectory_matching_distill`.

    ``images``: uint8 ``[N, C, H, W]`` (de-normalized, clamped to [0, 1], rounded);
    ``images_float``: float32 ``[N, C, H, W]`` normalized pixels as optimized (unclamped);
    ``labels``: int64 ``[N]`` hard labels; ``soft_labels``: float32 ``[N, num_classes]``
    learned logits or ``None``; ``lr``: final learned student learning rate;
    ``loss``: ``[T]`` matching loss per iteration (before its update); ``lr_curve``: ``[T]``
    student lr used per iteration; ``start_epochs`` / ``experts``: ``[T]`` draws;
    ``skipped``: iterations whose update was skipped (``max_loss``).
    """

    images: np.ndarray
    images_float: np.ndarray
    labels: np.ndarray
    soft_labels: np.ndarray | None
    lr: float
    loss: np.ndarray
    lr_curve: np.ndarray
    start_epochs: np.ndarray
    experts: np.ndarray
    skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


#: ``reduce(num [P], den [P]) -> scalar loss`` (default :func:`eq1_loss`).
LossReduce = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``grad_hook(iteration, images [N, C, H, W] detached, grad [N, C, H, W]) -> grad``.
GradHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_finite(hist: torch.Tensor, upto: int, checked: int) -> int:
    """Raise ``FloatingPointError`` for the first non-finite loss in ``hist[0, checked:upto]``
    (one read-back of a flag); returns ``upto``."""
    if upto > checked and not bool(torch.isfinite(hist[0, checked:upto]).all()):
        it = checked + int(torch.nonzero(~torch.isfinite(hist[0, checked:upto]))[0, 0])
        raise FloatingPointError(f"trajectory matching loss is {float(hist[0, it])} at iteration {it} "
                                 f"(student lr {float(hist[2, it]):.4g}); lower MatchConfig.lr_img / lr_lr")
    return upto


def trajectory_matching_distill(
    real_init: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    trajectories: ExpertTrajectories,
    cfg: MatchConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    reduce: LossReduce | None = None,
    grad_hook: GradHook | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    model: nn.Module | None = None,
    finite_check_every: int = 50,
) -> DistillResult:
    """Distill by trajectory matching (MTT Algorithm 1; DATM options of :class:`MatchConfig`).

    Synthetic images start as ``real_init`` (normalized with ``mean``/``std``); per
    iteration ``t`` in ``0..T-1``::

        k ~ U{0..K-1};  s ~ U[min_start_epoch, bound(t))          (bound: start_epoch_bound)
        theta_hat = unroll_student(theta*_{k,s}, A(x), y, alpha, N)
        L = reduce(param_match_terms(theta_hat, theta*_{k,s}, theta*_{k,s+M}))  (Eq. 1 default)
        backward; g_x <- grad_hook(t, x, g_x)                     (EDF's DAE, Eq. 5)
        if max_loss is None or L <= max_loss: SGD steps on x, alpha (and soft labels)

    Args:
        real_init: uint8 ``[N, C, H, W]`` initial synthetic images (real images).
        labels: ``[N]`` class indices of the experts' label space.
        trajectories: from :func:`train_experts` (its ``image_size``/``in_channels`` must
            match ``real_init``).
        reduce: ``(num [P], den [P]) -> loss``; default Eq. 1 (:func:`eq1_loss`); EDF
            passes Common Pattern Dropout.
        grad_hook: rewrites the pixel gradient before the update (EDF's DAE).
        on_step: ``on_step(t, {"loss", "lr", "expert", "start_epoch", "skipped"})``.
        model: network matching the trajectories' layout (default
            ``trajectories.build_model(device)``).
        finite_check_every: without ``on_step`` / ``max_loss`` the loop reads nothing back
            from the device: the per-iteration loss / lr stay there (one transfer after the
            loop) and the loss is checked for NaN/inf every this many iterations.  With
            ``on_step``, one transfer per iteration feeds it (and checks); with ``max_loss``,
            the skip decision reads the loss before the update (DATM option).

    Returns:
        :class:`DistillResult`.  Raises ``FloatingPointError`` naming the first iteration
        whose loss was non-finite (lower ``lr_img`` / ``lr_lr``), at the latest
        ``finite_check_every - 1`` iterations after it.
    """
    _validate_match(cfg, trajectories)
    if finite_check_every < 1:
        raise ValueError(f"finite_check_every must be >= 1, got {finite_check_every}")
    device = torch.device(device)
    imgs = as_tensor(real_init)
    n, c, h, w = imgs.shape
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"{n} images but {lab.shape[0]} labels")
    if n == 0:
        raise ValueError("real_init holds no images")
    if (c, h, w) != (trajectories.in_channels, trajectories.image_size, trajectories.image_size):
        raise ValueError(f"real_init images are {(c, h, w)}, the experts were trained on "
                         f"{(trajectories.in_channels, trajectories.image_size, trajectories.image_size)}")
    if int(lab.min()) < 0 or int(lab.max()) >= trajectories.num_classes:
        raise ValueError(f"labels must be in [0, {trajectories.num_classes}), got [{int(lab.min())}, {int(lab.max())}]")
    reduce = eq1_loss if reduce is None else reduce
    model = trajectories.build_model(device) if model is None else model.to(device)
    model.train()
    fm = FunctionalModel(model, trajectories.names, trajectories.shapes)
    if fm.num_params != trajectories.num_params:
        raise ValueError(f"model has {fm.num_params} parameters, trajectories {trajectories.num_params}")

    x = to_model_input(imgs, mean, std, device).requires_grad_(True)
    y = lab.to(device)
    lr0 = float(trajectories.expert_lr if cfg.lr_init is None else cfg.lr_init)
    if cfg.lr_param == "log" and lr0 <= 0:
        raise ValueError(f"lr_param='log' needs a positive initial lr, got {lr0}")
    lr_p = torch.tensor(math.log(lr0) if cfg.lr_param == "log" else lr0, device=device).requires_grad_(True)
    opts = [torch.optim.SGD([x], lr=cfg.lr_img, momentum=cfg.img_momentum),
            torch.optim.SGD([lr_p], lr=cfg.lr_lr, momentum=cfg.lr_momentum)]
    soft: torch.Tensor | None = None
    if cfg.soft_labels:
        soft = expert_logits(trajectories, x.detach(), cfg.soft_label_expert, -1, model).clone().requires_grad_(True)
        opts.append(torch.optim.SGD([soft], lr=cfg.lr_label, momentum=cfg.label_momentum))
        model.train()
    batch_syn = n if cfg.batch_syn is None else min(int(cfg.batch_syn), n)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_total = cfg.iterations
    losses = np.zeros(t_total, np.float64)
    lrs = np.zeros(t_total, np.float64)
    starts = np.zeros(t_total, np.int64)
    experts = np.zeros(t_total, np.int64)
    # per iteration, on the device: the loss, the lr recorded (raw: after the update, as it always
    # was) and the lr the iteration ran with (for the error message); float64 holds them exactly
    hist = torch.zeros((3, t_total), dtype=torch.float64, device=device)
    checked = 0  # iterations [0, checked) are known finite
    skipped = 0
    for it in range(t_total):
        k = int(rng.integers(trajectories.num_experts))
        s = int(rng.integers(cfg.min_start_epoch, start_epoch_bound(cfg, it)))
        start = trajectories.flat(k, s, device)
        target = trajectories.flat(k, s + cfg.expert_epochs, device)
        lr = lr_p.exp() if cfg.lr_param == "log" else lr_p
        student = unroll_student(fm, start, x, y if soft is None else soft, lr, cfg.syn_steps, batch_syn, gen,
                                 cfg.augment)
        loss = reduce(*param_match_terms(student, start, target))
        hist[0, it], hist[2, it] = loss.detach(), lr.detach()
        skip = False
        if cfg.max_loss is not None:  # the skip decision needs the value before the update
            loss_f = float(loss.detach())
            checked = it + 1 if math.isfinite(loss_f) else _check_finite(hist, it + 1, checked)
            skip = loss_f > cfg.max_loss
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        del student
        if grad_hook is not None and x.grad is not None:
            x.grad = grad_hook(it, x.detach(), x.grad)
        if skip:
            skipped += 1
        else:
            for opt in opts:
                opt.step()
        hist[1, it] = lr.detach()
        starts[it], experts[it] = s, k
        if on_step is not None:  # per-iteration floats were asked for: one transfer
            losses[it], lrs[it] = hist[:2, it].tolist()
            checked = it + 1 if math.isfinite(losses[it]) else _check_finite(hist, it + 1, checked)
            on_step(it, {"loss": losses[it], "lr": lrs[it], "expert": k, "start_epoch": s, "skipped": float(skip)})
        elif (it + 1) % finite_check_every == 0:
            checked = _check_finite(hist, it + 1, checked)
    _check_finite(hist, t_total, checked)
    losses[:], lrs[:] = hist[:2].cpu().numpy()  # the one transfer of the curves
    m_ = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s_ = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    final = x.detach()
    lr_final = float((lr_p.exp() if cfg.lr_param == "log" else lr_p).detach())
    return DistillResult(
        images=to_uint8(final * s_ + m_).cpu().numpy(),
        images_float=final.float().cpu().numpy(),
        labels=lab.numpy(),
        soft_labels=None if soft is None else soft.detach().float().cpu().numpy(),
        lr=lr_final, loss=losses, lr_curve=lrs, start_epochs=starts, experts=experts, skipped=skipped,
    )


def mtt_distill(
    real_init: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    trajectories: ExpertTrajectories,
    cfg: MatchConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> DistillResult:
    """Plain trajectory matching (MTT; DATM with ``cfg``'s DATM options): Eq. 1, no
    pixel-gradient reweighting.  Same as :func:`dd_assets.methods.edf.distill.edf_distill` with
    CPD and DAE off."""
    return trajectory_matching_distill(real_init, labels, trajectories, cfg, mean, std, device, on_step=on_step)
