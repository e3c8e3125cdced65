"""Dispatch for pixel-optimizing methods (``MethodSpec.synthesize``: EDF, UDD).

Each such method has a module ``dd_assets.defs.<synthesize>_assets`` with

* ``build(params, parts) -> list[AssetsDefinition]``: assets shared by all its entries and IPCs
  (e.g. EDF's expert trajectories), built once when any ``methods`` entry uses the method;
* ``distilled_asset(params, parts, entry) -> AssetsDefinition``: the entry's
  ``<entry>_distilled`` asset (IPC-partitioned; Zarr ``images``/``labels`` like every other
  method, so soft labels and students are shared code).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import dagster as dg

from dd_assets.config import Params
from dd_assets.defs.partitions import Partitions
from dd_assets.methods_catalog import METHODS, MethodSpec, uses


def _module(kind: str) -> ModuleType:
    return importlib.import_module(f"dd_assets.defs.{kind}_assets")


def shared_assets(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    """Shared assets of every pixel-optimizing method that some ``methods`` entry uses."""
    kinds = sorted({spec.synthesize for spec in METHODS.values() if spec.synthesize})
    out: list[dg.AssetsDefinition] = []
    for kind in kinds:
        if any(uses(params.block("methods"), s.name) for s in METHODS.values() if s.synthesize == kind):
            out += _module(kind).build(params, parts)
    return out


def distilled_asset(params: Params, parts: Partitions, entry: str, spec: MethodSpec) -> dg.AssetsDefinition:
    """``<entry>_distilled`` of a pixel-optimizing entry."""
    assert spec.synthesize, spec.name
    return _module(spec.synthesize).distilled_asset(params, parts, entry)
