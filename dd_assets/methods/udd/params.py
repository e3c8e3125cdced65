"""UDD's ``methods`` entry -> :class:`UDDConfig`, pure (no Dagster): :func:`udd_config` with the
type and range checks that name ``methods.<entry>.<key>``.  Used by the piece
(:mod:`dd_assets.defs.methods.udd`) and by ``benchmarks/gpu_table.py``."""

from __future__ import annotations

import dataclasses

from dd_assets.methods import registry
from dd_assets.methods.udd.config import UDDConfig

#: how each methods-block key is read into :class:`UDDConfig` (every other key: float or str by its default)
BOOL_KEYS = ("clamp", "cfc", "cfc_include_positive")
INT_KEYS = ("iterations", "inner_steps", "batch_real", "net_batch_size", "net_steps", "top_p", "jitter_copies", "seed")
FLOAT_LIST_KEYS = ("lr_milestones", "window_fractions")


def _as_int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value)


def udd_config(entry: str, mp: dict) -> UDDConfig:
    """:class:`UDDConfig` of a ``methods`` entry (plugin defaults = App. A; see docs/udd.md).

    Raises:
        ValueError naming ``methods.<entry>.<key>`` for a value of the wrong type or out of range.
    """
    where = f"methods.{entry}"
    fields = {f.name: f for f in dataclasses.fields(UDDConfig)}
    kwargs = {}
    for key, value in mp.items():
        if key not in fields:
            raise ValueError(f"{where}.{key} is not a UDD parameter; allowed: {', '.join(sorted(registry.get('udd').defaults))}")
        try:
            if key in BOOL_KEYS:
                if not isinstance(value, bool):
                    raise ValueError(f"must be true or false, got {value!r}")
            elif key in INT_KEYS:
                value = _as_int(value)
            elif key == "batch_syn_max":
                value = None if value is None else _as_int(value)
            elif key in FLOAT_LIST_KEYS:
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"must be a list of numbers, got {value!r}")
                value = tuple(float(v) for v in value)
            elif key == "arch_kwargs":
                if not isinstance(value, dict):
                    raise ValueError(f"must be a mapping, got {value!r}")
            elif isinstance(fields[key].default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"must be a number, got {value!r}")
                value = float(value)
            elif not isinstance(value, str):
                raise ValueError(f"must be a string, got {value!r}")
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}.{key} {err}") from err
        kwargs[key] = value
    cfg = UDDConfig(**kwargs)
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(str(err).replace("UDDConfig.", f"{where}.")) from err
    return cfg
