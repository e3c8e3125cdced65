"""Plain gradient matching (DC, Zhao et al., ICLR'21): the UDD loop without regions and CFC,
registered as ``("synthesize", "dc")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dd_assets.methods.udd.config import UDDConfig
from dd_assets.methods.udd.distill import UDDResult, udd_distill
from dd_assets.methods.udd.gradient_matching import RealSource


def dc_distill(
    real: RealSource,
    syn_init: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    cfg: UDDConfig | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    **kwargs: Any,
) -> UDDResult:
    """Plain gradient matching: :func:`udd_distill` with ``policy="none"`` and ``cfc=False``.

    Every other setting is taken from ``cfg`` (default :class:`UDDConfig`, i.e. the IDC-style
    loop UDD builds on: Eq. 6 real-data network training, Eq. 9 distance), so this is the
    ablation base row; :func:`dc_reference_config` gives the original DC recipe.
    """
    base = dataclasses.replace(cfg or UDDConfig(), policy="none", cfc=False)
    return udd_distill(real, syn_init, labels, base, device, on_step, **kwargs)
