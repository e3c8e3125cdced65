"""Training loops: the teacher on the real data, students on distilled sets, evaluation.

All loops take a ``device`` and draw every random number from generators seeded by
``TrainConfig.seed`` (augmentation and batch order from a CPU ``torch.Generator``, model
randomness such as dropout from a forked, seeded global RNG), so two CPU runs with the
same seed and the same initial weights end with identical weights.

Model selection is on validation accuracy only: both loops evaluate every
``eval_every`` epochs and at the last epoch, keep a copy of the best epoch's
``state_dict`` and load it back into the model before returning.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dd_assets.core.imaging import as_tensor, to_model_input
from dd_assets.core.soft_labels import SoftLabels, ViewParams, render_views, sample_views

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "onecycle")


@dataclass
class TrainConfig:
    """Hyper-parameters shared by :func:`train_teacher` and :func:`train_student`.

    ``optimizer=None`` picks the loop's default (SGD+Nesterov for the teacher, AdamW for
    students).  ``scheduler``: ``"cosine"`` (per step, from ``lr`` to 0) or ``"onecycle"``.
    ``temperature``: KD temperature (20 as in RDED).  ``eval_every``: epochs between
    validation evaluations (the last epoch is always evaluated).
    """

    epochs: int = 100
    lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 128
    optimizer: str | None = None
    momentum: float = 0.9
    scheduler: str = "cosine"
    temperature: float = 20.0
    eval_every: int = 1
    seed: int = 0
    label_smoothing: float = 0.0


@dataclass
class TrainResult:
    """``best_state``: CPU copy of the best-validation ``state_dict``; ``best_epoch``:
    its 0-based epoch; ``history``: one dict per epoch (see ``on_epoch``)."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)


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


# ---------------------------------------------------------------------------- helpers


def _make_optimizer(model: nn.Module, cfg: TrainConfig, default: str) -> torch.optim.Optimizer:
    name = cfg.optimizer or default
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class _Schedule:
    """Per-step learning-rate schedule that never steps past ``total_steps``."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> None:
        self.total = max(1, total_steps)
        self.steps = 0
        self.opt = opt
        if cfg.scheduler == "cosine":
            total = self.total
            self.sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
            )
        elif cfg.scheduler == "onecycle":
            self.sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=self.total)
        else:
            raise ValueError(f"unknown scheduler {cfg.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def step(self) -> None:
        if self.steps < self.total - 1 or isinstance(self.sched, torch.optim.lr_scheduler.LambdaLR):
            self.sched.step()
        self.steps += 1


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Fork the global torch RNG (CPU, plus ``device`` if CUDA) and seed it; restored on exit."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def random_crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (reflect padding ``pad``) + horizontal flip of float ``[B, C, H, W]``.

    Random numbers come from CPU generator ``gen`` (device-independent).  Returns ``[B, C, H, W]``.
    """
    b, c, h, w = x.shape
    flips = torch.rand(b, generator=gen) < 0.5
    if pad > 0:
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        rows = (oy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (ox.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[bi, ci, rows, cols]
    return torch.where(flips.to(x.device).view(b, 1, 1, 1), x.flip(-1), x)


class _BestTracker:
    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch = -1
        self.acc = float("-inf")

    def update(self, model: nn.Module, epoch: int, acc: float) -> None:
        if acc > self.acc:
            self.acc, self.epoch = float(acc), epoch
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def result(self, model: nn.Module, history: list[dict[str, Any]]) -> TrainResult:
        if self.state is None:
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            model.load_state_dict(self.state)
        return TrainResult(best_state=self.state, best_epoch=self.epoch, best_val_acc=self.acc, history=history)


def _should_eval(epoch: int, cfg: TrainConfig) -> bool:
    return (epoch + 1) % max(1, cfg.eval_every) == 0 or epoch == cfg.epochs - 1


def _finish_epoch(
    model: nn.Module,
    epoch: int,
    cfg: TrainConfig,
    stats: tuple[float, int, int],
    lr: float,
    t0: float,
    evaluate_val: Callable[[nn.Module], float],
    tracker: _BestTracker,
    history: list[dict[str, Any]],
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> None:
    loss_sum, correct, seen = stats
    val_acc: float | None = None
    if _should_eval(epoch, cfg):
        val_acc = float(evaluate_val(model))
        tracker.update(model, epoch, val_acc)
    record = {
        "epoch": epoch,
        "train_loss": loss_sum / max(1, seen),
        "train_acc": correct / max(1, seen),
        "val_acc": val_acc,
        "lr": lr,
        "seconds": time.perf_counter() - t0,
    }
    history.append(record)
    if on_epoch is not None:
        on_epoch(record)


# ---------------------------------------------------------------------------- teacher


def train_teacher(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    evaluate_val: Callable[[nn.Module], float],
    cfg: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    augment: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` with cross-entropy on streamed real data.

    ``train_batches(epoch)`` yields ``(uint8 [B, C, H, W], int64 [B])`` batches of that
    (0-based) epoch; ``steps_per_epoch`` sizes the per-step schedule.  Augmentation
    (``augment``): random crop with reflect padding ``H // 8`` + horizontal flip.
    Optimizer default: SGD with Nesterov momentum.  ``evaluate_val(model) -> accuracy``
    is called every ``cfg.eval_every`` epochs and at the last; ``on_epoch`` receives
    ``{"epoch", "train_loss", "train_acc", "val_acc" (None when not evaluated), "lr"
    (of the epoch's last step), "seconds"}``.  On return the model holds the best
    validation epoch's weights (also in ``TrainResult.best_state``).
    """
    device = torch.device(device)
    model.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _make_optimizer(model, cfg, "sgd")
    sched = _Schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    tracker, history = _BestTracker(), []
    with _seeded_global_rng(cfg.seed, device):
        for epoch in tqdm(range(cfg.epochs), desc="teacher", disable=not progress):
            t0 = time.perf_counter()
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            lr = sched.lr()
            for images, labels in train_batches(epoch):
                x = to_model_input(images, mean, std, device)
                if augment:
                    x = random_crop_flip(x, x.shape[-2] // 8, gen)
                y = torch.as_tensor(labels).to(device=device, dtype=torch.long)
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr = sched.lr()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
            _finish_epoch(
                model, epoch, cfg, (loss_sum, correct, seen), lr, t0, evaluate_val, tracker, history, on_epoch
            )
    return tracker.result(model, history)


# ---------------------------------------------------------------------------- student


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
    if sum(x is not None for x in (soft, teacher, dbr)) > 1:
        raise ValueError("pass one of soft labels, an online teacher or DBR labels")
    device = torch.device(device)
    imgs = as_tensor(images).to(device)
    n, size = imgs.shape[0], imgs.shape[-1]
    labels = torch.as_tensor(np.asarray(hard_labels), dtype=torch.long).to(device)
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if soft is not None:
        views = soft.views
    elif dbr is not None:  # NRR-DD distance-based labels (Eq. 9-10) replay their own views
        from dd_assets.core.dbr import student_loss

        views = dbr.views
        labels_np = np.asarray(hard_labels, dtype=np.int64)
    elif views is None:
        views = sample_views(n, cfg.epochs, size, seed=cfg.seed)
    if views.num_images != n:
        raise ValueError(f"{n} images but views for {views.num_images}")
    if teacher is not None:
        teacher.to(device).eval()
    lam_all = torch.from_numpy(views.lam).to(device)
    partner_all = torch.from_numpy(views.partner.astype(np.int64)).to(device)

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
                if soft is not None:
                    loss = kd_loss(logits, soft.dense_logits(e, idx).to(device), cfg.temperature)
                elif dbr is not None:
                    y_org, y_aug, d_org, d_aug = (t.to(device) for t in dbr.batch_targets(e, idx, labels_np))
                    loss, _ = student_loss(logits, y_org, y_aug, d_org, d_aug, dbr_r, dbr_alpha)
                elif teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x).float()
                    loss = kd_loss(logits, t_logits, cfg.temperature)
                else:
                    target = mixed_targets(
                        labels[idx_d],
                        labels[partner_all[idx_d, e]],
                        lam_all[idx_d, e],
                        logits.shape[1],
                        cfg.label_smoothing,
                    )
                    loss = soft_cross_entropy(logits, target)
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


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
) -> float:
    """Top-1 accuracy (in [0, 1]) over ``(uint8 [B, C, H, W], labels [B])`` batches, in eval
    mode (the model's previous mode is restored)."""
    was_training = model.training
    model.eval()
    correct, seen = 0, 0
    try:
        for images, labels in batches:
            logits = model(to_model_input(images, mean, std, device))
            y = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(logits.device)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("evaluate got no batches")
    return correct / seen


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Eval-mode logits of uint8 ``[N, C, H, W]`` images -> float32 ``[N, num_classes]`` on CPU."""
    imgs = as_tensor(images)
    was_training = model.training
    model.eval()
    try:
        out = [
            model(to_model_input(imgs[s : s + batch_size], mean, std, device)).float().cpu()
            for s in range(0, imgs.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out)
