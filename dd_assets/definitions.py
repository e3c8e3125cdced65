"""The only place that builds Dagster ``Definitions`` (for the active params.yaml profile)."""

from __future__ import annotations

import os

import dagster as dg

from dd_assets import families
from dd_assets.cluster_config import k8s_executor
from dd_assets.config import Params, load_params
from dd_assets.dask_executor import dask_executor, scheduler_address
from dd_assets.defs import chain, checks, data_assets, model_assets, report_assets, sensors
from dd_assets.defs.methods import hook
from dd_assets.methods.entries import plugin_of
from dd_assets.defs.partitions import build_partitions
from dd_assets.defs.resources import DDResource


def build_assets(params: Params, parts=None) -> list[dg.AssetsDefinition]:
    parts = parts or build_partitions(params)
    assets = [
        *data_assets.build(params, parts),
        *model_assets.build(params, parts),
        *method_shared_assets(params, parts),
        *chain.build(params, parts),
        *report_assets.build(params, parts),
    ]
    return families.tag_assets(assets, params)   # tag method=<family>: one method's chain in the UI


def method_shared_assets(params: Params, parts) -> list[dg.AssetsDefinition]:
    """The assets of every used method's Dagster piece (scores, models, experts ...), built once."""
    mblock = params.block("methods")
    used = list(dict.fromkeys(plugin_of(e, mblock[e]).name for e in params.methods))
    out: list[dg.AssetsDefinition] = []
    for name in used:
        fn = hook(name, "shared_assets")
        if fn is not None:
            out += fn(params, parts)
    return out


EXECUTORS = {"multiprocess": dg.multiprocess_executor, "in_process": dg.in_process_executor, "dask": dask_executor,
             "k8s": None}   # k8s: dagster_k8s.k8s_job_executor, configured from the assets (dd_assets/cluster_config.py)
# The UI's executor: in_process by default -- a UI run is one (asset, partition) step or a short chain,
# and the multiprocess executor starts a second process per step (another ~15 s of imports and
# definition loading, the run worker already paid for). DD_ASSETS_EXECUTOR=multiprocess brings
# step parallelism inside one run back (e.g. a multi-asset run of unpartitioned assets);
# DD_ASSETS_EXECUTOR=dask sends every step to a dask.distributed cluster (dd_assets/dask_executor.py),
# DD_ASSETS_EXECUTOR=k8s makes every step a Kubernetes Job, GPU-pool steps requesting GPUs.
EXECUTOR_ENV = "DD_ASSETS_EXECUTOR"


def ui_executor() -> str:
    name = os.environ.get(EXECUTOR_ENV, "in_process")
    if name not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={name!r}: use one of {sorted(EXECUTORS)}")
    if name == "dask":
        scheduler_address()   # refused at load, not at the first run, when the scheduler is not named
    return name


def build_definitions(params: Params | None = None, executor: str = "multiprocess") -> dg.Definitions:
    params = params or load_params()
    executors = EXECUTORS
    parts = build_partitions(params)
    assets = build_assets(params, parts)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks.build(params, assets),  # the UI's Checks tab (dd_assets/defs/checks.py)
        resources={"dd": DDResource()},
        sensors=sensors.build(params, assets, parts),   # orphaned runs (kill -9) marked failed under the daemon
        executor=k8s_executor(assets) if executor == "k8s" else executors[executor],
    )


defs = build_definitions(executor=ui_executor())
