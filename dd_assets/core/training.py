"""Training loops: the teacher on the real data, evaluation, and what every loop shares.

All loops take a ``device`` and draw every random number from generators seeded by
``TrainConfig.seed`` (augmentation and batch order from a CPU ``torch.Generator``, model
randomness such as dropout from a forked, seeded global RNG), so two CPU runs with the
same seed and the same initial weights end with identical weights.

Model selection is on validation accuracy only: both loops evaluate every
``eval_every`` epochs and at the last epoch, keep a copy of the best epoch's
``state_dict`` and load it back into the model before returning.

Students on distilled sets (soft labels, an online teacher, DBR labels or CutMix targets)
and FocusDC's Dynamic Fine-Tuning are in :mod:`dd_assets.core.student_training`.
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
