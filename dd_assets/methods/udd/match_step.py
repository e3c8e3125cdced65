"""One UDD matching step of every class (Algorithm 1 lines 4-8): region search, ``S_c^train``,
``L_syn = L_g + cfc_weight L_c`` (Eq. 9, 7, 10) and the pixel gradients.

Two implementations with the same losses and pixel gradients up to float rounding: the per-class
reference loop (:func:`_match_loop`) and all classes in one forward (:func:`_match_batched`,
per-class parameter gradients by :mod:`dd_assets.methods.udd.class_gradients`).  Called by
:func:`dd_assets.methods.udd.distill.udd_distill`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dd_assets.core.imaging import Normalizer
from dd_assets.core.utilization import _eval_mode
from dd_assets.methods.udd.cfc import ClassCentres, cfc_loss
from dd_assets.methods.udd.class_gradients import LayerTape
from dd_assets.methods.udd.config import UDDConfig
from dd_assets.methods.udd.gradient_matching import RealPool, gradient_distance, parameter_gradients
from dd_assets.methods.udd.mining import jitter_images, jitter_utilization, search_underused, select_underused
from dd_assets.methods.udd.regions import training_batch


def _embed(model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """Penultimate features ``[B, D]`` from a feature map (``phi_theta`` of Eq. 7)."""
    return model.forward_head(fmap, pre_logits=True).flatten(1)


@dataclass
class _StepContext:
    """What one matching step of Algorithm 1 (lines 4-8) needs, per outer iteration."""

    cfg: UDDConfig
    model: nn.Module
    norm: Normalizer
    windows: np.ndarray
    pool: RealPool
    g: torch.Generator
    device: torch.device
    centres: ClassCentres | None
    region_counts: np.ndarray

    def features(self, xp: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.norm(xp))

    @property
    def mining(self) -> bool:
        return self.cfg.policy != "none" and self.cfg.top_p > 0

    def labels(self, c: int, n: int) -> torch.Tensor:
        return torch.full((n,), c, dtype=torch.long, device=self.device)


#: per class: ``(L_syn, L_g, L_c)`` as floats
ClassLosses = dict[int, tuple[float, float, float]]


def _set_grads(leaves: dict[int, torch.Tensor], losses: dict[int, torch.Tensor]) -> None:
    """``leaf.grad = dL_syn,c / d leaf`` for every class in ``losses`` (one backward)."""
    cs = list(losses)
    grads = torch.autograd.grad([losses[c] for c in cs], [leaves[c] for c in cs])
    for c, grad in zip(cs, grads):
        leaves[c].grad = grad


def _match_loop(ctx: _StepContext, xs_by_class: dict[int, torch.Tensor], leaves: dict[int, torch.Tensor]) -> ClassLosses:
    """Reference matching step: every class ``c`` (ascending) on its own through the network.

    ``R* = search_underused(S_c)``; ``S_c^train = S_c + upsample(R*)`` (random subset of
    ``batch_syn_max``); ``L_syn = L_g(T_c, S_c^train) + cfc_weight L_c(S_c^train)`` (Eq. 9, 7,
    10); the centre of ``c`` then moves by Eq. 8; ``leaves[c].grad = dL_syn / d leaves[c]``
    (the class's optimized tensor, ``xs_by_class[c]`` is computed from it).  Random draws from
    ``ctx.g`` per class: jitter noise, subset, real batch.
    """
    cfg, model, out = ctx.cfg, ctx.model, {}
    for c, xs in xs_by_class.items():
        if ctx.mining:
            with _eval_mode(model):
                found = search_underused(
                    ctx.features, xs, ctx.windows, cfg.top_p, cfg.policy, cfg.response, model.forward_head,
                    ctx.labels(c, xs.shape[0]), cfg.jitter, cfg.jitter_copies, cfg.jitter_std, cfg.jitter_prob, ctx.g,
                )
            ctx.region_counts += np.bincount(found.choice.reshape(-1).numpy(), minlength=len(ctx.windows))
            x_train = training_batch(xs, ctx.windows, found.choice)
        else:
            x_train = xs
        if cfg.batch_syn_max is not None and x_train.shape[0] > cfg.batch_syn_max:
            keep = torch.randperm(x_train.shape[0], generator=ctx.g)[: cfg.batch_syn_max]
            x_train = x_train[keep.to(ctx.device)]
        x_real = ctx.pool.sample(c, cfg.batch_real, ctx.g)
        g_real = parameter_gradients(model, model(ctx.norm(x_real)), ctx.labels(c, x_real.shape[0]))
        fmap = model.forward_features(ctx.norm(x_train))
        g_syn = parameter_gradients(model, model.forward_head(fmap), ctx.labels(c, x_train.shape[0]), create_graph=True)
        l_g = gradient_distance(g_real, g_syn, cfg.distance, cfg.match_params)
        loss, l_c_val = l_g, 0.0
        if ctx.centres is not None:
            emb = _embed(model, fmap)
            l_c = cfc_loss(emb, c, ctx.centres.centres, cfg.tau, ctx.centres.valid, cfg.cfc_include_positive)
            loss = loss + cfg.cfc_weight * l_c
            l_c_val = float(l_c.detach())
            ctx.centres.update(c, emb.detach().mean(0))
        _set_grads(leaves, {c: loss})
        out[c] = (float(loss.detach()), float(l_g.detach()), l_c_val)
    return out


def _match_batched(ctx: _StepContext, xs_by_class: dict[int, torch.Tensor], leaves: dict[int, torch.Tensor]) -> ClassLosses:
    """:func:`_match_loop` with every class in ONE forward pass (same losses and pixel gradients
    up to float rounding; needs a model without sample coupling, see
    :mod:`dd_assets.methods.udd.class_gradients`).

    The random draws are taken first, class by class in the loop's order (jitter noise,
    subset, real batch), so both paths see the same numbers; then one no-grad search forward
    over all classes' originals and jittered copies, one forward of all real batches and one
    of all ``S_c^train``, per-class parameter gradients by :class:`LayerTape`, and Eq. 9 /
    Eq. 7 per class (CFC centres still move class by class, Eq. 8).
    """
    cfg, model, g = ctx.cfg, ctx.model, ctx.g
    classes = list(xs_by_class)
    jit, keep, real = [], {}, []
    for c in classes:
        xs = xs_by_class[c]
        if ctx.mining and cfg.policy == "jitter":
            jit.append(jitter_images(xs.detach(), cfg.jitter_copies, cfg.jitter, cfg.jitter_std, cfg.jitter_prob, g))
        n_train = xs.shape[0] * (1 + cfg.top_p) if ctx.mining else xs.shape[0]
        if cfg.batch_syn_max is not None and n_train > cfg.batch_syn_max:
            keep[c] = torch.randperm(n_train, generator=g)[: cfg.batch_syn_max].to(ctx.device)
        real.append(ctx.pool.sample(c, cfg.batch_real, g))
    sizes = [xs_by_class[c].shape[0] for c in classes]
    x_all = torch.cat([xs_by_class[c] for c in classes])
    if ctx.mining:
        with _eval_mode(model):
            if cfg.policy == "jitter":
                scores = jitter_utilization(ctx.features, x_all.detach(), ctx.windows, jittered=torch.cat(jit, dim=1))
                choice = select_underused(scores, cfg.top_p)
            else:
                y_all = torch.cat([ctx.labels(c, n) for c, n in zip(classes, sizes)])
                choice = search_underused(ctx.features, x_all, ctx.windows, cfg.top_p, cfg.policy, cfg.response,
                                          model.forward_head, y_all).choice
        ctx.region_counts += np.bincount(choice.reshape(-1).numpy(), minlength=len(ctx.windows))
        choices = torch.split(choice, sizes)
    x_train = []
    for i, c in enumerate(classes):
        xt = training_batch(xs_by_class[c], ctx.windows, choices[i]) if ctx.mining else xs_by_class[c]
        x_train.append(xt[keep[c]] if c in keep else xt)
    n_syn, n_real = [x.shape[0] for x in x_train], [x.shape[0] for x in real]
    with LayerTape(model) as tape:
        logits = model(ctx.norm(torch.cat(real)))
    y_real = torch.cat([ctx.labels(c, n) for c, n in zip(classes, n_real)])
    g_real = tape.class_gradients(logits, y_real, n_real)
    with LayerTape(model) as tape:
        fmap = model.forward_features(ctx.norm(torch.cat(x_train)))
        logits = model.forward_head(fmap)
    y_syn = torch.cat([ctx.labels(c, n) for c, n in zip(classes, n_syn)])
    g_syn = tape.class_gradients(logits, y_syn, n_syn, create_graph=True)
    embs = torch.split(_embed(model, fmap), n_syn) if ctx.centres is not None else None
    out: ClassLosses = {}
    losses: dict[int, torch.Tensor] = {}
    for i, c in enumerate(classes):
        l_g = gradient_distance(g_real[i], g_syn[i], cfg.distance, cfg.match_params)
        loss, l_c_val = l_g, 0.0
        if ctx.centres is not None and embs is not None:
            l_c = cfc_loss(embs[i], c, ctx.centres.centres.clone(), cfg.tau, ctx.centres.valid.clone(),
                           cfg.cfc_include_positive)
            loss = loss + cfg.cfc_weight * l_c
            l_c_val = float(l_c.detach())
            ctx.centres.update(c, embs[i].detach().mean(0))  # after L_c (constants in Eq. 7)
        losses[c] = loss
        out[c] = (float(loss.detach()), float(l_g.detach()), l_c_val)
    _set_grads(leaves, losses)
    return out
