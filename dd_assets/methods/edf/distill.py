"""EDF: Emphasize Discriminative Features for dataset distillation -- the loop (Algorithm 1).

Paper: "Emphasizing Discriminative Features for Dataset Distillation in Complex Scenarios"
(EDF), Sec. 2, Algorithm 1.  EDF is trajectory matching (:mod:`dd_assets.methods.edf.matching`:
MTT with DATM's options) plus two modules: Common Pattern Dropout
(:mod:`dd_assets.methods.edf.cpd`, Eq. 1-2) and Discriminative Area Enhancement
(:mod:`dd_assets.methods.edf.dae`, Eq. 3-5).

:func:`edf_distill` (``("synthesize", "edf")``) runs Algorithm 1 with CPD and DAE switchable
for the ablation rows (MTT / +CPD / +DAE / EDF, Table 4, :func:`ablation_configs`);
:func:`dd_assets.methods.edf.config.edf_config` builds the App. B Table 8 settings per IPC
(and per ImageNet subset).  See ``docs/edf.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from dd_assets.core.cam import cam_class_indices
from dd_assets.methods.edf.config import EDFConfig, _validate
from dd_assets.methods.edf.cpd import common_pattern_dropout, dropout_count, per_tensor_terms
from dd_assets.methods.edf.dae import dae_weights, discriminative_share, synthetic_cams
from dd_assets.methods.edf.experts import ExpertTrajectories
from dd_assets.methods.edf.matching import DistillResult, trajectory_matching_distill
from dd_assets.methods.edf.student import eq1_loss


def edf_distill(
    real_init: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    trajectories: ExpertTrajectories,
    cam_model: nn.Module | None,
    cfg: EDFConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
    cam_class_names: Sequence[str] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> DistillResult:
    """EDF (Algorithm 1): trajectory matching with Common Pattern Dropout and
    Discriminative Area Enhancement.

    Per iteration ``t`` (see :func:`trajectory_matching_distill` for the matching part)::

        (num, den) = per-parameter terms of Eq. 1
        L_edf = common_pattern_dropout(num, den, alpha)          (Eq. 2; use_cpd)  else Eq. 1
        if t mod K == 0: M = GradCAM_G(D_syn) for each image's class   (Eq. 3; use_dae)
        grad_x <- grad_x * F(M, beta)                            (Eq. 4-5; use_dae)
        D_syn <- SGD step (lr_pixel, momentum)                   (line 19)

    With both modules off this is exactly :func:`dd_assets.methods.edf.matching.mtt_distill`.

    Args:
        real_init: uint8 ``[N, C, H, W]`` initial synthetic images (real images, chosen by
            the caller).
        labels: ``[N]`` class indices (into ``class_names`` and the experts' label space).
        trajectories: expert trajectories (:func:`dd_assets.methods.edf.experts.train_experts`).
        cam_model: Grad-CAM model ``G`` trained on real data, with ``forward_features`` /
            ``forward_head``; it sees the synthetic images normalized with the same
            ``mean``/``std`` (resized to ``cfg.cam_image_size`` when set).  Moved to
            ``device``.  May be ``None`` when ``use_dae`` is off.
        class_names: names of the label indices; cam_class_names: the CAM model's class
            names in its index order.  Required with DAE: each label is mapped by *name*
            (:func:`cam_class_indices`); a class missing from the CAM model is a ``ValueError``.
        on_step: ``on_step(t, {"loss", "lr", "expert", "start_epoch", "skipped"[, "cpd_dropped"]})``.

    Returns:
        :class:`DistillResult`; ``extra`` holds ``cam_iterations`` (when the maps were
        recomputed), ``discriminative_share`` (mean share of pixels >= the image mean at
        each recomputation) and ``cpd_dropped`` (terms dropped in the last iteration).
    """
    _validate(cfg)
    device = torch.device(device)
    extra: dict[str, Any] = {"cam_iterations": [], "discriminative_share": [], "cpd_dropped": 0}
    numels = [math.prod(s) for s in trajectories.shapes]

    def cpd_reduce(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        if cfg.cpd_granularity == "tensor":
            num, den = per_tensor_terms(num, den, numels)
        loss, _ = common_pattern_dropout(num, den, cfg.alpha, cfg.cpd_normalize)
        # = int((~keep).sum()): CPD drops exactly floor(alpha * P) terms -- known on the host,
        # so no read-back per iteration
        extra["cpd_dropped"] = min(dropout_count(cfg.alpha, int(num.shape[0])), int(num.shape[0]))
        return loss

    shares: list[torch.Tensor] = []  # discriminative_share per recomputation, read back after the loop
    grad_hook: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    if cfg.use_dae:
        if cam_model is None:
            raise ValueError("edf_distill with use_dae=True needs cam_model (a model trained on real data)")
        if class_names is None or cam_class_names is None:
            raise ValueError("edf_distill with use_dae=True needs class_names and cam_class_names "
                             "to map each synthetic label to the CAM model's class index by name")
        cam_idx = torch.from_numpy(cam_class_indices(labels, class_names, cam_class_names))
        cam_model.to(device)
        state: dict[str, torch.Tensor] = {}

        def dae_hook(it: int, images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            if it % cfg.cam_every == 0 or "w" not in state:  # Algorithm 1 lines 15-17
                cams = synthetic_cams(cam_model, images, cam_idx, cfg.cam_image_size, cfg.cam_batch_size)
                state["w"] = dae_weights(cams, cfg.beta, cfg.cam_threshold).to(grad.device)
                extra["cam_iterations"].append(it)
                shares.append(discriminative_share(cams).mean())
            return grad * state["w"]  # Eq. 5

        grad_hook = dae_hook

    def step_cb(it: int, metrics: dict[str, float]) -> None:
        if on_step is not None:
            if cfg.use_cpd:
                metrics = {**metrics, "cpd_dropped": float(extra["cpd_dropped"])}
            on_step(it, metrics)

    result = trajectory_matching_distill(real_init, labels, trajectories, cfg.match, mean, std, device,
                                         reduce=cpd_reduce if cfg.use_cpd else eq1_loss, grad_hook=grad_hook,
                                         on_step=None if on_step is None else step_cb)  # None: no per-step floats
    if shares:  # one transfer; float32 values, as float() gave them one by one
        extra["discriminative_share"] = torch.stack(shares).tolist()
    result.extra.update(extra)
    return result


def ablation_configs(cfg: EDFConfig) -> dict[str, EDFConfig]:
    """The four Table 4 rows from one config: ``"mtt"`` (no module), ``"cpd"``, ``"dae"``,
    ``"edf"`` (both)."""
    return {
        "mtt": replace(cfg, use_cpd=False, use_dae=False),
        "cpd": replace(cfg, use_cpd=True, use_dae=False),
        "dae": replace(cfg, use_cpd=False, use_dae=True),
        "edf": replace(cfg, use_cpd=True, use_dae=True),
    }
