"""Distillation methods as data: which stage implementations each method composes and
which parameters (with paper defaults) it accepts.  No Dagster imports; the Dagster layer
builds one asset chain per entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    name: str
    select: str  # registry name of the ``select`` stage
    candidates: str  # the asset its candidates come from (manifest, rded_scores, teacher_features, ...)
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


METHODS: dict[str, MethodSpec] = {
    "random": MethodSpec(
        "random",
        select="random",
        candidates="manifest",
        defaults={"seed": 0},
        description="seeded random real subset (the baseline every result is compared with)",
    ),
    "rded": MethodSpec(
        "rded",
        select="rded",
        candidates="rded_scores",
        defaults={"num_crop": 5, "mipc": 300, "factor": 1, "scale": [0.08, 1.0], "seed": 0},
        description="RDED: lowest observer-CE crops, factor x factor composites",
    ),
    "herding": MethodSpec(
        "herding",
        select="herding",
        candidates="teacher_features",
        defaults={},
        description="herding coreset over teacher penultimate features",
    ),
    "focusdc": MethodSpec(
        "focusdc",
        select="focusdc",
        candidates="focusdc_attention",
        defaults={"alpha": 0.8, "eta": 30.0, "m": 3, "n": 1, "variant": "max_as", "window": "max",
                  "confidence": "max", "context_sampling": "confidence", "seed": 0},
        description="FocusDC: ViT-attention key patches (m=3) + a low-res view (n=1) per image",
    ),
    "kmeans": MethodSpec(
        "kmeans",
        select="kmeans",
        candidates="teacher_features",
        defaults={"seed": 0, "n_init": 10},
        description="k-means coreset: real image nearest each of IPC centres per class",
    ),
}


def check_methods(block: Any, where: str) -> None:
    """Raise a ValueError naming the unknown method or parameter and what is allowed."""
    if not isinstance(block, dict) or not block:
        raise ValueError(f"{where}: 'methods' must map method names to parameter blocks")
    for name, params in block.items():
        if name not in METHODS:
            raise ValueError(
                f"{where}: unknown method {name!r} under 'methods'; known: {', '.join(sorted(METHODS))}"
            )
        params = params or {}
        if not isinstance(params, dict):
            raise ValueError(f"{where}: methods.{name} must be a mapping of parameters")
        allowed = METHODS[name].defaults
        for key in params:
            if key not in allowed:
                raise ValueError(
                    f"{where}: unknown parameter methods.{name}.{key}; "
                    f"allowed: {', '.join(sorted(allowed)) or 'none'}"
                )


def method_params(name: str, block: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with the user's block."""
    out = dict(METHODS[name].defaults)
    out.update(block or {})
    return out
