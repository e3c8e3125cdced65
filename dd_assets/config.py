"""``params.yaml``: the single source of truth for every output-changing parameter.

The file has one block per asset family (``data``, ``teacher``, ``labels``, ``student``,
``methods.<name>``, ``ipcs``) and a ``profiles`` section whose entries are deep-merged over
those blocks.  The active profile is ``profile:`` in the file, overridden by the environment
variable ``DD_ASSETS_PROFILE``.  DVC stages list the same keys, and each Dagster asset's
``code_version`` is :func:`block_hash` of the blocks it reads plus its module version.

Operational knobs (batch size for inference, device, workers, progress bars) are *not* here:
they live in run config / resources and never change an output.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PARAMS = "DD_ASSETS_PARAMS"
ENV_PROFILE = "DD_ASSETS_PROFILE"
ENV_DATA_ROOT = "DD_ASSETS_DATA_ROOT"



class ParamsError(ValueError):
    """A parameter in params.yaml is missing or invalid; the message names it."""


def params_path() -> Path:
    return Path(os.environ.get(ENV_PARAMS, PROJECT_ROOT / "params.yaml"))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def block_hash(*parts: Any) -> str:
    """Stable 16-hex-digit hash of parameter blocks (and module versions)."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Params:
    """The effective parameters of one profile."""

    profile: str
    raw: dict[str, Any]
    path: Path
    overrides: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # the profile's entries (its extends chain merged)
    #: ``(profile, its own entries)`` from the root of the ``extends`` chain to this profile
    layers: list[tuple[str, dict[str, Any]]] | None = field(default=None, compare=False, repr=False)

    def block(self, dotted: str) -> Any:
        node: Any = self.raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{self.path}: missing parameter block '{dotted}' (profile {self.profile!r})")
            node = node[part]
        return copy.deepcopy(node)

    @property
    def ipcs(self) -> list[int]:
        return list(self.raw["ipcs"])

    @property
    def methods(self) -> list[str]:
        return list(self.raw["methods"].keys())

    @property
    def data_root(self) -> str:
        """Where artifacts go (an fsspec URI or a local path); operational, not hashed."""
        root = os.environ.get(ENV_DATA_ROOT) or str(PROJECT_ROOT / "data" / self.profile)
        return root


# path -> (file bytes, parsed document): every asset materialization re-reads params.yaml (the
# kit's params-current check, ``DDResource.root``); the YAML parse (~60 ms, pure-Python loader) is
# redone only when the bytes differ. Callers get a deep copy, so the cached document is never shared.
_DOC_CACHE: dict[str, tuple[bytes, dict[str, Any]]] = {}


def _read_doc(p: Path) -> dict[str, Any]:
    """The parsed params document at ``p`` (``{}`` when empty), cached by the file's content."""
    data = p.read_bytes()
    hit = _DOC_CACHE.get(str(p))
    if hit is None or hit[0] != data:
        hit = (data, yaml.safe_load(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")) or {})   # as open(p) reads it
        _DOC_CACHE[str(p)] = hit
    return copy.deepcopy(hit[1])


def load_params(path: str | Path | None = None, profile: str | None = None) -> Params:
    p = Path(path) if path else params_path()
    if not p.exists():
        raise ParamsError(f"params file not found: {p} (set {ENV_PARAMS} or run from the repo root)")
    doc = _read_doc(p)
    name = profile or os.environ.get(ENV_PROFILE) or doc.get("profile", "default")
    profiles = doc.get("profiles", {}) or {}
    if name not in profiles:
        raise ParamsError(
            f"{p}: unknown profile {name!r} (from {ENV_PROFILE} or 'profile:'); "
            f"defined: {', '.join(sorted(profiles))}"
        )
    base = {k: v for k, v in doc.items() if k not in ("profile", "profiles")}
    raw, layers, merged = effective(base, profiles, name, p)
    params = Params(profile=name, raw=raw, path=p, overrides=merged, layers=layers)
    validate(params)
    from dd_assets.params_schema import check_document

    for other in sorted(set(profiles) - {name}):  # a typo in any profile is refused, not only in the active one
        other_raw, _, other_merged = effective(base, profiles, other, p)
        check_document(other_raw, str(p), other_merged, other)
    return params


def profile_layers(profiles: dict[str, Any], name: str, where: Path) -> list[tuple[str, dict[str, Any]]]:
    """``[(profile, its own entries), ...]`` from the root of ``name``'s ``extends:`` chain to
    ``name`` itself (``extends`` removed from the entries)."""
    chain: list[tuple[str, dict[str, Any]]] = []
    cur: str | None = name
    while cur is not None:
        if cur not in profiles:
            raise ParamsError(f"{where}: profiles.{chain[-1][0]}.extends = {cur!r}: no such profile; "
                              f"defined: {', '.join(sorted(profiles))}")
        if any(cur == seen for seen, _ in chain):
            raise ParamsError(f"{where}: profiles.{name}: 'extends' goes round in a circle "
                              f"({' -> '.join([n for n, _ in chain] + [cur])})")
        own = dict(profiles[cur] or {})
        parent = own.pop("extends", None)
        if parent is not None and not isinstance(parent, str):
            raise ParamsError(f"{where}: profiles.{cur}.extends must name one profile, got {parent!r}")
        chain.append((cur, own))
        cur = parent
    return chain[::-1]


def effective(base: dict[str, Any], profiles: dict[str, Any], name: str,
              where: Path) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """Profile ``name``'s effective parameters: the base blocks, then each profile of its
    ``extends`` chain deep-merged over them (root first), then ``method_set`` applied.

    ``method_set`` (null: every ``methods`` entry) lists the entries that are built; the others
    stay defined (and validated) but leave the asset graph, the DVC stages and the report.  A
    ``methods`` entry that the profile itself (not a profile it extends) defines or tunes must be
    in the set, else it would silently not be built: refused, naming it.
    It is removed from the returned blocks: what it changes is ``methods`` itself.
    Returns ``(raw, layers, merged)``: the blocks, :func:`profile_layers`, and the entries of
    the whole chain merged (what a message names as ``profiles.<name>.<key>``)."""
    layers = profile_layers(profiles, name, where)
    merged: dict[str, Any] = {}
    for _, own in layers:
        merged = deep_merge(merged, own)
    raw = deep_merge(base, merged)
    chosen = raw.pop("method_set", None)
    if chosen is not None:
        methods = raw.get("methods") or {}
        key = f"profiles.{name}.method_set" if "method_set" in merged else "method_set"
        if not isinstance(chosen, list) or not chosen or not all(isinstance(m, str) for m in chosen):
            raise ParamsError(f"{where}: {key} must be null (every methods entry) or a non-empty list of "
                              f"methods entries, got {chosen!r}")
        unknown = [m for m in chosen if m not in methods]
        if unknown:
            raise ParamsError(f"{where}: {key} names {', '.join(map(repr, unknown))}, not a 'methods' entry "
                              f"(entries: {', '.join(methods)}); add it under methods: or remove it from the set")
        own = [m for m in (layers[-1][1].get("methods") or {}) if m not in chosen]
        if own:   # an entry the profile itself defines or tunes, silently not built: refused
            raise ParamsError(f"{where}: profiles.{name}.methods defines {', '.join(map(repr, own))}, which {key} "
                              f"leaves out; add it to {key} (or set method_set: null for every entry)")
        raw["methods"] = {k: v for k, v in methods.items() if k in set(chosen)}
    return raw, layers, merged


def validate(params: Params) -> None:
    """Check every block against the schema (dd_assets/params_schema.py: unknown keys with the
    nearest valid name, types, ranges), then the values users most often get wrong."""
    from dd_assets.params_schema import check_document

    raw = params.raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{params.path}: expected a mapping of parameter blocks")
    for blk in ("data", "teacher", "labels", "student", "methods", "ipcs"):
        if blk not in raw:
            raise ParamsError(f"{params.path}: missing block '{blk}'")
    ipcs = raw["ipcs"]
    if not isinstance(ipcs, list) or not ipcs:
        raise ParamsError(f"{params.path}: 'ipcs' must be a non-empty list of positive integers")
    for v in ipcs:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ParamsError(f"{params.path}: ipcs contains {v!r}; images per class must be an integer >= 1")
    if len(set(ipcs)) != len(ipcs):
        raise ParamsError(f"{params.path}: 'ipcs' has duplicates: {ipcs}")
    check_document(raw, str(params.path), params.overrides, params.profile)
    for blk in ("teacher", "vit_scorer", "eval.full_data"):
        _check_weights(params, blk)


WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def looks_like_path(value: str) -> bool:
    """A local checkpoint path (vs a timm model name such as ``deit_small_patch16_224``)."""
    return value.startswith(("/", "./", "../", "~")) or value.endswith(WEIGHT_SUFFIXES) or os.sep in value and not value.startswith(("hf-hub:", "timm/"))


def _check_weights(params: Params, blk: str) -> None:
    """``<blk>.weights`` that names a local file must exist (checked before anything runs)."""
    node: Any = params.raw
    for part in blk.split("."):
        node = (node or {}).get(part) if isinstance(node, dict) else None
    weights = (node or {}).get("weights") if isinstance(node, dict) else None
    if not weights or not isinstance(weights, str) or not looks_like_path(weights):
        return
    path = Path(os.path.expanduser(weights))
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    if not path.is_file():
        raise ParamsError(
            f"{params.path}: {blk}.weights = {weights!r}: no such checkpoint file ({path}); "
            f"fix the path, or set {blk}.weights: null to train the model here"
        )
