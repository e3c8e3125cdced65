"""UDD: dataset distillation by mining under-utilized regions -- the loop (Algorithm 1).

Paper: "UDD: Dataset Distillation via Mining Underutilized Regions" (Wang, Zhang, Cheng),
/work/shared/papers/004_5acb7ff699889e9c.txt: Sec. 2.2-2.5, Eq. 1-10, Algorithm 1,
App. A (hyper-parameters) and App. E (mUE, Eq. 11-12).  The pieces live next to this module
in :mod:`dd_assets.methods.udd`: gradient matching in ``gradient_matching`` (per-class
gradients from one forward in ``class_gradients``), candidate regions in ``regions``, the
region search in ``mining``, CFC in ``cfc``, one matching step of every class in
``match_step``, the hyper-parameters in ``config``; mUE in :mod:`dd_assets.core.utilization`.

Per outer iteration a proxy network is randomly re-initialized (Algorithm 1 line 2); per
training step ``t`` and class ``c``:

1. **Candidate regions** (Sec. 2.2): ``N = 12`` windows per synthetic image, sizes
   ``H/3, H/2, 2H/3`` (square fractions of each side) in the four corners ->
   :func:`~dd_assets.methods.udd.regions.candidate_windows`.
2. **Under-used region search**, ``P`` lowest-scoring windows per image ->
   :func:`~dd_assets.methods.udd.mining.search_underused`:

   * response policy (Sec. 2.3, Eq. 1): ONE forward pass over the whole image and each
     window's score read off the last feature map (Fig. 4b), either the mean activation
     (``activation_response``) or the mean gradient magnitude of the CE loss w.r.t. the
     feature map (``gradient_response``);
   * data-jittering policy (Sec. 2.4, Eq. 2-4): ``M`` jittered copies (Gaussian noise by
     default), ``sigma_n = |Lambda_n - mean_m Lambda_hat_{n,m}|`` -> ``jitter_utilization``.

3. The chosen windows are cropped and bilinearly upsampled to ``H x W``
   (``regions.crop_upsample``, differentiable) and join the originals:
   ``S_c^train = S_c + R*`` (``regions.training_batch``).
4. ``L_syn = L_g + L_c`` (Eq. 10): gradient matching (Eq. 9) plus the category-wise feature
   contrastive loss (Eq. 7, ``cfc.cfc_loss``) against class centres kept as a moving average
   (Eq. 8, ``cfc.ClassCentres``).  The pixels take one SGD step per training step.
5. The proxy network takes an SGD step on a real mini-batch (Eq. 6, Algorithm 1 lines 9-10).

:func:`udd_distill` (``("synthesize", "udd")``) runs the whole loop; flags ``policy``
(``none`` / ``response`` / ``jitter``) and ``cfc`` give the ablation rows, and
:func:`dd_assets.methods.udd.dc.dc_distill` (``("synthesize", "dc")``) is the plain
gradient-matching row (``policy="none"``, ``cfc=False``).
:func:`dd_assets.core.utilization.set_utilization` computes mUE (Eq. 11-12).

Hyper-parameters (App. A): ``N = 12, M = 2, P = 8, tau = 0.7, alpha = 0.5``; synthetic
learning rate 0.005 halved at iterations 1200, 1600, 1800 of 2000; proxy network lr 0.01
(fixed).  Everything else follows IDC (Kim et al., ICML'22), which UDD builds on; see
``docs/udd.md`` for the sources and every deliberate deviation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dd_assets.core.imaging import Normalizer, to_unit_float
from dd_assets.core.utilization import _check_feature_model, _eval_mode, set_utilization
from dd_assets.methods.udd.cfc import ClassCentres
from dd_assets.methods.udd.class_gradients import batched_support
from dd_assets.methods.udd.config import UDDConfig
from dd_assets.methods.udd.gradient_matching import (
    RealPool,
    RealSource,
    fresh_network,
    network_sgd,
    network_step,
    step_lr,
)
from dd_assets.methods.udd.match_step import _embed, _match_batched, _match_loop, _StepContext
from dd_assets.methods.udd.regions import candidate_windows


@dataclass
class UDDResult:
    """Output of :func:`udd_distill`.

    ``images``: float ``[N, C, H, W]`` pixels in [0, 1] (clamped), CPU, in the input order;
    ``labels`` int64 ``[N]``.  ``loss_curve``: one dict per outer iteration (``iteration``,
    ``loss`` = mean ``L_syn``, ``loss_g``, ``loss_c``, ``net_loss``, ``lr``, ``seconds``).
    ``utilization`` / ``utilization_per_image``: mUE
    (:func:`~dd_assets.core.utilization.set_utilization`) of ``images``
    under the last proxy network; ``utilization_init``: mUE of the initial images under the
    same network.  ``region_counts [N_windows]``: how often each candidate window was mined.
    """

    images: torch.Tensor
    labels: torch.Tensor
    loss_curve: list[dict[str, float]]
    utilization: float
    utilization_per_image: np.ndarray
    utilization_init: float
    region_counts: np.ndarray
    config: UDDConfig
    seconds: float

    def images_uint8(self) -> np.ndarray:
        """uint8 ``[N, C, H, W]`` (rounded)."""
        return (self.images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


def udd_distill(
    real: RealSource,
    syn_init: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    cfg: UDDConfig | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_fn: Callable[[], nn.Module] | None = None,
    num_classes: int | None = None,
    vectorized: bool | None = None,
    class_chunk: int | None = None,
) -> UDDResult:
    """UDD (Algorithm 1): gradient matching with under-used region mining and CFC.

    For ``it`` in ``range(cfg.iterations)``: set the pixel lr (:func:`step_lr`), clamp, build a
    fresh proxy network (seed ``cfg.seed * 1_000_003 + it``), set every class centre to the
    mean embedding of the class's synthetic images (if ``cfg.cfc``); then ``cfg.inner_steps``
    times:

    * for every class ``c`` (ascending): ``S_c`` = its synthetic images;
      ``R* = search_underused(S_c)`` (proxy in eval mode, no gradient);
      ``S_c^train = S_c + upsample(R*)`` (random subset of ``batch_syn_max`` if larger);
      ``T_c`` = ``batch_real`` real images of ``c``;
      ``L_syn = L_g(T_c, S_c^train) + cfc_weight * L_c(S_c^train)`` (Eq. 9, 7, 10); the pixel
      gradient ``dL_syn/dS_c`` is stored; the centre of ``c`` moves by Eq. 8;
    * one SGD step of all pixels (Algorithm 1 line 7, see docs/udd.md);
    * ``cfg.net_steps`` SGD steps of the network on a real (Eq. 6) or synthetic (Eq. 5)
      mini-batch, skipped after the last training step (the network is discarded).

    Args:
        real: :data:`~dd_assets.methods.udd.gradient_matching.RealSource`, ``{class: images}``
            (uint8 or [0, 1] float ``[N_c, C, H, W]``) or ``sampler(c, n, generator)``.
        syn_init: uint8 or [0, 1] float ``[N, C, H, W]`` initial synthetic images (UDD
            Sec. 2.1: real samples).
        labels: ``[N]`` class of each synthetic image.
        cfg: :class:`UDDConfig` (defaults: the paper's).
        device: where the network and pixels live.
        on_step: ``on_step(iteration, record)`` after every outer iteration (record as in
            :attr:`UDDResult.loss_curve`).
        mean, std: per-channel normalization of [0, 1] pixels for the network (None: 0 / 1).
        model_fn: builds a fresh proxy network (``forward_features`` / ``forward_head``
            needed); default ``create_model(cfg.arch, num_classes, in_channels=C,
            image_size=H, **cfg.arch_kwargs)``.
        num_classes: the network's number of outputs (default: ``max label + 1``).
        vectorized: match all classes of a step in one batched forward (:func:`_match_batched`,
            same result up to float rounding) instead of the per-class reference loop
            (:func:`_match_loop`).  ``None`` (default): batched on CUDA, where the loop is bound
            by kernel launches, and the loop on the CPU, where the step is bound by arithmetic
            and memory traffic and the batched forward measured slower
            (``benchmarks/udd_iteration.py``, docs/udd.md).  A model that
            :func:`~dd_assets.methods.udd.class_gradients.batched_support` rejects (batch norm,
            dropout, other parameterized layers) always runs the loop.  Not part of the result
            (no config field).
        class_chunk: classes per batched forward (memory bound; default all classes).

    Returns:
        :class:`UDDResult`.
    """
    t_start = time.perf_counter()
    if class_chunk is not None and class_chunk < 1:
        raise ValueError(f"class_chunk must be None or >= 1, got {class_chunk}")
    cfg = cfg or UDDConfig()
    cfg.validate()
    device = torch.device(device)
    syn0 = to_unit_float(syn_init, "syn_init")
    n, ch, h, w = syn0.shape
    if n == 0:
        raise ValueError("syn_init holds no image")
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"syn_init has {n} images but labels has {lab.shape[0]} entries")
    if int(lab.min()) < 0:
        raise ValueError("labels must be >= 0")
    classes = sorted(int(c) for c in torch.unique(lab).tolist())
    num_classes = int(num_classes) if num_classes is not None else classes[-1] + 1
    if classes[-1] >= num_classes:
        raise ValueError(f"num_classes={num_classes} but labels go up to {classes[-1]}")
    chunk = len(classes) if class_chunk is None else int(class_chunk)
    use_batched = device.type == "cuda" if vectorized is None else bool(vectorized)
    pool = RealPool(real, device)
    missing = [c for c in classes if pool.sampler is None and c not in pool.pools]
    if missing:
        raise ValueError(f"real has no images of classes {missing}")
    if model_fn is None:
        from dd_assets.models import create_model

        arch, kwargs = cfg.arch, dict(cfg.arch_kwargs)

        def model_fn() -> nn.Module:
            return create_model(arch, num_classes, in_channels=ch, image_size=h, **kwargs)

    norm = Normalizer(mean, std, ch, device)
    windows = candidate_windows(h, w, cfg.window_fractions)
    g = torch.Generator().manual_seed(int(cfg.seed))
    in_pixels = cfg.optimize_in == "pixels"

    def to_pixels(v: torch.Tensor) -> torch.Tensor:
        return v if in_pixels else norm.inverse(v)

    index_of = {c: torch.nonzero(lab == c).reshape(-1) for c in classes}
    start = {c: syn0[index_of[c]].to(device) for c in classes}
    params = {c: (x if in_pixels else norm(x)).clone().requires_grad_(True) for c, x in start.items()}
    opt = torch.optim.SGD(list(params.values()), lr=cfg.lr_img, momentum=cfg.momentum_img)
    region_counts = np.zeros(len(windows), dtype=np.int64)
    curve: list[dict[str, float]] = []
    model: nn.Module | None = None

    def clamp_() -> None:
        with torch.no_grad():
            for p in params.values():
                p.copy_(p.clamp(0.0, 1.0) if in_pixels else norm(norm.inverse(p).clamp(0.0, 1.0)))

    for it in range(cfg.iterations):
        t0 = time.perf_counter()
        lr = step_lr(cfg.lr_img, it, cfg.iterations, cfg.lr_milestones, cfg.lr_gamma)
        for group in opt.param_groups:
            group["lr"] = lr
        if cfg.clamp:
            clamp_()
        model = fresh_network(model_fn, cfg.seed * 1_000_003 + it, device)
        _check_feature_model(model, "model_fn")
        net_opt = network_sgd(model, cfg.net_lr, cfg.net_momentum, cfg.net_weight_decay)
        batched = use_batched and batched_support(model) is None
        centres: ClassCentres | None = None
        if cfg.cfc:
            with torch.no_grad(), _eval_mode(model):
                embs = {c: _embed(model, model.forward_features(norm(to_pixels(params[c])))).mean(0) for c in classes}
            centres = ClassCentres(num_classes, next(iter(embs.values())).numel(), cfg.alpha, device)
            for c in classes:
                centres.update(c, embs[c])
        sums = {"loss": 0.0, "loss_g": 0.0, "loss_c": 0.0, "net_loss": 0.0}
        n_match = n_net = 0
        for t in range(cfg.inner_steps):
            opt.zero_grad(set_to_none=True)
            ctx = _StepContext(cfg, model, norm, windows, pool, g, device, centres, region_counts)
            blocks = [classes[i : i + chunk] for i in range(0, len(classes), chunk)] if batched else [classes]
            for block in blocks:
                xs = {c: to_pixels(params[c]) for c in block}
                per_class = (_match_batched if batched else _match_loop)(ctx, xs, params)
                for loss, l_g, l_c in per_class.values():
                    sums["loss"] += loss
                    sums["loss_g"] += l_g
                    sums["loss_c"] += l_c
                    n_match += 1
            opt.step()
            if t == cfg.inner_steps - 1:
                break
            for _ in range(cfg.net_steps):
                if cfg.net_train_on == "real":
                    xb, yb = pool.sample_mixed(classes, cfg.net_batch_size, g)
                else:
                    with torch.no_grad():
                        xb = torch.cat([to_pixels(params[c]) for c in classes])
                    yb = torch.cat([torch.full((params[c].shape[0],), c, dtype=torch.long) for c in classes]).to(device)
                    if xb.shape[0] > cfg.net_batch_size:
                        sub = torch.randperm(xb.shape[0], generator=g)[: cfg.net_batch_size].to(device)
                        xb, yb = xb[sub], yb[sub]
                sums["net_loss"] += network_step(model, net_opt, norm(xb), yb)
                n_net += 1
        record = {
            "iteration": float(it),
            "loss": sums["loss"] / max(1, n_match),
            "loss_g": sums["loss_g"] / max(1, n_match),
            "loss_c": sums["loss_c"] / max(1, n_match),
            "net_loss": sums["net_loss"] / max(1, n_net),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        curve.append(record)
        if on_step is not None:
            on_step(it, record)

    if cfg.clamp:
        clamp_()
    out = torch.empty((n, ch, h, w), dtype=torch.float32)
    with torch.no_grad():
        for c in classes:
            out[index_of[c]] = to_pixels(params[c]).clamp(0.0, 1.0).float().cpu()
    if model is None:
        model = fresh_network(model_fn, cfg.seed * 1_000_003, device)
        _check_feature_model(model, "model_fn")
    util = set_utilization(model, out, mean, std, device, cfg.mue_intervals)
    util0 = set_utilization(model, syn0.clamp(0.0, 1.0), mean, std, device, cfg.mue_intervals)
    return UDDResult(
        images=out,
        labels=lab.clone(),
        loss_curve=curve,
        utilization=util.mue,
        utilization_per_image=util.per_image,
        utilization_init=util0.mue,
        region_counts=region_counts,
        config=cfg,
        seconds=time.perf_counter() - t_start,
    )
