"""UDD / gradient-matching hyper-parameters (:class:`UDDConfig`, defaults = UDD App. A on the IDC
loop) and the original DC recipe as one (:func:`dc_reference_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dd_assets.core.utilization import MUE_INTERVALS
from dd_assets.methods.udd.gradient_matching import DISTANCES, MATCH_PARAMS
from dd_assets.methods.udd.mining import JITTERS, POLICIES, RESPONSES
from dd_assets.methods.udd.regions import WINDOW_FRACTIONS

NET_TRAIN_ON = ("real", "synthetic")
OPTIMIZE_IN = ("pixels", "normalized")


@dataclass
class UDDConfig:
    """UDD / gradient-matching hyper-parameters.  Source of each default in brackets.

    Loops (Algorithm 1): ``iterations`` outer iterations, each with a freshly initialized proxy
    network [App. A: 2000]; ``inner_steps`` training steps per network [IDC inner_loop 100;
    UDD gives none].  Each training step: one matching step of every class, then
    ``net_steps`` SGD steps of the network [Alg. 1: 1] on ``net_batch_size`` images [IDC 64],
    real (Eq. 6, ``net_train_on="real"``) or synthetic (Eq. 5, DC); network SGD lr
    ``net_lr`` [App. A: 0.01, fixed], ``net_momentum`` 0.9 and ``net_weight_decay`` 5e-4 [IDC].

    Pixels: SGD ``lr_img`` [App. A: 0.005], ``momentum_img`` [DC/IDC: 0.5], multiplied by
    ``lr_gamma`` [0.5] at the ``lr_milestones`` fractions of ``iterations`` [App. A: 1200,
    1600, 1800 of 2000]; ``optimize_in="pixels"`` optimizes [0, 1] pixels (IDC) and
    ``"normalized"`` the normalized model input (DC); ``clamp`` clips to [0, 1] pixels at
    every outer iteration and at the end [IDC].

    Matching (Eq. 9): ``batch_real`` real images per class [IDC 64]; ``batch_syn_max``: at most
    this many images of ``S_c^train`` per matching step, a random subset otherwise [IDC 128;
    None = all]; ``distance`` (``"mse"`` Eq. 9 | ``"dc_cosine"`` DC) and ``match_params``
    (``"all"`` Eq. 9 | ``"conv"`` IDC).

    Regions (Sec. 2.2-2.4): ``policy`` (``"none"`` | ``"response"`` | ``"jitter"`` [Sec. 3:
    main results use jitter]); ``response`` (``"activation"`` | ``"gradient"``);
    ``window_fractions`` [Sec. 2.2: 1/3, 1/2, 2/3 -> N = 12]; ``top_p`` windows per image
    [App. A: P = 8]; ``jitter`` [Sec. 2.4: gaussian], ``jitter_copies`` [App. A: M = 2],
    ``jitter_std`` (pixel units; also the half-width of ``"uniform"``) [ours: 0.1],
    ``jitter_prob`` (salt and pepper) [ours: 0.05].

    CFC (Eq. 7-8, 10): ``cfc`` on/off, ``cfc_weight`` [Eq. 10: 1], ``tau`` [App. A: 0.7],
    ``alpha`` [App. A: 0.5], ``cfc_include_positive`` [Eq. 7: False].

    Proxy network: ``arch`` / ``arch_kwargs`` for :func:`dd_assets.models.create_model` when no
    ``model_fn`` is given [App. A: ConvNet-3; instance norm as DC/IDC].
    ``mue_intervals``: ``D`` of Eq. 12 [Fig. 7: 5..10].  ``seed``: every random draw.
    """

    iterations: int = 2000
    inner_steps: int = 100
    lr_img: float = 0.005
    momentum_img: float = 0.5
    lr_milestones: tuple[float, ...] = (0.6, 0.8, 0.9)
    lr_gamma: float = 0.5
    optimize_in: str = "pixels"
    clamp: bool = True
    batch_real: int = 64
    batch_syn_max: int | None = 128
    distance: str = "mse"
    match_params: str = "all"
    net_train_on: str = "real"
    net_lr: float = 0.01
    net_momentum: float = 0.9
    net_weight_decay: float = 5e-4
    net_batch_size: int = 64
    net_steps: int = 1
    policy: str = "jitter"
    response: str = "activation"
    window_fractions: tuple[float, ...] = WINDOW_FRACTIONS
    top_p: int = 8
    jitter: str = "gaussian"
    jitter_copies: int = 2
    jitter_std: float = 0.1
    jitter_prob: float = 0.05
    cfc: bool = True
    cfc_weight: float = 1.0
    tau: float = 0.7
    alpha: float = 0.5
    cfc_include_positive: bool = False
    arch: str = "convnet_d3"
    arch_kwargs: dict[str, Any] = field(default_factory=lambda: {"norm": "instance"})
    mue_intervals: tuple[int, ...] = MUE_INTERVALS
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        checks: list[tuple[str, bool, str]] = [
            ("iterations", self.iterations >= 0, ">= 0"),
            ("inner_steps", self.inner_steps >= 1, ">= 1"),
            ("lr_img", self.lr_img > 0, "> 0"),
            ("momentum_img", 0 <= self.momentum_img < 1, "in [0, 1)"),
            ("lr_gamma", self.lr_gamma > 0, "> 0"),
            ("lr_milestones", all(0 <= f <= 1 for f in self.lr_milestones), "fractions in [0, 1]"),
            ("optimize_in", self.optimize_in in OPTIMIZE_IN, f"one of {OPTIMIZE_IN}"),
            ("batch_real", self.batch_real >= 1, ">= 1"),
            ("batch_syn_max", self.batch_syn_max is None or self.batch_syn_max >= 1, "None or >= 1"),
            ("distance", self.distance in DISTANCES, f"one of {DISTANCES}"),
            ("match_params", self.match_params in MATCH_PARAMS, f"one of {MATCH_PARAMS}"),
            ("net_train_on", self.net_train_on in NET_TRAIN_ON, f"one of {NET_TRAIN_ON}"),
            ("net_lr", self.net_lr >= 0, ">= 0"),
            ("net_batch_size", self.net_batch_size >= 1, ">= 1"),
            ("net_steps", self.net_steps >= 0, ">= 0"),
            ("policy", self.policy in POLICIES, f"one of {POLICIES}"),
            ("response", self.response in RESPONSES, f"one of {RESPONSES}"),
            ("window_fractions", len(self.window_fractions) > 0
             and all(0 < f <= 1 for f in self.window_fractions), "non-empty fractions in (0, 1]"),
            ("top_p", 0 <= self.top_p <= 4 * len(self.window_fractions),
             f"in [0, N = 4 * len(window_fractions) = {4 * len(self.window_fractions)}]"),
            ("jitter", self.jitter in JITTERS, f"one of {JITTERS}"),
            ("jitter_copies", self.jitter_copies >= 1, ">= 1"),
            ("jitter_std", self.jitter_std >= 0, ">= 0"),
            ("jitter_prob", 0 <= self.jitter_prob <= 1, "in [0, 1]"),
            ("cfc_weight", self.cfc_weight >= 0, ">= 0"),
            ("tau", self.tau > 0, "> 0"),
            ("alpha", 0 <= self.alpha <= 1, "in [0, 1]"),
            ("mue_intervals", len(self.mue_intervals) > 0 and all(d >= 2 for d in self.mue_intervals),
             "non-empty, each >= 2"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"UDDConfig.{name} must be {want}, got {getattr(self, name)!r}")


def dc_reference_config(ipc: int, **overrides: Any) -> UDDConfig:
    """The original DC recipe (Zhao et al., ICLR'21) as a :class:`UDDConfig`.

    1000 iterations; (matching steps, network epochs) per network = (1, 1) / (10, 50) /
    (50, 10) for IPC 1 / 10 / 50; pixel SGD lr 0.1, momentum 0.5, no schedule, optimized in
    normalized space, no clamping; network SGD lr 0.01, momentum 0.5, trained on the
    synthetic set (Eq. 5, one step per epoch: batch 256 holds a small set); 256 real images
    per class; DC's per-output-channel cosine distance; no regions, no CFC.
    """
    loops = {1: (1, 1), 10: (10, 50), 50: (50, 10)}
    if ipc not in loops:
        raise ValueError(f"dc_reference_config knows ipc 1, 10, 50 (DC's table), got {ipc}; set the loops yourself")
    outer, inner = loops[ipc]
    cfg = UDDConfig(
        iterations=1000, inner_steps=outer, net_steps=inner, lr_img=0.1, momentum_img=0.5, lr_milestones=(),
        optimize_in="normalized", clamp=False, batch_real=256, batch_syn_max=None, distance="dc_cosine",
        match_params="all", net_train_on="synthetic", net_lr=0.01, net_momentum=0.5, net_weight_decay=0.0,
        net_batch_size=256, policy="none", cfc=False,
    )
    return dataclasses.replace(cfg, **overrides)
