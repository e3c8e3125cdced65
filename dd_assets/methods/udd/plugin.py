"""Plugin: UDD -- gradient matching from real initial images, under-used regions (the jitter
policy; Sec. 2.2-2.4) upsampled into the matching batch, and the CFC loss (Eq. 7-8, 10). Its
Dagster piece (the distilled asset, mUE) is ``dd_assets/defs/methods/udd.py``.

The entry parameters are :class:`~dd_assets.methods.udd.config.UDDConfig`'s fields (App. A;
IDC where UDD is silent) -- that dataclass is the one home of the defaults -- except
``mue_intervals``, which only the utilization metric reads (not the images)."""

from __future__ import annotations

import dataclasses

from dd_assets.methods.plugin import MethodPlugin, param
from dd_assets.methods.udd.config import UDDConfig

NOT_ENTRY_PARAMS = ("mue_intervals",)
MIN_INT = {"iterations": 1, "inner_steps": 1, "batch_real": 1, "batch_syn_max": 1, "net_batch_size": 1}


def _listed(v):
    return list(v) if isinstance(v, tuple) else v   # YAML gives lists; equal values compare equal


UDDParams = dataclasses.make_dataclass(
    "UDDParams",
    [(f.name, f.type, param(_listed(f.default if f.default is not dataclasses.MISSING else f.default_factory()),
                               min=MIN_INT.get(f.name)))
     for f in dataclasses.fields(UDDConfig) if f.name not in NOT_ENTRY_PARAMS],
    frozen=True,
)
UDDParams.__module__ = __name__
UDDParams.__doc__ = "A ``methods`` entry of UDD: UDDConfig's fields but mue_intervals (see the module doc)."


PLUGIN = MethodPlugin(
    name="udd", config=UDDParams, kind="synthesize", candidates="manifest",
    description="UDD: gradient matching from real initial images, under-used regions (jitter policy) "
                "upsampled into the matching batch, CFC loss",
    version="2",  # 2: lr milestones round halves up (0.9 * 5 iterations = 4.5 -> 5, was 4)
)
