"""EDF's parameters -> configs, pure (no Dagster, no params schema): params block ``experts`` ->
:class:`ExpertConfig`, a ``methods`` entry at one IPC -> :class:`EDFConfig`.  Used by the piece
(:mod:`dd_assets.defs.methods.edf_params`, which adds the load-time checks) and by
``benchmarks/gpu_table.py``."""

from __future__ import annotations

from dd_assets.core.dsa import DSAConfig
from dd_assets.methods.edf.config import PUBLIC_CONFIG, TABLE8, EDFConfig, edf_config
from dd_assets.methods.edf.experts import ExpertConfig

#: Entry parameters whose null means "App. B Table 8 / the public config for this IPC".
IPC_KEYS = tuple(TABLE8[1]) + tuple(PUBLIC_CONFIG[1])
#: Entry parameters that are not EDFConfig / MatchConfig fields.
LOCAL_KEYS = ("augment", "table8_subset", "seed")
BOOL_KEYS = ("use_cpd", "use_dae", "soft_labels", "sequential")


def _augment(value: object, where: str) -> DSAConfig | None:
    if value not in ("dsa", "none"):
        raise ValueError(f"{where}.augment must be 'dsa' or 'none', got {value!r}")
    return DSAConfig() if value == "dsa" else None


def expert_config(ex: dict) -> tuple[ExpertConfig, int, int]:
    """``(ExpertConfig, K, E)`` of params block ``experts``; bad values name ``experts.<key>``."""
    need = ("arch", "num_experts", "epochs", "lr", "momentum", "weight_decay", "batch_size", "augment", "seed")
    missing = [k for k in need if k not in ex]
    if missing:
        raise ValueError(f"experts: missing {', '.join('experts.' + k for k in missing)}")
    for key in ("num_experts", "epochs", "batch_size"):
        if isinstance(ex[key], bool) or not isinstance(ex[key], int) or ex[key] < 1:
            raise ValueError(f"experts.{key} must be an integer >= 1, got {ex[key]!r}")
    cfg = ExpertConfig(arch=str(ex["arch"]), arch_kwargs=dict(ex.get("arch_kwargs") or {}), lr=float(ex["lr"]),
                       momentum=float(ex["momentum"]), weight_decay=float(ex["weight_decay"]),
                       batch_size=int(ex["batch_size"]), augment=_augment(ex["augment"], "experts"), seed=int(ex["seed"]))
    return cfg, int(ex["num_experts"]), int(ex["epochs"])


def at_ipc(value: object, ipc: int) -> object:
    """A parameter value for one IPC: ``{ipc: value, ...}`` mappings pick theirs (absent: null)."""
    if isinstance(value, dict):
        return {int(k): v for k, v in value.items()}.get(int(ipc))
    return value


def entry_config(entry: str, mp: dict, ipc: int) -> EDFConfig:
    """:class:`EDFConfig` of ``methods.<entry>`` at ``ipc``: :func:`edf_config` (App. B Table 8 +
    the authors' public configs) with every non-null entry parameter as an override."""
    where = f"methods.{entry}"
    over: dict = {}
    for key, value in mp.items():
        if key in LOCAL_KEYS:
            continue
        value = at_ipc(value, ipc)
        if key in BOOL_KEYS and not isinstance(value, bool):
            raise ValueError(f"{where}.{key} must be true or false, got {value!r}")
        if value is None and key in IPC_KEYS:
            continue  # Table 8 / public config for this IPC
        over[key] = value
    over["augment"] = _augment(mp["augment"], where)
    over["seed"] = int(mp["seed"])
    try:
        return edf_config(int(ipc), dataset=mp["table8_subset"], **over)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err
