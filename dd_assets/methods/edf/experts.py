"""Expert trajectories (MTT Sec. 3.1 "buffer"), pure torch/numpy.

``K`` experts (ConvNets) are trained on the real data for ``E`` epochs with plain SGD and DSA
(:func:`dd_assets.core.dsa.diff_augment`); their flattened parameters are stored at the start
and after every epoch -> :class:`ExpertTrajectories` holding ``params [K, E+1, P] float32``
(numpy, optionally a memmap) -> :func:`train_experts`.  :func:`expert_logits` (DATM's
soft-label initialization) and :func:`expert_accuracy` read a stored checkpoint back.
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

from dd_assets.core.device_loops import upload
from dd_assets.core.dsa import DSAConfig, diff_augment
from dd_assets.core.imaging import as_tensor, to_model_input
from dd_assets.methods.edf.student import FunctionalModel, flatten_params


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
        return upload(torch.from_numpy(np.array(self.params[expert, epoch], dtype=np.float32)), device)

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
    kept (batches are streamed).  The per-batch loss / correct counts stay on the device and
    come back once per epoch (summed on the host in batch order, as before).

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
                batch_loss: list[torch.Tensor] = []  # device scalars, read back after the epoch
                batch_correct: list[torch.Tensor] = []
                sizes: list[int] = []
                batches = (_array_batches(imgs, lab, cfg.batch_size, gen) if imgs is not None
                           else source(k, epoch))
                for images, labels in batches:
                    x = to_model_input(images, mean, std, device)
                    with torch.no_grad():
                        x = diff_augment(x, cfg.augment, gen)
                    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
                    y = upload(y.to(dtype=torch.long), device)
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    batch_loss.append(loss.detach())
                    batch_correct.append((logits.detach().argmax(1) == y).sum())
                    sizes.append(len(y))
                if sizes:  # one transfer per epoch; same float64 sum in the same order as per batch
                    for v, c, b in zip(torch.stack(batch_loss).tolist(), torch.stack(batch_correct).tolist(), sizes):
                        loss_sum += v * b
                        correct += c
                        seen += b
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
    hits = torch.zeros(traj.num_experts, dtype=torch.int64, device=device)  # read back once, after the loop
    seen = 0
    for images, labels in batches:
        x = to_model_input(images, mean, std, device)
        y = upload(torch.as_tensor(np.asarray(labels)).reshape(-1), device)
        for k in range(traj.num_experts):
            hits[k] += (expert_logits(traj, x, k, epoch, model).argmax(1) == y).sum()
        seen += len(y)
    correct = hits.cpu().numpy()
    return (correct / max(1, seen)).tolist()
