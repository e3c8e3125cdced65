"""Expert trajectories and trajectory matching (MTT, with DATM's options), pure torch/numpy.

Papers: MTT = Cazenavette et al., "Dataset Distillation by Matching Training Trajectories"
(CVPR 2022); DATM = Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned
Trajectory Matching" (ICLR 2024).  EDF (:mod:`dd_assets.methods.edf`) is built on this
module; its Sec. 2.1 restates MTT's loss as its Eq. 1.

1. **Expert trajectories** (MTT Sec. 3.1 "buffer"): ``K`` experts (ConvNets) are trained
   on the real data for ``E`` epochs with plain SGD; their flattened parameters are stored
   at the start and after every epoch -> :class:`ExpertTrajectories` holding
   ``params [K, E+1, P] float32`` (numpy, optionally a memmap) -> :func:`train_experts`.
2. **Trajectory matching** (MTT Sec. 3.2, EDF Eq. 1): per distillation iteration draw an
   expert ``k`` and a start epoch ``s`` (uniform in ``[min_start_epoch, max_start_epoch)``),
   start a student at ``theta*_s``, take ``N = syn_steps`` SGD steps on (augmented) synthetic
   batches with a *learnable* learning rate ``alpha``, and compare with the expert ``M =
   expert_epochs`` epochs later::

       L = ||theta_hat_{s+N} - theta*_{s+M}||^2 / ||theta*_s - theta*_{s+M}||^2     (Eq. 1)

   The student is run with :func:`torch.func.functional_call` on one flat parameter vector
   so the unrolled graph reaches the pixels, the learning rate and (DATM) the soft labels
   -> :func:`unroll_student`, :func:`param_match_terms`, :func:`trajectory_matching_loss`,
   :func:`trajectory_matching_distill` (the outer loop, with hooks used by EDF) and
   :func:`mtt_distill` (``("synthesize", "mtt")``).
3. **DATM options** (all off by default): learnable soft labels initialized from an
   expert's logits (trained with a soft cross-entropy), a start-epoch window whose upper
   bound grows linearly from ``initial_max_start_epoch`` to ``max_start_epoch`` over
   ``expansion_end_iteration`` iterations ("sequential generation"), and skipping the update
   when the matching loss exceeds ``max_loss``.

Augmentation is Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) as used by
MTT/DATM/EDF: :func:`diff_augment`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dd_assets.core.imaging import as_tensor, to_model_input, to_uint8
from dd_assets.methods.registry import register

# ============================================================================ DSA


DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAConfig:
    """Differentiable Siamese Augmentation (Zhao & Bilen 2021) as in the MTT/DATM code.

    ``strategy``: ``"_"``-joined ops from :data:`DSA_OPS` (``"color"`` = brightness,
    saturation and contrast in turn).  ``mode``: ``"single"`` applies ONE op drawn uniformly
    per call (the MTT/DATM/EDF default, ``aug_mode='S'``); ``"multiple"`` applies all in
    order.  Magnitudes are the DSA defaults; every sample of a batch draws its own
    parameters.
    """

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    mode: str = "single"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def ops(self) -> list[str]:
        ops = [p for p in self.strategy.split("_") if p]
        bad = [p for p in ops if p not in DSA_OPS]
        if bad or not ops:
            raise ValueError(f"DSAConfig.strategy {self.strategy!r}: unknown ops {bad}; use '_'-joined {DSA_OPS}")
        if self.mode not in ("single", "multiple"):
            raise ValueError(f"DSAConfig.mode must be 'single' or 'multiple', got {self.mode!r}")
        return ops


def _u(n: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``[n]`` uniform [0, 1) draws from the CPU generator, moved to ``like``'s device/dtype."""
    return torch.rand(n, generator=gen).to(device=like.device, dtype=like.dtype)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _shift(x: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor, pad: int) -> torch.Tensor:
    """Translate each image by integer ``(ty, tx)`` (|t| <= pad), zero fill; differentiable."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (pad - ty.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (pad - tx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows, cols]


def _apply_op(x: torch.Tensor, op: str, cfg: DSAConfig, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    if op == "flip":
        flip = (torch.rand(n, generator=gen) < cfg.prob_flip).to(x.device).view(n, 1, 1, 1)
        return torch.where(flip, x.flip(3), x)
    if op == "scale":
        r = cfg.ratio_scale
        sx = _u(n, gen, x) * (r - 1.0 / r) + 1.0 / r
        sy = _u(n, gen, x) * (r - 1.0 / r) + 1.0 / r
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 1, 1] = sx, sy
        return _affine(x, theta)
    if op == "rotate":
        ang = (_u(n, gen, x) - 0.5) * 2.0 * cfg.ratio_rotate / 180.0 * math.pi
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                             torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
        return _affine(x, theta)
    if op == "color":
        x = x + (_u(n, gen, x).view(n, 1, 1, 1) - 0.5) * cfg.brightness
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (_u(n, gen, x).view(n, 1, 1, 1) * cfg.saturation) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * (_u(n, gen, x).view(n, 1, 1, 1) + cfg.contrast) + m
    if op == "crop":
        pad = int(h * cfg.ratio_crop_pad + 0.5)
        if pad == 0:
            return x
        ty = torch.randint(-pad, pad + 1, (n,), generator=gen).to(x.device)
        tx = torch.randint(-pad, pad + 1, (n,), generator=gen).to(x.device)
        return _shift(x, ty, tx, pad)
    if op == "cutout":
        sh, sw = int(h * cfg.ratio_cutout + 0.5), int(w * cfg.ratio_cutout + 0.5)
        cy = torch.randint(0, h, (n,), generator=gen).to(x.device).view(n, 1, 1)
        cx = torch.randint(0, w, (n,), generator=gen).to(x.device).view(n, 1, 1)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = ((rows >= cy - sh // 2) & (rows < cy - sh // 2 + sh)
                  & (cols >= cx - sw // 2) & (cols < cx - sw // 2 + sw))
        return x * (~inside).to(x.dtype)[:, None]
    raise ValueError(f"unknown DSA op {op!r}")


def diff_augment(x: torch.Tensor, cfg: DSAConfig | None, gen: torch.Generator) -> torch.Tensor:
    """DSA of a normalized float batch ``x [B, C, H, W]``, differentiable w.r.t. ``x``.

    Every random number comes from the CPU generator ``gen`` (device-independent, so a run
    is reproducible from its seed).  ``cfg=None`` returns ``x`` unchanged.

    Returns:
        ``[B, C, H, W]`` augmented batch (same device/dtype).
    """
    if cfg is None:
        return x
    ops = cfg.ops()
    if cfg.mode == "single":
        ops = [ops[int(torch.randint(0, len(ops), (1,), generator=gen))]]
    for op in ops:
        x = _apply_op(x, op, cfg, gen)
    return x.contiguous()


# ============================================================================ flat parameters


def flatten_params(model: nn.Module) -> tuple[torch.Tensor, list[str], list[tuple[int, ...]]]:
    """``model``'s trainable parameters as one detached float32 vector ``[P]`` (in
    ``named_parameters`` order) with their names and shapes.  Buffers (e.g. BN running
    statistics) are not part of a trajectory."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    flat = torch.cat([p.detach().reshape(-1).float() for _, p in named])
    return flat, [n for n, _ in named], [tuple(p.shape) for _, p in named]


class FunctionalModel:
    """Call ``model`` with parameters taken from a flat vector (``torch.func.functional_call``).

    ``fm(flat [P], x [B, C, H, W]) -> logits [B, num_classes]``; gradients flow to ``flat``
    (and to ``x``).  The module's own parameters are not used (its buffers are).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> None:
        own = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for n, s in zip(names, shapes):
            if own.get(n) != tuple(s):
                raise ValueError(f"parameter {n!r} of shape {tuple(s)} does not fit {type(model).__name__} "
                                 f"(has {own.get(n)})")
        self.model = model
        self.names = list(names)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.numels = [math.prod(s) for s in self.shapes]
        self.num_params = sum(self.numels)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[P]`` -> ``{name: tensor of its shape}`` (views, differentiable)."""
        if flat.ndim != 1 or flat.shape[0] != self.num_params:
            raise ValueError(f"flat parameters must be [{self.num_params}], got {tuple(flat.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(flat, self.numels), self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.unflatten(flat), (x,), strict=False)


# ============================================================================ experts


@dataclass
class ExpertConfig:
    """Expert training (MTT's buffer script): plain SGD at a constant learning rate.

    Defaults follow the MTT / DATM / EDF buffer scripts: ``lr = 0.01``, momentum 0, no
    weight decay, batch 256, DSA augmentation on the real images, no ZCA.  ``arch`` /
    ``arch_kwargs`` go to :func:`dd_assets.models.create_model`.  ``seed``: expert ``k`` is
    initialized and shuffled from ``seed * 1_000_003 + k``.
    """

    arch: str = "convnet_d3"
    arch_kwargs: dict[str, Any] = field(default_factory=lambda: {"norm": "instance"})
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    augment: DSAConfig | None = field(default_factory=DSAConfig)
    seed: int = 0


@dataclass
class ExpertTrajectories:
    """``K`` expert trajectories of ``E`` epochs.

    ``params [K, E+1, P] float32``: ``params[k, 0]`` is expert ``k``'s initialization and
    ``params[k, e+1]`` its parameters after epoch ``e``; the flat order is ``names`` /
    ``shapes`` (``named_parameters`` order).  ``arch``, ``arch_kwargs``, ``num_classes``,
    ``in_channels``, ``image_size`` rebuild the network (:meth:`build_model`);
    ``expert_lr`` is the experts' SGD learning rate (MTT initializes the learnable student
    learning rate with it); ``seeds [K]``; ``history``: one dict per expert epoch.
    """

    params: np.ndarray
    names: list[str]
    shapes: list[tuple[int, ...]]
    arch: str
    arch_kwargs: dict[str, Any]
    num_classes: int
    in_channels: int
    image_size: int
    expert_lr: float
    seeds: list[int]
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.params.ndim != 3 or self.params.shape[1] < 2:
            raise ValueError(f"params must be [K, E+1, P] with E >= 1, got {self.params.shape}")
        p = sum(math.prod(s) for s in self.shapes)
        if self.params.shape[2] != p:
            raise ValueError(f"params hold {self.params.shape[2]} parameters, shapes say {p}")

    @property
    def num_experts(self) -> int:
        return int(self.params.shape[0])

    @property
    def num_epochs(self) -> int:
        """``E`` (the trajectory has ``E + 1`` checkpoints)."""
        return int(self.params.shape[1]) - 1

    @property
    def num_params(self) -> int:
        return int(self.params.shape[2])

    def flat(self, expert: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Checkpoint ``epoch`` (0 = init) of ``expert`` as float32 ``[P]`` on ``device``."""
        return torch.from_numpy(np.array(self.params[expert, epoch], dtype=np.float32)).to(device)

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """A fresh network of the experts' architecture (its own weights are irrelevant:
        :class:`FunctionalModel` supplies them)."""
        from dd_assets.models import create_model

        model = create_model(self.arch, self.num_classes, in_channels=self.in_channels,
                             image_size=self.image_size, **self.arch_kwargs)
        FunctionalModel(model, self.names, self.shapes)  # validates the layout
        return model.to(device)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``path`` (``.npy`` of params) and ``path + '.json'`` (metadata)."""
        path = os.fspath(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.save(path if path.endswith(".npy") else path + ".npy", self.params)
        self.save_meta(path)

    def save_meta(self, path: str | os.PathLike[str]) -> None:
        """Write only ``path + '.json'`` (everything but ``params``): for params trained
        straight into an ``.npy`` memmap at ``path`` (``np.lib.format.open_memmap``), which
        :meth:`load` then reads like a :meth:`save` output."""
        path = os.fspath(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}  # no copy of params
        meta["shapes"] = [list(s) for s in self.shapes]
        Path(_meta_path(path)).write_text(json.dumps(meta, default=float))

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = True) -> ExpertTrajectories:
        """Read what :meth:`save` wrote; ``mmap`` keeps the params on disk (read-only)."""
        path = os.fspath(path)
        npy = path if path.endswith(".npy") else path + ".npy"
        params = np.load(npy, mmap_mode="r" if mmap else None)
        meta = json.loads(Path(_meta_path(path)).read_text())
        meta["shapes"] = [tuple(s) for s in meta["shapes"]]
        return cls(params=params, **meta)


def _meta_path(path: str) -> str:
    return (path[:-4] if path.endswith(".npy") else path) + ".json"


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


BatchSource = Callable[[int, int], Iterable[tuple[Any, Any]]]


def _array_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    perm = torch.randperm(images.shape[0], generator=gen)
    for s in range(0, len(perm), batch_size):
        idx = perm[s : s + batch_size]
        yield images[idx], labels[idx]


def train_experts(
    data: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | BatchSource,
    num_classes: int,
    num_experts: int,
    epochs: int,
    cfg: ExpertConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    image_size: int | None = None,
    in_channels: int | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    out: np.ndarray | None = None,
    model_fn: Callable[[], nn.Module] | None = None,
) -> ExpertTrajectories:
    """Train ``num_experts`` experts on real data and record their trajectories (MTT buffer).

    Expert ``k``: a fresh ``cfg.arch`` network initialized under the seed
    ``cfg.seed * 1_000_003 + k``; ``epochs`` epochs of SGD (``cfg.lr``, ``cfg.momentum``,
    ``cfg.weight_decay``, constant rate) on cross-entropy; every batch normalized with
    ``mean``/``std`` and DSA-augmented (``cfg.augment``).  The flat parameters are written
    to ``out[k, 0]`` before training and ``out[k, e+1]`` after epoch ``e``; nothing else is
    kept (batches are streamed).

    Args:
        data: ``(images uint8 [N, C, H, W], labels [N])`` (shuffled per epoch by the
            expert's generator, batches of ``cfg.batch_size``), or a callable
            ``data(expert, epoch) -> iterable of (uint8 [B, C, H, W], labels [B])`` that
            streams the real set (then ``image_size`` and ``in_channels`` are required).
        out: optional preallocated float32 ``[num_experts, epochs+1, P]`` array (e.g. an
            ``np.memmap``) to write into; default a new array.
        model_fn: builds the expert network instead of ``create_model(cfg.arch, ...)``
            (called under the expert's seed); ``cfg.arch``/``arch_kwargs`` are still
            recorded for :meth:`ExpertTrajectories.build_model`.
        on_epoch: receives ``{"expert", "epoch", "train_loss", "train_acc", "seconds"}``.

    Returns:
        :class:`ExpertTrajectories` with ``params [K, E+1, P]``.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if cfg.batch_size < 1:
        raise ValueError(f"ExpertConfig.batch_size must be >= 1, got {cfg.batch_size}")
    device = torch.device(device)
    if callable(data):
        if image_size is None or in_channels is None:
            raise ValueError("train_experts with a batch callable needs image_size and in_channels")
        source: BatchSource = data
        imgs = lab = None
    else:
        imgs = as_tensor(data[0])
        lab = torch.as_tensor(np.asarray(data[1]), dtype=torch.long).reshape(-1)
        if lab.shape[0] != imgs.shape[0]:
            raise ValueError(f"{imgs.shape[0]} images but {lab.shape[0]} labels")
        in_channels = int(imgs.shape[1]) if in_channels is None else in_channels
        image_size = int(imgs.shape[-1]) if image_size is None else image_size
    if model_fn is None:
        from dd_assets.models import create_model

        def model_fn() -> nn.Module:
            return create_model(cfg.arch, num_classes, in_channels=in_channels, image_size=image_size,
                                **cfg.arch_kwargs)

    seeds = [cfg.seed * 1_000_003 + k for k in range(num_experts)]
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    history: list[dict[str, Any]] = []
    for k, seed in enumerate(seeds):
        with _seeded_rng(seed, device):
            model = model_fn().to(device)
            flat, names_k, shapes_k = flatten_params(model)
            if k == 0:
                names, shapes = names_k, shapes_k
                if out is None:
                    out = np.empty((num_experts, epochs + 1, flat.numel()), dtype=np.float32)
                elif out.shape != (num_experts, epochs + 1, flat.numel()) or out.dtype != np.float32:
                    raise ValueError(f"out must be float32 {(num_experts, epochs + 1, flat.numel())}, "
                                     f"got {out.dtype} {out.shape}")
            elif (names_k, shapes_k) != (names, shapes):
                raise ValueError("model_fn built experts with different parameter layouts")
            out[k, 0] = flat.cpu().numpy()
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            model.train()
            for epoch in range(epochs):
                t0 = time.perf_counter()
                loss_sum, correct, seen = 0.0, 0, 0
                batches = (_array_batches(imgs, lab, cfg.batch_size, gen) if imgs is not None
                           else source(k, epoch))
                for images, labels in batches:
                    x = to_model_input(images, mean, std, device)
                    with torch.no_grad():
                        x = diff_augment(x, cfg.augment, gen)
                    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
                    y = y.to(device=device, dtype=torch.long)
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += float(loss.detach()) * len(y)
                    correct += int((logits.detach().argmax(1) == y).sum())
                    seen += len(y)
                if seen == 0:
                    raise ValueError(f"expert {k} epoch {epoch}: no training batches")
                out[k, epoch + 1] = flatten_params(model)[0].cpu().numpy()
                rec = {"expert": k, "epoch": epoch, "train_loss": loss_sum / seen,
                       "train_acc": correct / seen, "seconds": time.perf_counter() - t0}
                history.append(rec)
                if on_epoch is not None:
                    on_epoch(rec)
            del model, opt
    assert out is not None
    return ExpertTrajectories(
        params=out, names=names, shapes=shapes, arch=cfg.arch, arch_kwargs=dict(cfg.arch_kwargs),
        num_classes=int(num_classes), in_channels=int(in_channels), image_size=int(image_size),
        expert_lr=float(cfg.lr), seeds=seeds, history=history,
    )


# ============================================================================ matching (Eq. 1)


def param_match_terms(
    student: torch.Tensor, start: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter terms of Eq. 1.

    Args:
        student: ``theta_hat_{s+N}`` ``[P]``; start: ``theta*_s`` ``[P]``;
            target: ``theta*_{s+M}`` ``[P]``.

    Returns:
        ``(num [P], den [P])`` with ``num_i = (theta_hat_i - theta*_{s+M,i})^2`` and
        ``den_i = (theta*_{s,i} - theta*_{s+M,i})^2``; Eq. 1 is ``num.sum() / den.sum()``.
    """
    if not (student.shape == start.shape == target.shape) or student.ndim != 1:
        raise ValueError(f"student/start/target must be equal [P] vectors, got "
                         f"{tuple(student.shape)}, {tuple(start.shape)}, {tuple(target.shape)}")
    return (student - target).pow(2), (start - target).pow(2)


def eq1_loss(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Eq. 1 from its terms: ``sum(num) / sum(den)`` (scalar)."""
    return num.sum() / den.sum()


def trajectory_matching_loss(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EDF Eq. 1 / MTT Eq. 2: ``||theta_hat_{s+N} - theta*_{s+M}||^2 / ||theta*_s - theta*_{s+M}||^2``."""
    return eq1_loss(*param_match_terms(student, start, target))


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """DATM's soft-label loss ``-mean_b sum_c softmax(target)_bc log_softmax(logits)_bc``;
    both ``[B, C]``; differentiable w.r.t. both."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def unroll_student(
    fmodel: FunctionalModel,
    start: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    lr: torch.Tensor,
    syn_steps: int,
    batch_syn: int,
    gen: torch.Generator,
    augment: DSAConfig | None = None,
) -> torch.Tensor:
    """``N = syn_steps`` differentiable SGD steps of a student started at ``start``.

    ``theta_{j+1} = theta_j - lr * grad_theta loss(f(A(x_b); theta_j), y_b)`` with
    ``create_graph=True``, so the result is differentiable w.r.t. ``images``, ``lr`` and (soft)
    ``targets``.  Batches ``b`` of ``batch_syn`` images walk through a random permutation
    (from ``gen``), a fresh permutation when it runs out (MTT).  ``loss`` is cross-entropy
    for int64 ``targets [N]`` and :func:`soft_cross_entropy` for float ``targets [N, C]``.

    Args:
        start: ``[P]`` expert checkpoint ``theta*_s`` (no grad needed).
        images: float ``[N, C, H, W]`` normalized synthetic images.
        lr: scalar tensor (the learnable student learning rate).

    Returns:
        ``theta_hat_{s+N}`` ``[P]`` (attached to the graph).
    """
    n = images.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"{n} images but {targets.shape[0]} targets")
    if syn_steps < 1 or batch_syn < 1:
        raise ValueError(f"syn_steps and batch_syn must be >= 1, got {syn_steps}, {batch_syn}")
    soft = targets.is_floating_point()
    w = start.detach().clone().requires_grad_(True)
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(n, generator=gen), batch_syn))
        idx = chunks.pop(0).to(images.device)
        x = diff_augment(images[idx], augment, gen)
        out = fmodel(w, x)
        ce = soft_cross_entropy(out, targets[idx]) if soft else F.cross_entropy(out, targets[idx])
        (g,) = torch.autograd.grad(ce, w, create_graph=True)
        w = w - lr * g
    return w


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


def expert_logits(
    traj: ExpertTrajectories, images: torch.Tensor, expert: int = 0, epoch: int = -1,
    model: nn.Module | None = None, batch_size: int = 256,
) -> torch.Tensor:
    """Logits ``[N, num_classes]`` of expert ``expert`` at checkpoint ``epoch`` on normalized
    ``images [N, C, H, W]`` (eval mode, no grad) — DATM's soft-label initialization."""
    model = traj.build_model(images.device) if model is None else model
    fm = FunctionalModel(model, traj.names, traj.shapes)
    flat = traj.flat(expert, epoch % (traj.num_epochs + 1), images.device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([fm(flat, images[s : s + batch_size]) for s in range(0, images.shape[0], batch_size)])
    finally:
        model.train(was)


def expert_accuracy(
    traj: ExpertTrajectories, batches: Iterable[tuple[Any, Any]], mean: Sequence[float], std: Sequence[float],
    device: torch.device | str = "cpu", epoch: int = -1,
) -> list[float]:
    """Top-1 accuracy of every expert's checkpoint ``epoch`` (default: the last) on streamed
    ``(uint8 [B, C, H, W], labels [B])`` batches (one pass, all experts per batch)."""
    device = torch.device(device)
    model = traj.build_model(device)
    correct, seen = np.zeros(traj.num_experts, np.int64), 0
    for images, labels in batches:
        x = to_model_input(images, mean, std, device)
        y = torch.as_tensor(np.asarray(labels)).reshape(-1)
        for k in range(traj.num_experts):
            correct[k] += int((expert_logits(traj, x, k, epoch, model).argmax(1).cpu() == y).sum())
        seen += len(y)
    return (correct / max(1, seen)).tolist()


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

    Returns:
        :class:`DistillResult`.  Raises ``FloatingPointError`` if the loss becomes
        non-finite (lower ``lr_img`` / ``lr_lr``).
    """
    _validate_match(cfg, trajectories)
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
        if not torch.isfinite(loss):
            raise FloatingPointError(f"trajectory matching loss is {float(loss)} at iteration {it} "
                                     f"(student lr {float(lr):.4g}); lower MatchConfig.lr_img / lr_lr")
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        del student
        if grad_hook is not None and x.grad is not None:
            x.grad = grad_hook(it, x.detach(), x.grad)
        skip = cfg.max_loss is not None and float(loss.detach()) > cfg.max_loss
        if skip:
            skipped += 1
        else:
            for opt in opts:
                opt.step()
        losses[it], lrs[it], starts[it], experts[it] = float(loss.detach()), float(lr.detach()), s, k
        if on_step is not None:
            on_step(it, {"loss": losses[it], "lr": lrs[it], "expert": k, "start_epoch": s, "skipped": float(skip)})
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


@register("synthesize", "mtt")
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
    pixel-gradient reweighting.  Same as :func:`dd_assets.methods.edf.edf_distill` with
    CPD and DAE off."""
    return trajectory_matching_distill(real_init, labels, trajectories, cfg, mean, std, device, on_step=on_step)
