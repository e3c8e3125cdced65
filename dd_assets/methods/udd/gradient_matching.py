"""Gradient matching (DC / IDC style): the reusable core of pixel-optimization distillation.

Used by UDD (:mod:`dd_assets.methods.udd.distill`, paper /work/shared/papers/004_5acb7ff699889e9c.txt,
Sec. 2.5 and Algorithm 1) and by its plain gradient-matching baseline (``("synthesize", "dc")``).
Nothing here knows about regions or contrastive losses.

Notation (UDD Sec. 2.5): a *proxy network* ``phi_theta`` is randomly re-initialized at every
outer iteration (Algorithm 1 line 2).  For every class ``c`` the gradients of the
cross-entropy loss w.r.t. the network weights are computed on a real class batch ``T_c``
(``L^T``) and on the synthetic class batch ``S_c`` (``L^S``); the synthetic pixels are moved to
make them agree (Eq. 9)::

    L_g = sum_{theta_i in theta} | grad_theta L^T(theta_i) - grad_theta L^S(theta_i) |^2     (Eq. 9)

Between matching steps the proxy network is trained, either on the real data
(``theta_{t+1} = theta_t - eta grad l(theta_t; T)``, Eq. 6, IDC and UDD) or on the synthetic
data (Eq. 5, the original DC).

Distances (:data:`DISTANCES`):

* ``"mse"``: Eq. 9 literally, the *sum* of squared differences over every matched weight
  tensor (IDC's ``metric="mse"`` is the same sum);
* ``"dc_cosine"``: DC's layer-wise distance, ``sum_i (1 - cos(A_i, B_i))`` over the
  output channels / output nodes ``i`` of every weight tensor with ``ndim >= 2`` (a conv weight
  ``[out, in, k, k]`` is read as ``out`` vectors of length ``in*k*k``); 1-D tensors (biases,
  norm affines) contribute 0, as in DC.

Which tensors are matched (:data:`MATCH_PARAMS`): ``"all"`` (Eq. 9: every ``theta_i``) or
``"conv"`` (IDC's defaults ``bias=False, fc=False``: only tensors with ``ndim >= 3``).

Images travel as float ``[N, C, H, W]``; :class:`dd_assets.core.imaging.Normalizer` maps
``[0, 1]`` pixels to model inputs.  All random numbers come from a CPU :class:`torch.Generator`
(device independent); fresh proxy networks are built under a forked global RNG seeded per outer
iteration, so the caller's global RNG state is untouched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.imaging import to_unit_float

DISTANCES = ("mse", "dc_cosine")
MATCH_PARAMS = ("all", "conv")

#: real data: ``{class_index: images [N_c, C, H, W]}`` (uint8 or float in [0, 1]) or a sampler
#: ``sampler(class_index, n, generator) -> images [n, C, H, W]`` (uint8 or float in [0, 1]).
RealSource = Union[Mapping[int, Union[torch.Tensor, np.ndarray]], Callable[[int, int, torch.Generator], torch.Tensor]]

_COS_EPS = 1e-6  # added to the norm product in the cosine distance (DC uses the same guard)


# ============================================================================ real data


class RealPool:
    """Per-class sampling of real images as float ``[n, C, H, W]`` pixels in [0, 1] on ``device``.

    ``source`` is a :data:`RealSource`.  With a mapping, ``sample(c, n)`` draws ``min(n, N_c)``
    distinct images of class ``c`` (``torch.randperm`` on ``generator``); with a sampler the
    call is forwarded.  Pools are kept on the CPU (uint8 stays uint8) and only the drawn
    batch is converted and moved.
    """

    def __init__(self, source: RealSource, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.sampler: Callable[[int, int, torch.Generator], torch.Tensor] | None = None
        self.pools: dict[int, torch.Tensor] = {}
        if callable(source) and not isinstance(source, Mapping):
            self.sampler = source
        elif isinstance(source, Mapping):
            if not source:
                raise ValueError("real must hold at least one class")
            for c, imgs in source.items():
                t = torch.from_numpy(np.ascontiguousarray(imgs)) if isinstance(imgs, np.ndarray) else imgs
                if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[0] == 0:
                    shape = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
                    raise ValueError(f"real[{c}] must be non-empty [N, C, H, W] images, got {shape}")
                self.pools[int(c)] = t
        else:
            raise ValueError(
                f"real must be a mapping class -> images or a sampler(c, n, generator), got {type(source).__name__}"
            )

    @property
    def classes(self) -> list[int]:
        """Classes of a mapping source (empty for a sampler)."""
        return sorted(self.pools)

    def sample(self, class_index: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` images of class ``class_index`` -> float ``[n', C, H, W]`` in [0, 1] on the device."""
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        if self.sampler is not None:
            out = self.sampler(int(class_index), int(n), generator)
        else:
            if class_index not in self.pools:
                raise ValueError(f"real has no images of class {class_index}; classes: {self.classes}")
            pool = self.pools[class_index]
            idx = torch.randperm(pool.shape[0], generator=generator)[: min(n, pool.shape[0])]
            out = pool[idx]
        return to_unit_float(out, f"real[{class_index}]").to(self.device)

    def sample_mixed(
        self, classes: Sequence[int], n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A mini-batch of about ``n`` images over ``classes``: each slot picks a class uniformly,
        then every class draws its count with :meth:`sample`.  Returns ``(x [n', C, H, W], y [n'])``."""
        picks = torch.randint(0, len(classes), (n,), generator=generator)
        counts = torch.bincount(picks, minlength=len(classes)).tolist()
        xs, ys = [], []
        for c, k in zip(classes, counts):
            if k == 0:
                continue
            x = self.sample(int(c), int(k), generator)
            xs.append(x)
            ys.append(torch.full((x.shape[0],), int(c), dtype=torch.long, device=self.device))
        return torch.cat(xs), torch.cat(ys)


# ============================================================================ gradients, distances


def matched_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The proxy network's trainable parameters, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_gradients(
    model: nn.Module,
    logits: torch.Tensor,
    labels: torch.Tensor,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """``grad_theta CE(logits, labels)`` (batch mean) for every trainable parameter.

    With ``create_graph=False`` (the real side of Eq. 9) the gradients are detached; with
    ``create_graph=True`` (the synthetic side) they stay differentiable w.r.t. whatever
    produced ``logits`` (the synthetic pixels).  ``logits [B, K]``, ``labels [B]``.
    """
    loss = F.cross_entropy(logits, labels)
    grads = torch.autograd.grad(loss, matched_parameters(model), create_graph=create_graph, allow_unused=True)
    out = []
    for g, p in zip(grads, matched_parameters(model)):
        g = torch.zeros_like(p) if g is None else g
        out.append(g if create_graph else g.detach())
    return out


def layer_distance(g_real: torch.Tensor, g_syn: torch.Tensor, distance: str = "mse") -> torch.Tensor:
    """Distance between the real and synthetic gradients of ONE weight tensor (same shape).

    ``"mse"``: ``sum (g_real - g_syn)^2`` (the Eq. 9 term).  ``"dc_cosine"``: for ``ndim >= 2``,
    rows = output channels (``[out, -1]``), ``sum_rows 1 - <a, b> / (|a| |b| + 1e-6)``; 0 for 1-D.
    Returns a scalar tensor.
    """
    if g_real.shape != g_syn.shape:
        raise ValueError(f"gradient shapes differ: {tuple(g_real.shape)} vs {tuple(g_syn.shape)}")
    if distance == "mse":
        return (g_real - g_syn).pow(2).sum()
    if distance == "dc_cosine":
        if g_real.ndim < 2:
            return g_syn.sum() * 0.0
        a = g_real.reshape(g_real.shape[0], -1)
        b = g_syn.reshape(g_syn.shape[0], -1)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + _COS_EPS)
        return (1.0 - cos).sum()
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")


def gradient_distance(
    g_real: Sequence[torch.Tensor],
    g_syn: Sequence[torch.Tensor],
    distance: str = "mse",
    params: str = "all",
) -> torch.Tensor:
    """``L_g`` of Eq. 9: :func:`layer_distance` summed over the matched weight tensors.

    ``params="all"`` matches every tensor (Eq. 9); ``"conv"`` only those with ``ndim >= 3``
    (IDC: no biases / norm affines, no fully-connected layer).  Returns a scalar tensor.
    """
    if params not in MATCH_PARAMS:
        raise ValueError(f"unknown params {params!r}; choose one of {', '.join(MATCH_PARAMS)}")
    if len(g_real) != len(g_syn):
        raise ValueError(f"{len(g_real)} real gradients but {len(g_syn)} synthetic ones")
    total: torch.Tensor | None = None
    for gr, gs in zip(g_real, g_syn):
        if params == "conv" and gr.ndim < 3:
            continue
        d = layer_distance(gr, gs, distance)
        total = d if total is None else total + d
    if total is None:
        raise ValueError(f"params={params!r} selects no weight tensor of this model")
    return total


# ============================================================================ proxy network


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Fork the global torch RNG (CPU, plus ``device`` if CUDA), seed it, restore it on exit."""
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def fresh_network(model_fn: Callable[[], nn.Module], seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """A randomly initialized proxy network (Algorithm 1 line 2): ``model_fn()`` under a forked
    global RNG seeded with ``seed``, moved to ``device``, in train mode."""
    with seeded_global_rng(seed, device):
        model = model_fn()
    return model.to(device).train()


def network_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """The proxy network's optimizer: plain SGD (fixed ``lr``) over its trainable parameters."""
    return torch.optim.SGD(matched_parameters(model), lr=lr, momentum=momentum, weight_decay=weight_decay)


def network_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One SGD step of the proxy network on CE (Eq. 5 / Eq. 6).  ``x`` model input
    ``[B, C, H, W]`` (no gradient reaches it), ``y [B]``.  Returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x.detach()), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_lr(base_lr: float, iteration: int, total: int, milestones: Sequence[float], gamma: float) -> float:
    """Learning rate of outer iteration ``iteration`` (0-based) under a multi-step schedule.

    ``milestones`` are fractions of ``total``; the rate is multiplied by ``gamma`` at every
    milestone iteration reached (UDD App. A: x0.5 at 1200, 1600, 1800 of 2000 = fractions
    0.6, 0.8, 0.9).  The milestone of ``f`` is ``f * total`` rounded to the nearest integer
    with halves rounded UP (:func:`milestone_iteration`; Python's ``round`` would send
    ``0.5 * 5 = 2.5`` to 2 but ``0.5 * 7 = 3.5`` to 4).
    """
    passed = sum(1 for f in milestones if iteration >= milestone_iteration(f, total))
    return float(base_lr) * float(gamma) ** passed


def milestone_iteration(fraction: float, total: int) -> int:
    """``floor(fraction * total + 1/2)``: nearest integer, halves up (a 1e-9 slack absorbs
    float error such as ``0.9 * 5 = 4.5`` stored as ``4.499999...``)."""
    return int(math.floor(float(fraction) * int(total) + 0.5 + 1e-9))
