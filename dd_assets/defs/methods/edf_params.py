"""EDF's parameters -> configs (no Dagster): params block ``experts`` -> :class:`ExpertConfig`,
a ``methods`` entry at one IPC -> :class:`EDFConfig`, and the load-time check that every
entry's config fits the experts. The piece is :mod:`dd_assets.defs.methods.edf`; the pure
conversions live in :mod:`dd_assets.methods.edf.params` (``benchmarks/gpu_table.py`` calls them too)."""

from __future__ import annotations

from dd_assets.config import Params
from dd_assets.methods.edf.config import check_config
from dd_assets.methods.edf.params import (  # noqa: F401  (re-exported: the pure part lives in methods.edf.params)
    BOOL_KEYS,
    IPC_KEYS,
    LOCAL_KEYS,
    at_ipc,
    entry_config,
    expert_config,
)
from dd_assets.methods.entries import entries_of, method_params


def edf_entries(params: Params) -> list[str]:
    """The ``methods`` entries (in params order) that instantiate EDF."""
    return entries_of(params.block("methods"), "edf")


def check_entry(params: Params, entry: str) -> None:
    """Every IPC's config is valid and fits the experts (start window vs ``experts.epochs``)."""
    _, k, e = expert_config(params.block("experts"))
    mp = method_params(entry, params.block("methods")[entry])
    for ipc in params.ipcs:
        cfg = entry_config(entry, mp, ipc)
        try:
            check_config(cfg, k, e)
        except ValueError as err:
            raise ValueError(f"methods.{entry} at IPC {ipc}: {err} "
                             f"(experts.epochs = {e}, experts.num_experts = {k}; a value may be a mapping "
                             "{ipc: value})") from err
