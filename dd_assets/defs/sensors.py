"""Sensors the Dagster daemon (``dagster dev`` runs one) evaluates.

``stale_sensor`` (off by default; Automation > stale_sensor): the UI's view of exactly what
``dd-assets stale`` lists.  "Preview tick result" shows the runs it would request -- every stale or
missing (asset, partition) whose upstream is current, with its cause -- and its toggle (start) re-runs
them all, wave by wave as upstream partitions finish (one run per partition, like the CLI).
Dagster's own "Unsynced" badge and "Materialize unsynced" ignore partitions (issue 17); this
uses the same resolver as the CLI (:func:`dd_assets.staleness.find_stale`).  A run key per
(asset, partition, code version, last materialization, causes) keeps a partition from being
requested twice; a failed run is not retried until one of those changes (re-run it by hand).

``orphaned_runs_sensor``: every minute, runs the instance believes in flight whose process is
gone (``kill -9``, out of memory) are marked failed -- freeing their slot in the run queue --
and their MLflow runs KILLED (:func:`dd_assets.run_guard.reap_orphans`).  Dagster's run
monitoring cannot do this for the default run launcher (no worker health check).
"""

from __future__ import annotations

import dagster as dg

from dd_assets.config import Params


def build(params: Params, assets: list[dg.AssetsDefinition], parts=None) -> list[dg.SensorDefinition]:
    """The project's sensors; ``parts`` (:class:`~dd_assets.defs.partitions.Partitions`) names
    the stale sensor's jobs (one per partitioning: Dagster runs one partitioning per job)."""
    names = {"class": parts.class_def, "ipc": parts.ipc_def} if parts is not None else {}
    data_root = params.data_root

    @dg.sensor(name="orphaned_runs_sensor", minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Marks runs whose process died (kill -9, OOM) failed and their MLflow runs KILLED.")
    def orphaned_runs_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        from dd_assets.run_guard import reap_orphans
        from dd_assets.storage import DataRoot
        from dd_assets.tracking import tracking_uri

        try:
            uri = tracking_uri(DataRoot(data_root))
        except RuntimeError:
            uri = None
        reaped = reap_orphans(context.instance, uri)
        return dg.SkipReason(f"marked {len(reaped)} orphaned run(s) failed: {', '.join(reaped)}" if reaped
                             else "no orphaned runs")

    return [orphaned_runs_sensor, stale_sensor(assets, names)]


def stale_jobs(assets: list[dg.AssetsDefinition], names: dict[str, dg.PartitionsDefinition] | None = None):
    """One asset job per partitioning of ``assets`` (``stale_runs`` for the unpartitioned ones,
    ``stale_runs_by_<name>`` for a partitioning named in ``names``, else ``_<i>``) and a map
    asset key -> its job's name."""
    groups: list[tuple[dg.PartitionsDefinition | None, list[dg.AssetKey]]] = []
    for a in assets:
        for group in groups:
            if group[0] == a.partitions_def:
                group[1].extend(a.keys)
                break
        else:
            groups.append((a.partitions_def, list(a.keys)))
    jobs, job_of = [], {}
    for i, (pdef, keys) in enumerate(groups):
        label = next((n for n, d in (names or {}).items() if d == pdef), str(i))
        name = "stale_runs" if pdef is None else f"stale_runs_by_{label}"
        jobs.append(dg.define_asset_job(name, selection=dg.AssetSelection.assets(*keys), partitions_def=pdef))
        job_of.update({k: name for k in keys})
    return jobs, job_of


def stale_sensor(assets: list[dg.AssetsDefinition], names: dict[str, dg.PartitionsDefinition] | None = None
                 ) -> dg.SensorDefinition:
    """The stale sensor over ``assets`` (every asset of the repository)."""
    jobs, job_of = stale_jobs(assets, names)

    @dg.sensor(name="stale_sensor", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED,
               jobs=jobs,
               description="Requests a run for every stale or missing asset partition whose upstream is current "
                           "(exactly what `dd-assets stale` lists); 'Preview tick result' lists them.")
    def _stale_sensor(context: dg.SensorEvaluationContext):
        return stale_run_requests(context.repository_def, context.instance, job_of)

    return _stale_sensor


def stale_run_requests(repo_or_graph, instance: dg.DagsterInstance, job_of: dict[dg.AssetKey, str] | None = None
                       ) -> list[dg.RunRequest] | dg.SkipReason:
    """One ``RunRequest`` per stale/missing (asset, partition) that can run now."""
    import hashlib

    from dd_assets.staleness import find_stale, ready

    graph = getattr(repo_or_graph, "asset_graph", repo_or_graph)
    entries = find_stale(graph, instance)
    if not entries:
        return dg.SkipReason("everything is up to date")
    now = ready(graph, entries)
    requests = []
    for e in now:
        key = dg.AssetKey.from_user_string(e.asset)
        flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[e.partition] if e.partition else None)
        recs = instance.fetch_materializations(flt, limit=1).records
        last = recs[0].storage_id if recs else 0
        label = e.asset + (f"[{e.partition}]" if e.partition else "")
        raw = f"{label}|{graph.get(key).code_version}|{last}|{';'.join(e.causes)}"
        requests.append(dg.RunRequest(
            run_key=f"{label}:{hashlib.sha1(raw.encode()).hexdigest()[:12]}", asset_selection=[key],
            job_name=(job_of or {}).get(key),
            partition_key=e.partition,
            tags={"dd_assets/launched_by": "stale_sensor", "dd_assets/stale": f"{e.status}: {'; '.join(e.causes)}"[:200]}))
    return requests or dg.SkipReason(f"{len(entries)} stale or missing, all waiting for upstream runs")
