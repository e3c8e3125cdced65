"""The student side of trajectory matching (MTT Sec. 3.2, EDF Eq. 1), pure torch.

A network run on one flat parameter vector (:func:`flatten_params`, :class:`FunctionalModel`,
``torch.func.functional_call``) so that ``N`` unrolled SGD steps (:func:`unroll_student`)
stay differentiable w.r.t. the pixels, the learnable learning rate and (DATM) the soft labels;
the per-parameter terms of Eq. 1 (:func:`param_match_terms`, :func:`eq1_loss`,
:func:`trajectory_matching_loss`) and DATM's soft-label loss (:func:`soft_cross_entropy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dd_assets.core.device_loops import upload
from dd_assets.core.dsa import DSAConfig, diff_augment


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
        idx = upload(chunks.pop(0), images.device)
        x = diff_augment(images[idx], augment, gen)
        out = fmodel(w, x)
        ce = soft_cross_entropy(out, targets[idx]) if soft else F.cross_entropy(out, targets[idx])
        (g,) = torch.autograd.grad(ce, w, create_graph=True)
        w = w - lr * g
    return w
