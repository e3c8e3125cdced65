"""A selection of (asset, partition) pairs launched as one Dagster asset backfill.

This is the same object the UI's "Materialize" creates for a partition range: Dagster's
backfill daemon turns it into runs in dependency order (one run per partition, assets of one
partition that are ready together in one run), the run queue admits at most
``run_queue.max_concurrent_runs`` of them (dagster.yaml; the ``gpu`` pool limits GPU steps),
the run launcher starts each, and each run's executor places its steps (in process, a
process per step, or a dask cluster: ``DD_ASSETS_EXECUTOR``). dd_assets holds no scheduler:
``submit`` writes the backfill to the instance, ``daemon`` makes sure a ``dagster-daemon``
serves the instance while the CLI waits (one already running, e.g. under ``dagster dev``,
is used as is), and ``wait`` reports progress and failures until the backfill ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from dd_assets.config import PROJECT_ROOT

BACKFILL_TAG = "dagster/backfill"
PARTITION_TAG = "dagster/partition"
NEEDED_DAEMONS = ("BACKFILL", "QUEUED_RUN_COORDINATOR")


def target_subset(defs: dg.Definitions, keys: Iterable[dg.AssetKey], partitions: dict[str, list[str]] | None = None):
    """The (asset, partition) pairs of ``keys``: every partition of a partitioned asset unless
    ``partitions`` names some (user-string key -> partition keys); unpartitioned assets once."""
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
    from dagster._core.definitions.events import AssetKeyPartitionKey

    graph = defs.resolve_asset_graph()
    pairs = set()
    for key in keys:
        pdef = graph.get(key).partitions_def
        if pdef is None:
            pairs.add(AssetKeyPartitionKey(key, None))
            continue
        chosen = (partitions or {}).get(key.to_user_string()) or pdef.get_partition_keys()
        unknown = sorted(set(chosen) - set(pdef.get_partition_keys()))
        if unknown:
            raise ValueError(f"{key.to_user_string()}: no partition(s) {unknown}; it has {pdef.get_partition_keys()}")
        pairs.update(AssetKeyPartitionKey(key, p) for p in chosen)
    return AssetGraphSubset.from_asset_partition_set(pairs, graph), len(pairs)


def submit(instance: dg.DagsterInstance, defs: dg.Definitions, keys: Iterable[dg.AssetKey],
           partitions: dict[str, list[str]] | None = None, run_config: dict | None = None,
           tags: dict[str, str] | None = None, title: str | None = None,
           description: str = "dd-assets materialize --backfill") -> str:
    """Write an asset backfill of ``keys`` (restricted to ``partitions``) to the instance; returns
    its id. ``run_config`` (the operational knobs of the ``dd`` resource, loggers) goes to every
    run, ``tags`` too."""
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    subset, _ = target_subset(defs, keys, partitions)
    backfill = PartitionBackfill.from_asset_graph_subset(
        backfill_id=make_new_backfill_id(), backfill_timestamp=time.time(), tags=dict(tags or {}),
        dynamic_partitions_store=instance, asset_graph_subset=subset, title=title,
        description=description, run_config=run_config)
    instance.add_backfill(backfill)
    return backfill.backfill_id


def daemon_running(instance: dg.DagsterInstance) -> bool:
    """Whether a daemon with the backfill and run-queue loops heartbeats for this instance."""
    from dagster._daemon.controller import get_daemon_statuses

    # Dagster's own tolerance is 30 min (a UI banner); a daemon beats every 30 s
    statuses = get_daemon_statuses(instance, NEEDED_DAEMONS, ignore_errors=True, heartbeat_tolerance_seconds=75)
    return all(s.healthy for s in statuses.values())


@contextlib.contextmanager
def daemon(instance: dg.DagsterInstance, log_path: Path, note: Callable[[str], None] = lambda m: None) -> Iterator[bool]:
    """A ``dagster-daemon run`` for this instance while the block runs, unless one serves it
    already (yields whether it was started here). Started in its own session so the user's
    Ctrl-C reaches the CLI (which cancels the backfill) and not the daemon that must carry
    the cancel out; stopped with SIGTERM at the end."""
    if daemon_running(instance):
        note("a dagster-daemon already serves this instance; it runs the backfill")
        yield False
        return
    exe = Path(sys.executable).with_name("dagster-daemon")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dagster._daemon"]
    cmd += ["run", "-m", "dd_assets.definitions"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    note(f"started dagster-daemon (pid {proc.pid}, log {log_path})")
    try:
        yield True
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # its last heartbeats would pass as a live daemon for another minute: the next
        # `--backfill` would wait on a daemon that is gone
        instance.wipe_daemon_heartbeats()


@dataclass
class Outcome:
    status: str
    runs: dict[str, str] = field(default_factory=dict)      # run id -> status
    failures: list[str] = field(default_factory=list)       # "<assets>[<partition>] (run): cause"
    missing: list[str] = field(default_factory=list)        # targeted "<asset>[<partition>]" not materialized

    @property
    def success(self) -> bool:
        return self.status == "COMPLETED_SUCCESS" and not self.failures and not self.missing

    def describe(self, backfill_id: str) -> str:
        lines = [f"backfill {backfill_id} ended {self.status}; {len(self.failures)} run(s) failed"
                 + (":" if self.failures else "")]
        lines += [f"  {f}" for f in self.failures]
        if self.missing:
            shown = ", ".join(self.missing[:20]) + (f" (+{len(self.missing) - 20} more)" if len(self.missing) > 20 else "")
            lines.append(f"  not materialized although their runs ended: {shown}")
        return "\n".join(lines)


def _missing(backfill) -> list[str]:
    """Targeted (asset, partition) pairs the backfill did not materialize (e.g. a run that
    'succeeded' without its materialization)."""
    data = backfill.asset_backfill_data
    if data is None:
        return []
    left = data.target_subset - data.materialized_subset
    return sorted(f"{ap.asset_key.to_user_string()}[{ap.partition_key or '-'}]" for ap in left.iterate_asset_partitions())


def _label(run) -> str:
    names = ",".join(sorted(k.to_user_string() for k in (run.asset_selection or ())))
    return f"{names}[{run.tags.get(PARTITION_TAG, '-')}]"


def _cause(instance: dg.DagsterInstance, run_id: str) -> str:
    return failure_cause([e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None])


def failure_cause(events: list) -> str:
    """One line for a failed run of the backfill from its Dagster events: the steps' original
    causes, or, when no step failed, the error of the engine event that stopped the run."""
    from dd_assets.orchestrate import failure_summary

    steps = {e.step_key for e in events if getattr(e, "step_key", None)}
    if any(getattr(e, "is_step_failure", False) for e in events):
        return "; ".join(failure_summary(events, steps))
    # no step failed: the run process could not start the job (e.g. the code location did not
    # load); its engine event holds the error, the run failure only "marked as failed"
    engine = [e.event_specific_data.error for e in events if getattr(e, "event_type_value", None) == "ENGINE_EVENT"
              and getattr(e.event_specific_data, "error", None) is not None]
    if engine:
        from dd_assets.orchestrate import _cause_line

        return _cause_line(engine[-1])
    return "; ".join(failure_summary(events, steps))


DAEMON_CHECK_SECONDS = 90   # > Dagster's heartbeat tolerance: a live daemon always shows in this window
TERMINAL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}


def cancel(instance: dg.DagsterInstance, backfill_id: str) -> None:
    """Ask the daemon to cancel the backfill: it stops launching and terminates its runs."""
    from dagster._core.execution.backfill import BulkActionStatus

    backfill = instance.get_backfill(backfill_id)
    if backfill is not None and backfill.status.value not in TERMINAL:
        instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELING))


def wait(instance: dg.DagsterInstance, backfill_id: str, on_run: Callable[[str, str, str], None] | None = None,
         poll: float = 2.0, stop: Callable[[], bool] = lambda: False, timeout: float | None = None) -> Outcome:
    """Poll until the backfill ends; ``on_run(label, status, run_id)`` hears each run that ends.
    ``stop()`` true: return at once with the backfill's current status (the caller cancels)."""
    seen: dict[str, str] = {}
    failures: list[str] = []
    started = last_alive = time.time()
    while True:
        if time.time() - last_alive > DAEMON_CHECK_SECONDS:
            if not daemon_running(instance):
                raise RuntimeError(
                    f"no dagster-daemon heartbeat for this instance ({instance.root_directory}) for "
                    f"{DAEMON_CHECK_SECONDS} s: backfill {backfill_id} is not being carried out; start one "
                    "(`dd-assets ui` runs one, or `dagster-daemon run -m dd_assets.definitions`) or cancel it in the UI")
            last_alive = time.time()
        backfill = instance.get_backfill(backfill_id)
        if backfill is None:
            raise RuntimeError(f"backfill {backfill_id} is not on the instance {instance.root_directory}")
        for run in instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill_id})):
            status = run.status.value
            if status in RUN_DONE and seen.get(run.run_id) != status:
                seen[run.run_id] = status
                if status == "FAILURE":
                    failures.append(f"{_label(run)} (run {run.run_id[:8]}): {_cause(instance, run.run_id)}")
                if on_run:
                    on_run(_label(run), status, run.run_id)
        if backfill.status.value in TERMINAL and all(
                r.status.value in RUN_DONE for r in instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill_id}))):
            return Outcome(backfill.status.value, seen, failures, _missing(backfill) if backfill.status.value != "CANCELED" else [])
        if stop() or (timeout is not None and time.time() - started > timeout):
            return Outcome(backfill.status.value, seen, failures)
        time.sleep(poll)
