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


def ensure_dagster_home(profile: str) -> Path:
    """Use ``$DAGSTER_HOME`` or ``<repo>/.dagster_home/<profile>`` (seeded with the repo's
    dagster.yaml).  One instance per profile: asset keys are the same in every profile, so
    their materialization histories (and staleness) must not mix."""
    home = Path(os.environ.get("DAGSTER_HOME") or PROJECT_ROOT / ".dagster_home" / profile).resolve()
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
    keys_id: str = ""  # the wave's asset set (filled by ``plan``)


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
        wave_id = ",".join(k.to_user_string() for k in keys)
        if pdef is None:
            out.steps.append(Step(keys, None, wave_id))
        else:
            allowed = None
            if partitions:
                sets = [set(partitions[k.to_user_string()]) for k in keys if k.to_user_string() in partitions]
                allowed = set.union(*sets) if sets else None
            for part in pdef.get_partition_keys():
                if allowed is None or part in allowed:
                    step_keys = [k for k in keys if not partitions or part in partitions.get(k.to_user_string(), [part])]
                    if step_keys:
                        out.steps.append(Step(step_keys, part, wave_id))
        pending -= set(keys)
        done |= set(keys)
    return out


def _run_config(resource_config: dict | None, log_level: str) -> dict:
    run_config: dict = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if resource_config:
        run_config["resources"] = {"dd": {"config": resource_config}}
    return run_config


@dataclass
class StepFailure:
    step: Step
    messages: list[str]

    def __str__(self) -> str:
        names = ",".join(k.to_user_string() for k in self.step.keys)
        return f"{names}[{self.step.partition or '-'}]: " + "; ".join(self.messages)


class Interrupted(RuntimeError):
    """SIGINT (Ctrl-C): nothing more was launched; finished runs are kept, the interrupted one
    (if any) is marked canceled and its MLflow runs KILLED."""

    def __init__(self, finished: int, total: int, run_id: str | None):
        self.finished, self.total, self.run_id = finished, total, run_id
        where = f"; run {run_id} canceled" if run_id else ""
        super().__init__(f"interrupted after {finished} of {total} runs{where}; finished runs are kept, "
                         "`dd-assets materialize --stale` continues")


class RunFailures(RuntimeError):
    """Some runs failed; the rest of the plan ran (downstream of failures was skipped)."""

    def __init__(self, failures: list[StepFailure], skipped: list[str]):
        self.failures, self.skipped = failures, skipped
        lines = [f"{len(failures)} run(s) failed:"] + [f"  {f}" for f in failures]
        if skipped:
            lines.append(f"skipped downstream of a failure: {', '.join(skipped)}")
        super().__init__("\n".join(lines))


def _first_line(err) -> str:
    """``Class: first line`` of a serialized error, without the module path of the class."""
    lines = (getattr(err, "message", None) or "").strip().splitlines()
    line = lines[0].strip() if lines else ""
    cls = getattr(err, "cls_name", None) or ""
    head, sep, rest = line.partition(": ")
    if sep and "." in head and " " not in head:  # "dagster._core....Failure: msg" -> "Failure: msg"
        line = f"{head.rsplit('.', 1)[-1]}: {rest}"
    return line or cls or "error"


def _cause_line(err) -> str:
    """The user-code exception behind a Dagster error: Dagster wraps it (``Error occurred while
    executing op``) and keeps it as ``cause``; a deeper root cause is appended after ``<-``."""
    if err is None:
        return "error"
    user = err.cause if getattr(err, "cause", None) is not None else err
    line = _first_line(user)
    root = user
    while getattr(root, "cause", None) is not None:
        root = root.cause
    if root is not user:
        line += f" <- {_first_line(root)}"
    return line


def failure_summary(events: Iterable, step_keys: Iterable[str] = ()) -> list[str]:
    """One line per failed step of a run's events: the original cause, not Dagster's wrapper.

    ``dg.Failure`` raised by an asset carries its description in
    ``step_failure_data.user_failure_data``; any other exception is ``error.cause``.  The
    asset (op) is named when the run held more than one; a run that failed outside any step
    (resources, config) reports the run-failure event's error.
    """
    many = len(set(step_keys)) > 1
    out: list[str] = []
    run_errors: list[str] = []
    for ev in events:
        if getattr(ev, "is_step_failure", False) and getattr(ev, "step_failure_data", None) is not None:
            data = ev.step_failure_data
            ufd = getattr(data, "user_failure_data", None)
            desc = (getattr(ufd, "description", None) or "").strip()
            msg = desc.splitlines()[0] if desc else _cause_line(data.error)
            out.append(f"{ev.step_key}: {msg}" if many and getattr(ev, "step_key", None) else msg)
        elif getattr(ev, "is_run_failure", False):
            err = getattr(getattr(ev, "event_specific_data", None), "error", None)
            if err is not None:
                run_errors.append(_cause_line(err))
            elif getattr(ev, "message", None):
                run_errors.append(str(ev.message).strip().splitlines()[0])
    return out or run_errors or ["run failed (see the Dagster UI)"]


def _failure_messages(res: dg.ExecuteInProcessResult, step: Step | None = None) -> list[str]:
    return failure_summary(res.all_events, [k.to_user_string() for k in step.keys] if step else ())


def _ancestors(defs: dg.Definitions, key: dg.AssetKey) -> set[dg.AssetKey]:
    graph = defs.resolve_asset_graph()
    seen: set[dg.AssetKey] = set()
    stack = [key]
    while stack:
        for parent in graph.get(stack.pop()).parent_keys:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _materialized_since(instance: dg.DagsterInstance, keys: Iterable[dg.AssetKey], partition: str | None,
                        since: float) -> bool:
    """Whether every asset of a step has a materialization of ``partition`` newer than ``since``
    (another process ran the step while this one waited for its lock)."""
    for key in keys:
        flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None)
        recs = instance.fetch_materializations(flt, limit=1).records
        if not recs or recs[0].timestamp < since:
            return False
    return True


def _cancel(instance: dg.DagsterInstance, run_id: str | None, tracking_uri: str | None) -> None:
    """An interrupted run: CANCELED on the instance (Dagster recorded it as a failure) and its
    MLflow runs KILLED (those still RUNNING)."""
    from dd_assets.run_guard import kill_mlflow_runs

    if not run_id:
        return
    run = instance.get_run_by_id(run_id)
    if run is not None and run.status != dg.DagsterRunStatus.CANCELED:
        instance.report_run_canceled(run, message="dd_assets: interrupted by SIGINT (Ctrl-C)")
    if tracking_uri:
        kill_mlflow_runs(tracking_uri, [run_id])


def execute(
    defs: dg.Definitions,
    the_plan: Plan,
    instance: dg.DagsterInstance,
    on_step: Callable[[int, int, Step], None] | None = None,
    tags: dict[str, str] | None = None,
    resource_config: dict | None = None,
    log_level: str = "INFO",
    lock_dir: str | Path | None = None,
    on_note: Callable[[str], None] | None = None,
    tracking_uri: str | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Run each step as one Dagster run.

    A failed run does not stop the others: steps of other partitions and assets still run,
    steps downstream of a failed asset are skipped, and :class:`RunFailures` is raised at
    the end with each failure's message (nothing that succeeded is lost).

    ``resource_config`` sets the operational knobs of the ``dd`` resource (device,
    batch size, workers, progress) as run config, so they never touch code versions.
    Parallel and distributed execution is Dagster's, not this loop's: ``dd-assets materialize
    --backfill`` (dd_assets/backfill.py) hands the same selection to the daemon's run queue.

    ``lock_dir`` (:class:`~dd_assets.run_guard.StepLocks`): each step holds its lock while it
    runs; a step another process was running is skipped when that process materialized it
    (``on_note`` hears about waits and skips).  SIGINT: nothing more is launched, the
    interrupted run is marked canceled (MLflow: KILLED, via ``tracking_uri``) and
    :class:`Interrupted` is raised.
    """
    import time
    from contextlib import nullcontext

    from dd_assets.run_guard import InterruptFlag, StepLocks, interrupted, process_tags

    assets = [*(defs.assets or []), *(defs.asset_checks or [])]   # the checks of the selected assets run too
    resources = defs.resources or {}
    run_config = _run_config(resource_config, log_level)
    all_tags = {"dd_assets/launched_by": "cli", **(tags or {}), **process_tags()}   # orphans are recognizable
    locks = StepLocks(lock_dir) if lock_dir else None
    note = on_note or (lambda msg: None)
    started = time.time()
    results = []
    failures: list[StepFailure] = []
    failed_keys: set[dg.AssetKey] = set()
    skipped: list[str] = []
    index = 0
    total = len(the_plan.steps)
    with InterruptFlag() as flag:
        for step in the_plan.steps:
            if flag.requested:
                raise Interrupted(index, total, None)
            if on_step:
                on_step(index, total, step)
            if flag.requested:
                raise Interrupted(index, total, None)
            index += 1
            blocked = [k for k in step.keys if _ancestors(defs, k) & failed_keys]
            if blocked:
                skipped.append(f"{','.join(k.to_user_string() for k in step.keys)}[{step.partition or '-'}]")
                continue
            names = [k.to_user_string() for k in step.keys]
            label = f"{','.join(names)}[{step.partition or '-'}]"
            guard = locks.hold(names, step.partition, lambda who, label=label: note(
                f"{label}: another materialize ({who}) is running this step; waiting")) if locks else nullcontext(False)
            with guard as waited:
                if waited and _materialized_since(instance, step.keys, step.partition, started):
                    note(f"{label}: materialized by the other process meanwhile; skipped")
                    continue
                res = dg.materialize(
                    assets,
                    selection=step.keys,
                    partition_key=step.partition,
                    instance=instance,
                    resources=resources,
                    run_config=run_config,
                    tags=all_tags,
                    raise_on_error=False,
                )
            results.append(res)
            if not res.success and (flag.requested or interrupted(res.all_events)):
                _cancel(instance, res.run_id, tracking_uri)
                raise Interrupted(index - 1, total, res.run_id)
            if flag.requested:   # Ctrl-C as the run finished: it is kept, nothing more starts
                raise Interrupted(index, total, None)
            if not res.success:
                failed_keys.update(step.keys)
                failures.append(StepFailure(step, _failure_messages(res, step)))
    if failures:
        raise RunFailures(failures, skipped)
    return results
