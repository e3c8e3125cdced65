"""Training students on distilled sets, and FocusDC's Dynamic Fine-Tuning on real subsets.

A student sees view ``e % E`` of every distilled image in epoch ``e`` (``soft_labels``'
replayed RandomResizedCrop + flip + CutMix views) and learns from stored soft labels (KD), an
online teacher, NRR-DD's DBR labels or CutMix one-hot targets.  Seeding, the per-step
schedule and model selection on validation accuracy are shared with the teacher loop in
:mod:`dd_assets.core.training`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dd_assets.core.imaging import as_tensor
from dd_assets.core.soft_labels import SoftLabels, ViewParams, render_views, sample_views
from dd_assets.core.training import (
    TrainConfig,
    TrainResult,
    _BestTracker,
    _finish_epoch,
    _make_optimizer,
    _Schedule,
    _seeded_global_rng,
)


# ---------------------------------------------------------------------------- losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T^2``, averaged over the batch (``batchmean``).

    ``student_logits``, ``teacher_logits``: ``[B, C]``.  Teacher entries of ``-inf``
    (classes outside a stored top-k) have probability 0 and contribute nothing.
    """
    t = temperature
    log_q = F.log_softmax(student_logits / t, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=1)
    p = log_p.exp()
    log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    return (p * (log_p - log_q)).sum(dim=1).mean() * (t * t)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-sum(target * log_softmax(logits))`` averaged over the batch; both ``[B, C]``."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def mixed_targets(
    labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor, num_classes: int, smoothing: float = 0.0
) -> torch.Tensor:
    """CutMix target ``lam * onehot(y) + (1 - lam) * onehot(y_partner)`` (each one-hot
    label-smoothed by ``smoothing``).  ``labels``, ``partner_labels``, ``lam``: ``[B]`` -> ``[B, C]``."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def onehot(y: torch.Tensor) -> torch.Tensor:
        return torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y.view(-1, 1), on)

    lam = lam.view(-1, 1).float()
    return lam * onehot(labels) + (1.0 - lam) * onehot(partner_labels)


# ---------------------------------------------------------------------------- student


class StudentObjective:
    """One student's targets and loss on a distilled set, shared by :func:`train_student` and
    :func:`dd_assets.core.bulk_students.train_students_bulk` (the same operations in both).

    Exactly one of ``soft`` (stored FKD logits), ``teacher`` (online) or ``dbr`` (NRR-DD's
    distance-based labels) may be given; none means CutMix-mixed one-hot targets.  The views
    are the labels' own, else ``views``, else ``sample_views(N, cfg.epochs, S, cfg.seed)``.
    """

    def __init__(self, imgs: torch.Tensor, hard_labels: np.ndarray | torch.Tensor, soft: SoftLabels | None,
                 cfg: TrainConfig, device: torch.device, teacher: nn.Module | None = None,
                 views: ViewParams | None = None, dbr: Any = None, dbr_r: float = 0.4, dbr_alpha: float = 1.0) -> None:
        if sum(x is not None for x in (soft, teacher, dbr)) > 1:
            raise ValueError("pass one of soft labels, an online teacher or DBR labels")
        self.n, size = imgs.shape[0], imgs.shape[-1]
        self.labels = torch.as_tensor(np.asarray(hard_labels), dtype=torch.long).to(device)
        if len(self.labels) != self.n:
            raise ValueError(f"{self.n} images but {len(self.labels)} labels")
        if soft is not None:
            views = soft.views
        elif dbr is not None:  # NRR-DD distance-based labels (Eq. 9-10) replay their own views
            views = dbr.views
            self.labels_np = np.asarray(hard_labels, dtype=np.int64)
        elif views is None:
            views = sample_views(self.n, cfg.epochs, size, seed=cfg.seed)
        if views.num_images != self.n:
            raise ValueError(f"{self.n} images but views for {views.num_images}")
        if teacher is not None:
            teacher.to(device).eval()
        self.views, self.soft, self.teacher, self.dbr = views, soft, teacher, dbr
        self.cfg, self.device, self.dbr_r, self.dbr_alpha = cfg, device, dbr_r, dbr_alpha
        self.lam_all = torch.from_numpy(views.lam).to(device)
        self.partner_all = torch.from_numpy(views.partner.astype(np.int64)).to(device)

    def loss(self, logits: torch.Tensor, x: torch.Tensor, e: int, idx: torch.Tensor, idx_d: torch.Tensor) -> torch.Tensor:
        """Scalar loss of ``logits [B, C]`` on view ``e`` of images ``idx`` (CPU) / ``idx_d`` (device)."""
        if self.soft is not None:
            return kd_loss(logits, self.soft.dense_logits(e, idx).to(self.device), self.cfg.temperature)
        if self.dbr is not None:
            from dd_assets.core.dbr import student_objective

            y_org, y_aug, d_org, d_aug = (t.to(self.device) for t in self.dbr.batch_targets(e, idx, self.labels_np))
            return student_objective(logits, y_org, y_aug, d_org, d_aug, self.dbr_r, self.dbr_alpha)[0]
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(x).float()
            return kd_loss(logits, t_logits, self.cfg.temperature)
        target = mixed_targets(
            self.labels[idx_d],
            self.labels[self.partner_all[idx_d, e]],
            self.lam_all[idx_d, e],
            logits.shape[1],
            self.cfg.label_smoothing,
        )
        return soft_cross_entropy(logits, target)



def train_student(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    hard_labels: np.ndarray | torch.Tensor,
    soft: SoftLabels | None,
    cfg: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    evaluate_val: Callable[[nn.Module], float],
    device: torch.device | str,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    views: ViewParams | None = None,
    dbr: Any = None,
    dbr_r: float = 0.4,
    dbr_alpha: float = 1.0,
) -> TrainResult:
    """Train ``model`` on a distilled set ``images`` (uint8 ``[N, C, S, S]``), ``hard_labels [N]``.

    Epoch ``e`` shows view ``e % E`` of every image (replayed by :func:`render_views`),
    in a seeded random order.  Targets:

    * ``soft`` given: ``kd_loss(student, soft.dense_logits(view), cfg.temperature)`` on
      ``soft.views``;
    * ``teacher`` given (online): the teacher (eval mode, no grad) labels the same rendered
      views on the fly, same KD loss;
    * neither: cross-entropy against ``lam * onehot(y) + (1 - lam) * onehot(y_partner)``.

    In the last two modes the views are ``views`` if given, else
    ``sample_views(N, cfg.epochs, S, cfg.seed)``.  Optimizer default: AdamW.  Model
    selection and ``on_epoch`` as in :func:`train_teacher`; ``train_acc`` is measured
    against ``hard_labels``.
    """
    device = torch.device(device)
    imgs = as_tensor(images).to(device)
    objective = StudentObjective(imgs, hard_labels, soft, cfg, device, teacher, views, dbr, dbr_r, dbr_alpha)
    n, views, labels = objective.n, objective.views, objective.labels
    model.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _make_optimizer(model, cfg, "adamw")
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    sched = _Schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    tracker, history = _BestTracker(), []
    with _seeded_global_rng(cfg.seed, device):
        for epoch in tqdm(range(cfg.epochs), desc="student", disable=not progress):
            t0 = time.perf_counter()
            model.train()
            e = epoch % views.epochs
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            lr = sched.lr()
            for start in range(0, n, cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                x = render_views(imgs, views, e, idx, mean, std, device=device)
                idx_d = idx.to(device)
                logits = model(x)
                loss = objective.loss(logits, x, e, idx, idx_d)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr = sched.lr()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == labels[idx_d]).sum())
                seen += len(idx)
            _finish_epoch(
                model, epoch, cfg, (loss_sum, correct, seen), lr, t0, evaluate_val, tracker, history, on_epoch
            )
    return tracker.result(model, history)


def dynamic_finetune(
    model: nn.Module,
    subset: Callable[[int], tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    teacher: nn.Module,
    cfg: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    evaluate_val: Callable[[nn.Module], float],
    device: torch.device | str,
    steps_per_epoch: int,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """FocusDC's Dynamic Fine-Tuning (App. 6.2.1) of a student trained on a distilled set.

    Epoch ``e`` fine-tunes on ``subset(e)`` — uint8 ``[n, C, S, S]`` real images with their
    labels, a fresh IPC-per-class random sample each epoch — with the same recipe as the
    distilled-set training (one RandomResizedCrop + flip + CutMix view per image per
    epoch, labelled on the fly by the teacher, KD loss at ``cfg.temperature``).  One
    optimizer and schedule span all epochs (``steps_per_epoch`` batches each); the
    epoch is selected on ``evaluate_val`` as everywhere else.
    """
    device = torch.device(device)
    model.to(device)
    teacher.to(device).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _make_optimizer(model, cfg, "adamw")
    sched = _Schedule(opt, cfg, cfg.epochs * max(1, steps_per_epoch))
    tracker, history = _BestTracker(), []
    with _seeded_global_rng(cfg.seed, device):
        for epoch in tqdm(range(cfg.epochs), desc="dft", disable=not progress):
            t0 = time.perf_counter()
            model.train()
            images, labels = subset(epoch)
            imgs = as_tensor(images)
            lab = torch.tensor(np.asarray(labels), dtype=torch.int64, device=device)
            n = imgs.shape[0]
            views = sample_views(n, 1, int(imgs.shape[-1]), seed=cfg.seed * 100_003 + epoch)
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct, seen, lr = 0.0, 0, 0, sched.lr()
            for start in range(0, n, cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                x = render_views(imgs, views, 0, idx, mean, std, device=device)
                logits = model(x)
                with torch.no_grad():
                    t_logits = teacher(x).float()
                loss = kd_loss(logits, t_logits, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr = sched.lr()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == lab[idx.to(device)]).sum())
                seen += len(idx)
            _finish_epoch(
                model, epoch, cfg, (loss_sum, correct, seen), lr, t0, evaluate_val, tracker, history, on_epoch
            )
    return tracker.result(model, history)
