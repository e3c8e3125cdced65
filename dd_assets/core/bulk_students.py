"""Several students trained at once: one vmapped model over stacked weights (issue 19, item 1).

A table of dataset-distillation results is hundreds of tiny student runs (rows x IPCs x seeds),
each far from filling a GPU.  :func:`train_students_bulk` trains ``K`` students in one loop:
their weights are stacked (``torch.func.stack_module_state``) and one
``vmap(functional_call)`` runs every member's forward and backward in the same kernels, one
AdamW steps all stacked tensors (AdamW is elementwise, so this is ``K`` independent
optimizers), and each epoch's views of a distilled set are rendered once and shared by the
members that train on it.  Everything else is per member and the same code as
:func:`~dd_assets.core.student_training.train_student`: the seeded batch order
(``torch.Generator().manual_seed(cfg.seed)``), the targets and loss
(:class:`~dd_assets.core.student_training.StudentObjective`), the cosine schedule, model
selection on validation accuracy at the same epochs.

Members may differ in seed, distilled set, labels and label mode; they must share the model
architecture, the number of images and every other ``TrainConfig`` field.  Results equal
one-at-a-time training up to float rounding (vmapped convolutions sum in another order);
``tests/test_bulk_students.py`` checks this member for member.  Per-step statistics stay on
the device (one transfer per epoch).  ``precision="bf16"`` runs the forward under CUDA
autocast (refused on other devices).
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from dd_assets.core.batched_views import renderer
from dd_assets.core.imaging import as_tensor
from dd_assets.core.soft_labels import SoftLabels, ViewParams, render_views
from dd_assets.core.student_training import StudentObjective
from dd_assets.core.training import TrainConfig, TrainResult, _BestTracker, _finish_epoch, _Schedule

PRECISIONS = ("fp32", "bf16")
RENDER_CACHE_BYTES = 1 << 30   # one epoch's rendered views of a set are kept when at most this big


@dataclass
class StudentJob:
    """One member of a bulk run: a freshly initialised ``model`` (its seed's weights), the
    distilled set ``images`` (uint8 ``[N, C, S, S]``) with ``hard_labels [N]``, its labels
    (``soft`` / ``teacher`` / ``dbr`` as in ``train_student``, or none for CutMix one-hot
    targets), ``views`` for the last two modes, and ``cfg`` (its seed)."""

    model: nn.Module
    images: np.ndarray | torch.Tensor
    hard_labels: np.ndarray | torch.Tensor
    cfg: TrainConfig
    soft: SoftLabels | None = None
    teacher: nn.Module | None = None
    views: ViewParams | None = None
    dbr: Any = None
    dbr_r: float = 0.4
    dbr_alpha: float = 1.0


class _Member(nn.Module):
    """Member ``k`` of the stacked weights, seen as a module (for evaluation and selection)."""

    def __init__(self, base: nn.Module, params: dict, buffers: dict, k: int) -> None:
        super().__init__()
        self.base, self.k = base, k
        self._params, self._buffers_k = params, buffers
        self._keys = list(base.state_dict().keys())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sliced = {n: t[self.k] for n, t in {**self._params, **self._buffers_k}.items()}
        return functional_call(self.base, sliced, (x,))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        both = {**self._params, **self._buffers_k}
        return OrderedDict((n, both[n][self.k].detach()) for n in self._keys)


def _check_jobs(jobs: Sequence[StudentJob], precision: str, device: torch.device) -> None:
    if not jobs:
        raise ValueError("train_students_bulk got no jobs")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"precision='bf16' needs a CUDA device (got {device}); use precision='fp32'")
    first = jobs[0].cfg
    for j in jobs[1:]:
        diff = [k for k, v in vars(j.cfg).items() if k != "seed" and v != getattr(first, k)]
        if diff:
            raise ValueError(f"bulk students must share every TrainConfig field but the seed; differ in {diff}")
        if [p.shape for p in j.model.parameters()] != [p.shape for p in jobs[0].model.parameters()]:
            raise ValueError("bulk students must share one architecture (parameter shapes differ)")


def train_students_bulk(
    jobs: Sequence[StudentJob],
    mean: Sequence[float],
    std: Sequence[float],
    evaluate_val: Callable[[nn.Module], float],
    device: torch.device | str,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    precision: str = "fp32",
    render_cache_bytes: int = RENDER_CACHE_BYTES,
    render: str = "exact",
) -> list[TrainResult]:
    """Train every job's student at once; returns one :class:`TrainResult` per job, in order,
    and loads each member's best-validation weights into its ``job.model``.

    ``on_epoch(k, record)`` gets member ``k``'s record (as ``train_student``'s ``on_epoch``).
    The model must draw no random numbers in its forward (no dropout): vmap refuses them.
    ``render``: ``"exact"`` (the per-image renderer, as ``train_student``) or ``"batched"``
    (:func:`~dd_assets.core.batched_views.render_views_batched`, equal up to float rounding,
    a few kernels per batch on a GPU).
    """
    device = torch.device(device)
    _check_jobs(jobs, precision, device)
    draw = renderer(render)
    cfg = jobs[0].cfg
    imgs = {}
    for j in jobs:   # one device copy per distinct distilled set
        imgs.setdefault(id(j.images), as_tensor(j.images).to(device))
    objs = [StudentObjective(imgs[id(j.images)], j.hard_labels, j.soft, j.cfg, device, j.teacher, j.views, j.dbr,
                             j.dbr_r, j.dbr_alpha) for j in jobs]
    n = objs[0].n
    if any(o.n != n for o in objs):
        raise ValueError(f"bulk students must train on sets of one size; got {sorted({o.n for o in objs})} images")
    models = [j.model.to(device) for j in jobs]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    members = [_Member(base, params, buffers, k) for k in range(len(jobs))]

    def forward(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    batched = vmap(forward, randomness="error")
    gens = [torch.Generator().manual_seed(j.cfg.seed) for j in jobs]
    opt = _make_stacked_adamw(list(params.values()), cfg)
    bs = cfg.batch_size
    sched = _Schedule(opt, cfg, cfg.epochs * math.ceil(n / bs))
    trackers = [_BestTracker() for _ in jobs]
    histories: list[list[dict[str, Any]]] = [[] for _ in jobs]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else _null()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        base.train()
        perms = [torch.randperm(n, generator=g) for g in gens]
        views_of = [epoch % o.views.epochs for o in objs]
        cache = _EpochViews(imgs, jobs, objs, views_of, mean, std, device, render_cache_bytes, draw)
        loss_sum = torch.zeros(len(jobs), device=device)
        correct = torch.zeros(len(jobs), dtype=torch.long, device=device)
        lr = sched.lr()
        for start in range(0, n, bs):
            idx = [p[start : start + bs] for p in perms]
            idx_d = [i.to(device) for i in idx]
            x = torch.stack([cache.batch(k, idx[k], idx_d[k]) for k in range(len(jobs))])
            with autocast:
                logits = batched(params, buffers, x)
            logits = logits.float()
            losses = torch.stack([objs[k].loss(logits[k], x[k], views_of[k], idx[k], idx_d[k]) for k in range(len(jobs))])
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            lr = sched.lr()
            opt.step()
            sched.step()
            with torch.no_grad():
                loss_sum += losses.detach() * len(idx[0])
                correct += torch.stack([(logits[k].argmax(1) == objs[k].labels[idx_d[k]]).sum() for k in range(len(jobs))])
        sums, hits = loss_sum.tolist(), correct.tolist()   # one transfer per epoch
        for k, m in enumerate(members):
            cb = None if on_epoch is None else (lambda rec, k=k: on_epoch(k, rec))
            _finish_epoch(m, epoch, cfg, (sums[k], hits[k], n), lr, t0, evaluate_val, trackers[k], histories[k], cb)
    out = []
    for k, (job, tr) in enumerate(zip(jobs, trackers)):
        job.model.load_state_dict(tr.state)
        out.append(TrainResult(best_state=tr.state, best_epoch=tr.epoch, best_val_acc=tr.acc, history=histories[k]))
    return out


class _EpochViews:
    """This epoch's rendered views, once per (distilled set, views, epoch) when they fit in
    ``limit`` bytes, else rendered per batch (the same pixels: each image renders alone)."""

    def __init__(self, imgs: dict, jobs: Sequence[StudentJob], objs: Sequence[StudentObjective], views_of: list[int],
                 mean: Sequence[float], std: Sequence[float], device: torch.device, limit: int,
                 draw: Callable = render_views) -> None:
        self.args, self.draw = (mean, std, device), draw
        self.src = [(imgs[id(j.images)], o.views, e) for j, o, e in zip(jobs, objs, views_of)]
        self.full: dict[tuple[int, int, int], torch.Tensor] = {}
        for im, v, e in self.src:
            key = (id(im), id(v), e)
            if key not in self.full and im.numel() * 4 <= limit:
                self.full[key] = draw(im, v, e, np.arange(im.shape[0]), mean, std, device=device)

    def batch(self, k: int, idx: torch.Tensor, idx_d: torch.Tensor) -> torch.Tensor:
        im, v, e = self.src[k]
        full = self.full.get((id(im), id(v), e))
        if full is not None:
            return full[idx_d]
        return self.draw(im, v, e, idx, *self.args)


def _make_stacked_adamw(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    name = cfg.optimizer or "adamw"
    if name != "adamw":
        raise ValueError(f"bulk students use AdamW (the student default); cfg.optimizer={name!r} is not supported")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
