"""A small registry of method implementations keyed by (stage, name).

Stages are the steps every distillation method is made of:
``score`` (per-image scores, IPC-independent), ``select`` (which images/crops),
``compose`` (how tiles become distilled images), ``synthesize`` (pixel optimization of
synthetic images: trajectory or gradient matching), ``label`` (how distilled images are
labelled for student training).  Methods compose by naming one implementation per stage,
e.g. DDPS selection + NRR refinement + DBR labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

STAGES = ("score", "select", "compose", "synthesize", "label")

_REGISTRY: dict[tuple[str, str], Callable[..., Any]] = {}


def register(stage: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as implementation ``name`` of ``stage``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = (stage, name)
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ValueError(f"{stage}/{name} is registered twice")
        _REGISTRY[key] = fn
        return fn

    return deco


def get(stage: str, name: str) -> Callable[..., Any]:
    """Look up an implementation; the error lists what exists."""
    _load_builtin()
    try:
        return _REGISTRY[(stage, name)]
    except KeyError:
        names = sorted(n for s, n in _REGISTRY if s == stage)
        raise KeyError(
            f"no {stage!r} implementation named {name!r}; registered: {', '.join(names) or 'none'}"
        ) from None


def available() -> dict[str, list[str]]:
    """Registered names by stage."""
    _load_builtin()
    out: dict[str, list[str]] = {s: [] for s in STAGES}
    for stage, name in sorted(_REGISTRY):
        out[stage].append(name)
    return out


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    from dd_assets.methods import builtin  # noqa: F401
