"""Materializing a selection of assets from the command line with Dagster's own executor.

Dagster runs one partition per run; a selection that spans class-, IPC- and unpartitioned
assets is therefore launched as a sequence of runs in dependency order, each through
``dagster.materialize`` on the persistent instance (``DAGSTER_HOME``), so that the UI,
staleness and lineage see exactly what the CLI did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from dd_assets.config import PROJECT_ROOT


def ensure_dagster_home() -> Path:
    """Use ``$DAGSTER_HOME`` or ``<repo>/.dagster_home`` (seeded with the repo's dagster.yaml)."""
    home = Path(os.environ.get("DAGSTER_HOME") or PROJECT_ROOT / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    src = PROJECT_ROOT / "dagster.yaml"
    if not cfg.exists() and src.exists():
        cfg.write_text(src.read_text())
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@dataclass
class Step:
    keys: list[dg.AssetKey]
    partition: str | None


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)


def plan(defs: dg.Definitions, selection: Iterable[dg.AssetKey], partitions: dict[str, list[str]] | None = None) -> Plan:
    """Waves of same-partitioning assets in dependency order, one step per partition.

    ``partitions`` optionally restricts the partitions per asset key (user string); assets
    absent from it get all their partitions.
    """
    graph = defs.resolve_asset_graph()
    selected = set(selection)
    pending = set(selected)
    done: set[dg.AssetKey] = set()
    out = Plan()
    while pending:
        ready = [k for k in pending if not (graph.get(k).parent_keys & (pending - {k}))]
        if not ready:
            raise RuntimeError(f"cycle among {sorted(k.to_user_string() for k in pending)}")
        by_part: dict[object, list[dg.AssetKey]] = {}
        for k in ready:
            by_part.setdefault(graph.get(k).partitions_def, []).append(k)
        pdef, keys = max(by_part.items(), key=lambda kv: (len(kv[1]), kv[1][0].to_user_string()))
        keys = sorted(keys, key=lambda k: k.to_user_string())
        if pdef is None:
            out.steps.append(Step(keys, None))
        else:
            allowed = None
            if partitions:
                sets = [set(partitions[k.to_user_string()]) for k in keys if k.to_user_string() in partitions]
                allowed = set.union(*sets) if sets else None
            for part in pdef.get_partition_keys():
                if allowed is None or part in allowed:
                    step_keys = [k for k in keys if not partitions or part in partitions.get(k.to_user_string(), [part])]
                    if step_keys:
                        out.steps.append(Step(step_keys, part))
        pending -= set(keys)
        done |= set(keys)
    return out


def execute(
    defs: dg.Definitions,
    the_plan: Plan,
    instance: dg.DagsterInstance,
    on_step: Callable[[int, Step], None] | None = None,
    tags: dict[str, str] | None = None,
    resource_config: dict | None = None,
    log_level: str = "INFO",
) -> list[dg.ExecuteInProcessResult]:
    """Run each step as one Dagster run; stops at the first failure (raising it).

    ``resource_config`` sets the operational knobs of the ``dd`` resource (device,
    batch size, workers, progress) as run config, so they never touch code versions.
    """
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if resource_config:
        run_config["resources"] = {"dd": {"config": resource_config}}
    assets = list(defs.assets or [])
    resources = defs.resources or {}
    results = []
    for i, step in enumerate(the_plan.steps):
        if on_step:
            on_step(i, step)
        results.append(
            dg.materialize(
                assets,
                selection=step.keys,
                partition_key=step.partition,
                instance=instance,
                resources=resources,
                run_config=run_config,
                tags={"dd_assets/launched_by": "cli", **(tags or {})},
            )
        )
    return results
