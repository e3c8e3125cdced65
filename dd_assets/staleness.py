"""Stale or missing (asset, partition) pairs against the current params.yaml, using
Dagster's own stale-status resolver (the same one behind the UI's "Unsynced" badge).

An asset partition is *missing* when it was never materialized, *stale* when its code
version (params block hash) changed, or an upstream partition's data version changed since
it was materialized.  Dagster skips data-version propagation across dependencies of
>= 100 partitions (its SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD); at that scale
rely on code versions and the missing check.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg


@dataclass(frozen=True)
class StaleEntry:
    asset: str
    partition: str | None
    status: str  # "missing" | "stale"
    causes: tuple[str, ...]


def _graph(defs):
    """An asset graph from ``Definitions`` (CLI) or a repository / asset graph (a sensor's context)."""
    if isinstance(defs, dg.Definitions):
        return defs.resolve_asset_graph()
    return getattr(defs, "asset_graph", defs)


def _resolver(defs, instance: dg.DagsterInstance):
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    graph = _graph(defs)
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    return graph, CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)


def find_stale(defs, instance: dg.DagsterInstance) -> list[StaleEntry]:
    """Every stale or missing (asset, partition) and everything downstream of one; ``defs``:
    ``Definitions``, a ``RepositoryDefinition`` or an asset graph."""
    from dagster._core.definitions.data_version import StaleStatus

    graph, resolver = _resolver(defs, instance)
    out: list[StaleEntry] = []
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        pdef = graph.get(key).partitions_def
        for part in pdef.get_partition_keys() if pdef else [None]:
            status = resolver.get_status(key, part)
            if status == StaleStatus.FRESH:
                continue
            causes = ()
            if status == StaleStatus.STALE:
                causes = tuple(
                    f"{c.category.name.lower()}: {c.reason}"
                    + (f" ({c.dependency.asset_key.to_user_string()}"
                       + (f"[{c.dependency.partition_key}]" if c.dependency.partition_key else "") + ")"
                       if c.dependency else "")
                    for c in resolver.get_stale_root_causes(key, part)
                )
            out.append(StaleEntry(key.to_user_string(), part, status.name.lower(), causes))
    return _with_downstream(graph, out)


def _with_downstream(graph, direct: list[StaleEntry]) -> list[StaleEntry]:
    """Add everything downstream of a stale/missing partition (it will re-run too).

    Dagster itself only flags a downstream partition once the upstream one has been
    re-materialized with a new data version; a user asking "what will re-run" wants the
    whole chain now.  Same partitioning maps one to one; anything else (class -> IPC via
    AllPartitionMapping, partitioned -> unpartitioned) maps to every partition.
    """
    found = {(e.asset, e.partition): e for e in direct}
    queue = list(direct)
    while queue:
        e = queue.pop()
        key = dg.AssetKey.from_user_string(e.asset)
        parent_pdef = graph.get(key).partitions_def
        for child in graph.get(key).child_keys:
            cpdef = graph.get(child).partitions_def
            if cpdef is None:
                parts = [None]
            elif cpdef == parent_pdef:
                parts = [e.partition]
            else:
                parts = cpdef.get_partition_keys()
            for part in parts:
                ck = (child.to_user_string(), part)
                if ck not in found:
                    label = e.asset + (f"[{e.partition}]" if e.partition else "")
                    entry = StaleEntry(ck[0], part, "stale", (f"upstream: {label} is {e.status}",))
                    found[ck] = entry
                    queue.append(entry)
    return sorted(found.values(), key=lambda x: (x.asset, x.partition or ""))


def ready(graph, entries: list[StaleEntry]) -> list[StaleEntry]:
    """The entries none of whose parents is itself stale or missing (in a partition it reads):
    the next wave that can run now; the rest wait for it."""
    graph = _graph(graph)
    pending: dict[str, set[str | None]] = {}
    for e in entries:
        pending.setdefault(e.asset, set()).add(e.partition)
    out = []
    for e in entries:
        node = graph.get(dg.AssetKey.from_user_string(e.asset))
        blocked = False
        for parent in node.parent_keys:
            parts = pending.get(parent.to_user_string())
            if not parts:
                continue
            same = graph.get(parent).partitions_def == node.partitions_def and node.partitions_def is not None
            if not same or e.partition in parts:
                blocked = True
                break
        if not blocked:
            out.append(e)
    return out
