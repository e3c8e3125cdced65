"""Per-method Dagster pieces: ``dd_assets/defs/methods/<name>.py`` for a method whose chain needs
assets of its own (RDED crop scores; FocusDC's ViT, attention maps and DFT students; NRR-DD's
CAMs and CIDD scores; DDPS's diffusion model and levels; EDF's experts and Comp-DD; UDD's
synthesis). A piece is a module with any of these functions (all optional):

``shared_assets(params, parts) -> list[AssetsDefinition]``
    assets built once when any ``methods`` entry uses the method;
``candidates_asset(params, entry) -> str``
    the per-class asset a select entry reads (default: the plugin's ``candidates``);
``load_candidates(root, asset, class_index, class_name, size) -> ClassCandidates``
    how to read one class of the candidate assets the piece builds;
``distilled_asset(params, parts, entry) -> AssetsDefinition``
    the ``<entry>_distilled`` asset of a synthesize method;
``protocol_assets(params, parts, entry, students) -> list[AssetsDefinition]``
    the students of an evaluation protocol the method's paper uses (``MethodPlugin.protocols``).

The generic chain (:mod:`dd_assets.defs.chain`) finds a piece by the method's name; a method
without one (random, herding, k-means) needs nothing beyond the shared assets.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def piece(method: str) -> ModuleType | None:
    """The Dagster piece of ``method``, or None when it has none."""
    name = f"{__name__}.{method}"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def hook(method: str, name: str):
    """Function ``name`` of ``method``'s piece, or None."""
    mod = piece(method)
    return getattr(mod, name, None) if mod is not None else None
