"""``params.yaml`` ``methods`` entries -> plugin and resolved parameters (pure; no Dagster).

Variants are data: ``nrr_dbr: {method: nrr, labels: dbr}`` is NRR-DD with DBR labels, a chain of
its own next to ``nrr``; an entry without ``method:`` instantiates the plugin of its own name.
"""

from __future__ import annotations

from typing import Any

from dd_assets.methods import registry
from dd_assets.methods.plugin import MethodPlugin


def base_method(name: str, block: dict[str, Any] | None) -> str:
    """The method an entry instantiates: ``method:`` in its block, else its name."""
    return str((block or {}).get("method", name))


def plugin_of(name: str, block: dict[str, Any] | None) -> MethodPlugin:
    return registry.get(base_method(name, block))


def method_params(name: str, block: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults of the entry's plugin config overlaid with the user's block."""
    out = plugin_of(name, block).defaults
    out.update(block or {})
    out.pop("method", None)
    return out


def entry_config(name: str, block: dict[str, Any] | None) -> Any:
    """The entry's typed config (the plugin's dataclass at the resolved parameters)."""
    return plugin_of(name, block).make_config(method_params(name, block))


def hashed_params(name: str, block: dict[str, Any] | None) -> dict[str, Any]:
    """The resolved parameters as hashed into versions and ``params_hash`` columns: a parameter
    at its ``MethodPlugin.compat`` value (added after outputs existed, at the value that
    reproduces them) is left out, so adding it changes no existing version or table."""
    plugin = plugin_of(name, block)
    return {k: v for k, v in method_params(name, block).items()
            if not (k in plugin.compat and v == plugin.compat[k])}


def images_source(methods_block: dict[str, Any], name: str) -> str:
    """The entry whose distilled images entry ``name`` trains on: itself, unless an earlier
    entry of the same method differs from it only in label parameters
    (``MethodPlugin.label_keys``) -- then the images are identical and are computed once
    (e.g. ``nrr_dbr: {method: nrr, labels: dbr}`` labels ``nrr``'s refined images)."""
    base = base_method(name, methods_block.get(name))
    skip = set(registry.get(base).label_keys)
    mine = {k: v for k, v in method_params(name, methods_block.get(name)).items() if k not in skip}
    for other, block in methods_block.items():
        if other == name:
            return name
        if base_method(other, block) != base:
            continue
        theirs = {k: v for k, v in method_params(other, block).items() if k not in skip}
        if theirs == mine:
            return images_source(methods_block, other)
    return name


def entries_of(methods_block: dict[str, Any], base: str) -> list[str]:
    """The entries (in params order) that instantiate method ``base``."""
    return [n for n, b in methods_block.items() if base_method(n, b) == base]


def uses(methods_block: dict[str, Any], base: str) -> bool:
    """Whether any entry of the ``methods`` block instantiates method ``base``."""
    return bool(entries_of(methods_block, base))


def owner_entry(methods_block: dict[str, Any], entry: str, keys: tuple[str, ...]) -> str:
    """The first entry of ``entry``'s method whose parameters agree with ``entry``'s on ``keys``:
    the one rule by which variants share a scoring asset (RDED crop scores, CIDD scores, DDPS
    levels...). The first entry of the method owns the asset with the plain name."""
    base = base_method(entry, methods_block.get(entry))
    mine = {k: method_params(entry, methods_block.get(entry))[k] for k in keys}
    return next(e for e in entries_of(methods_block, base)
                if {k: method_params(e, methods_block.get(e))[k] for k in keys} == mine)


def tiles_per_side(method: str, params: dict[str, Any], ipc: int | None = None, size: int | None = None) -> int:
    """Tiles per side of a distilled image of ``method`` at ``params`` (overrides of its
    defaults), IPC ``ipc`` and working image size ``size`` (some methods need both)."""
    plugin = registry.get(method)
    try:
        return plugin.tiles(plugin.make_config({**plugin.defaults, **params}), ipc, size)
    except TypeError as err:   # a method that needs the IPC or the size was not given them
        raise ValueError(f"methods.{method}: tiles per image depend on the IPC and the image size; pass both "
                         f"({err})") from err
