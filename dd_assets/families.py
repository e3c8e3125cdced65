"""Which method family reads each asset: the basis of the DVC stages (dvc_pipeline.py) and of the
``method`` tag that shows one method's chain in the Dagster UI (``tag:method=rded``).

A family is a base method with all its ``methods`` entries (``nrr``, ``nrr_dbr``, ``nrr_ra``...).
An asset belongs to a family when that family's students (``<entry>_students``,
``<entry>_dft_students``) are the only ones downstream of it; assets two or more families read
(the teacher, its features) or that no method reads are shared.
"""

from __future__ import annotations

from dd_assets.config import Params
from dd_assets.methods.entries import base_method

TAG = "method"


def families(params: Params) -> dict[str, str]:
    """methods entry -> family (its base method)."""
    block = params.block("methods")
    return {e: base_method(e, block[e]) for e in params.methods}


def readers(parents: dict[str, set[str]], params: Params) -> dict[str, set[str]]:
    """asset name -> the families whose students read it (directly or through other assets).

    ``parents`` maps every asset name to the names of its parents."""
    out: dict[str, set[str]] = {name: set() for name in parents}
    for entry, fam in families(params).items():
        for sink in (f"{entry}_students", f"{entry}_dft_students"):
            if sink not in parents:
                continue
            stack, seen = [sink], {sink}
            while stack:
                for up in parents[stack.pop()]:
                    if up not in seen:
                        seen.add(up)
                        stack.append(up)
            for name in seen:
                out[name].add(fam)
    return out


def owner(name: str, group: str | None, read_by: set[str]) -> str | None:
    """The family an asset belongs to, or None (data, reports, shared)."""
    if group in ("data", "reports") or len(read_by) != 1:
        return None
    return next(iter(read_by))


def tag_assets(assets: list, params: Params) -> list:
    """``assets`` with the tag ``method=<family>`` on every asset one family owns."""
    import dagster as dg

    parents: dict[str, set[str]] = {}
    groups: dict[str, str | None] = {}
    for a in assets:
        for key in a.keys:
            name = key.to_user_string()
            parents[name] = {d.to_user_string() for d in a.asset_deps.get(key, set())}
            groups[name] = a.group_names_by_key.get(key)
    read_by = readers(parents, params)

    def tag(spec: dg.AssetSpec) -> dg.AssetSpec:
        name = spec.key.to_user_string()
        fam = owner(name, groups.get(name), read_by.get(name, set()))
        return spec.merge_attributes(tags={TAG: fam}) if fam else spec

    return [dg.map_asset_specs(tag, [a])[0] if isinstance(a, dg.AssetsDefinition) else a for a in assets]
