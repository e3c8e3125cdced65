"""``dd-assets materialize`` and ``dd-assets stale``: running the asset graph of a profile."""

from __future__ import annotations

import argparse
import fnmatch
import sys

from dd_assets.commands.common import _load


def _select_keys(defs, patterns: list[str] | None, groups: list[str] | None = None):
    import dagster as dg

    graph = defs.resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    if groups:
        known = sorted({graph.get(k).group_name for k in keys})
        unknown = sorted(set(groups) - set(known))
        if unknown:
            raise SystemExit(f"--group {' '.join(unknown)}: no such group; groups: {', '.join(known)}")
        keys = [k for k in keys if graph.get(k).group_name in groups]
    if not patterns:
        return keys
    chosen = [k for k in keys if any(fnmatch.fnmatch(k.to_user_string(), p) for p in patterns)]
    if not chosen:
        names = ", ".join(k.to_user_string() for k in keys)
        raise SystemExit(f"--select {patterns} matches no asset; assets: {names}")
    return [dg.AssetKey(k.path) for k in chosen]


def _defs_and_instance(args: argparse.Namespace):
    params = _load(args.profile)
    import dagster as dg

    from dd_assets.definitions import build_definitions
    from dd_assets.orchestrate import ensure_dagster_home

    ensure_dagster_home(params.profile)
    return params, build_definitions(params), dg.DagsterInstance.get()


def _reap(params, instance) -> str | None:
    """Mark runs whose process died (kill -9, OOM) failed and their MLflow runs KILLED; returns
    the MLflow tracking URI (None for a remote root without one)."""
    from dd_assets.run_guard import reap_orphans
    from dd_assets.storage import DataRoot
    from dd_assets.tracking import tracking_uri

    try:
        uri = tracking_uri(DataRoot(params.data_root))
    except RuntimeError:
        uri = None
    for run_id in reap_orphans(instance, uri):
        print(f"run {run_id}: its process is gone (killed); marked failed, MLflow runs KILLED", file=sys.stderr)
    from dd_assets.run_guard import reap_backfills

    for backfill_id in reap_backfills(instance):
        print(f"backfill {backfill_id}: the materialize carrying it out is gone (killed); marked canceled",
              file=sys.stderr)
    return uri


def _ipc_restriction(defs, keys, ipcs: list[str] | None) -> dict[str, list[str]]:
    if not ipcs:
        return {}
    graph = defs.resolve_asset_graph()
    out: dict[str, list[str]] = {}
    for k in keys:
        pdef = graph.get(k).partitions_def
        if pdef is None or not all(p.isdigit() for p in pdef.get_partition_keys()):
            continue
        unknown = sorted(set(ipcs) - set(pdef.get_partition_keys()))
        if unknown:
            raise SystemExit(f"--ipc {' '.join(unknown)}: not in params.yaml 'ipcs' {pdef.get_partition_keys()}; add it there first")
        out[k.to_user_string()] = list(ipcs)
    return out


def cmd_materialize(args: argparse.Namespace) -> int:
    import dagster as dg

    if args.jobs is not None:
        raise SystemExit("--jobs was removed: `dd-assets materialize --backfill` runs class partitions in parallel "
                         "through Dagster's run queue (at most run_queue.max_concurrent_runs at once, dagster.yaml)")
    params, defs, instance = _defs_and_instance(args)  # a ParamsError: one line, exit 2 (main)
    tracking = _reap(params, instance)
    keys = _select_keys(defs, args.select, args.group)
    restrict = _ipc_restriction(defs, keys, args.ipc)
    if args.stale:
        from dd_assets.staleness import find_stale

        wanted = {k.to_user_string() for k in keys}
        entries = [e for e in find_stale(defs, instance) if e.asset in wanted]
        if not entries:
            print("nothing is stale or missing")
            return 0
        stale: dict[str, list[str]] = {}
        for e in entries:
            stale.setdefault(e.asset, [])
            if e.partition is not None and e.partition in restrict.get(e.asset, [e.partition]):
                stale[e.asset].append(e.partition)
        keys = [dg.AssetKey.from_user_string(a) for a in stale]
        restrict = {a: ps for a, ps in stale.items() if ps}
    knobs = {k: v for k, v in {"device": args.device, "inference_batch_size": args.batch_size,
                               "num_workers": args.workers, "progress": args.progress or None,
                               "student_batch": getattr(args, "student_batch", None)}.items() if v is not None}
    if args.backfill:
        return _materialize_backfill(params, defs, instance, keys, restrict, knobs, args.log_level)
    return _materialize_here(params, defs, instance, keys, restrict, knobs, args.log_level, tracking)


def _materialize_here(params, defs, instance, keys, restrict, knobs, log_level, tracking) -> int:
    """Plain ``materialize``: the same Dagster asset backfill as ``--backfill`` (one object in the
    UI, runs tagged with its id), carried out in this process (dd_assets/local_backfill.py):
    Dagster's backfill iteration decides the runs, each executes here, no run worker process.
    A dagster-daemon already serving the instance (``dagster dev``) would iterate the backfill too:
    then it is left to that daemon, as with ``--backfill``."""
    from dd_assets import backfill, local_backfill
    from dd_assets.definitions import build_definitions, ui_executor
    from dd_assets.orchestrate import Interrupted, RunFailures
    from dd_assets.run_guard import StepLocks

    if backfill.daemon_running(instance):
        return _materialize_backfill(params, defs, instance, keys, restrict, knobs, log_level)
    count, total, submitted = [0, 0], [0], [None]

    def on_submit(backfill_id, pairs):
        submitted[0], total[0] = backfill_id, pairs
        print(f"profile {params.profile}: {len(keys)} assets, {pairs} (asset, partition) pairs as backfill {backfill_id}, "
              f"run in this process (data root {params.data_root})", flush=True)

    def on_run(run):
        names = sorted(k.to_user_string() for k in (run.asset_selection or ()))
        count[0] += 1
        count[1] += len(names)
        print(f"[{count[1]}/{total[0]}] {','.join(names)} [{run.tags.get(backfill.PARTITION_TAG) or '-'}] "
              f"(run {count[0]})", flush=True)

    try:
        # the runs' executor is the UI's (in_process unless DD_ASSETS_EXECUTOR says otherwise)
        local_backfill.materialize(
            build_definitions(params, executor=ui_executor()), keys, instance.root_directory, restrict or None,
            knobs, log_level, title=f"dd-assets materialize ({params.profile})", on_submit=on_submit, on_run=on_run,
            lock_dir=StepLocks.for_root(params.data_root, instance.root_directory).dir,
            on_wait=lambda label, who: print(f"  {label}: another materialize ({who}) is computing it; waiting",
                                             flush=True),
            tracking_uri=tracking)
    except Interrupted as err:
        print(f"materialize: {err}; backfill {submitted[0]} canceled", file=sys.stderr)
        return 130
    except RunFailures as err:
        print(f"materialize: backfill {submitted[0]}: {err}", file=sys.stderr)
        return 1
    print(f"done ({count[0]} runs)")
    return 0


def _materialize_backfill(params, defs, instance, keys, restrict, knobs, log_level) -> int:
    """``materialize --backfill``: one Dagster asset backfill, carried out by the daemon's run
    queue and launcher (dd_assets/backfill.py); this process only submits, waits and reports.
    Ctrl-C cancels the backfill (the daemon terminates its runs; finished ones are kept)."""
    from pathlib import Path

    from dd_assets import backfill
    from dd_assets.orchestrate import _run_config
    from dd_assets.run_guard import InterruptFlag

    _, pairs = backfill.target_subset(defs, keys, restrict or None)
    import os

    home = Path(os.environ["DAGSTER_HOME"])   # set by ensure_dagster_home
    log = home / "dd_assets_logs" / "daemon.log"   # not logs/: Dagster moves that folder away (telemetry queue)
    with backfill.daemon(instance, log, note=lambda m: print(f"  {m}", flush=True)):
        backfill_id = backfill.submit(instance, defs, keys, restrict or None, _run_config(knobs, log_level),
                                      tags={"dd_assets/launched_by": "cli"},
                                      title=f"dd-assets materialize ({params.profile})")
        print(f"profile {params.profile}: backfill {backfill_id} of {len(keys)} assets, {pairs} (asset, partition) "
              f"pairs (data root {params.data_root}); progress also in the UI (Overview > Backfills)", flush=True)
        count = [0]

        def on_run(label, status, run_id):
            count[0] += 1
            print(f"[run {count[0]}] {label} {status} ({run_id[:8]})", flush=True)

        with InterruptFlag() as flag:
            outcome = backfill.wait(instance, backfill_id, on_run, stop=lambda: flag.requested)
            if flag.requested:
                backfill.cancel(instance, backfill_id)
                print(f"materialize: interrupted; backfill {backfill_id} canceled (its runs are terminated by the "
                      "daemon; finished runs are kept, `dd-assets materialize --stale` continues)", file=sys.stderr)
                backfill.wait(instance, backfill_id, on_run, timeout=120)
                return 130
    if not outcome.success:
        print("materialize: " + outcome.describe(backfill_id), file=sys.stderr)
        return 1
    print(f"done ({len(outcome.runs)} runs)")
    return 0


def cmd_stale(args: argparse.Namespace) -> int:
    from dd_assets.staleness import find_stale

    _, defs, instance = _defs_and_instance(args)
    entries = find_stale(defs, instance)
    if not entries:
        print("everything is up to date")
        return 0
    for e in entries:
        part = f"[{e.partition}]" if e.partition else ""
        print(f"{e.status:8s} {e.asset}{part}" + (f"  <- {'; '.join(e.causes)}" if e.causes else ""))
    print(f"{len(entries)} stale or missing; `dd-assets materialize --stale` runs exactly these")
    return 0
