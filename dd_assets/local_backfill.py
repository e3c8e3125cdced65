"""An asset backfill carried out in this process: Dagster's backfill iteration and run launcher,
no daemon, no run worker process.

``dd-assets materialize`` submits the same asset backfill as ``--backfill`` (and as the UI's
"Materialize" of a partition range, dd_assets/backfill.py), then drives it itself: it calls
Dagster's own backfill iteration (which decides which (asset, partition) runs are ready, creates
them tagged with the backfill id and submits them through the instance's run coordinator) in
a loop, on an instance whose run coordinator launches at once (``DefaultRunCoordinator``) and
whose run launcher is :class:`InProcessRunLauncher`: it takes the launched runs, and this
process executes each with Dagster's ``execute_run`` between iterations (in the main thread, so
Ctrl-C reaches Dagster's interrupt handling as in ``dg.materialize``). The UI shows one backfill
whose runs are ordinary runs of the ``dd_assets.definitions`` code location.

Dagster internals used (dagster 1.13): ``dagster._daemon.backfill.execute_backfill_jobs`` (the
daemon's per-backfill iteration), ``dagster._core.workspace`` (an in-process code location:
``WorkspaceProcessContext`` + ``InProcessWorkspaceLoadTarget``), ``dagster._core.launcher.RunLauncher``,
``dagster._core.execution.api.execute_run`` and ``dagster._utils.hosted_user_process.recon_job_from_origin``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from dagster._core.launcher import LaunchRunContext, RunLauncher
from dagster._serdes import ConfigurableClass
from dagster._serdes.config_class import ConfigurableClassData

from dd_assets.config import PROJECT_ROOT

CODE_LOCATION = "dd_assets.definitions"   # the name workspace.yaml's python_module gets in the UI
_location_defs: dg.Definitions | None = None   # what the in-process code location serves (:func:`workspace`)
CONFIG_FILE = "dd_assets_local.yaml"      # this instance's config, next to $DAGSTER_HOME/dagster.yaml
_QUEUE_KEYS = ("run_queue", "run_coordinator", "run_launcher")


class InProcessRunLauncher(RunLauncher, ConfigurableClass):
    """Takes launched runs into ``pending``; :func:`drive` executes them in this process."""

    def __init__(self, inst_data: ConfigurableClassData | None = None):
        self._inst_data = inst_data
        self.pending: list[tuple[str, Any]] = []    # (run id, job code origin)
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls):
        return {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data)

    def launch_run(self, context: LaunchRunContext) -> None:
        self.pending.append((context.dagster_run.run_id, context.job_code_origin))

    def terminate(self, run_id: str) -> bool:
        """A launched run not yet executed: dropped and marked canceled (a run executing is
        stopped by SIGINT in its own thread, not from here)."""
        for item in list(self.pending):
            if item[0] == run_id:
                self.pending.remove(item)
                run = self._instance.get_run_by_id(run_id)
                if run is not None and not run.is_finished:
                    self._instance.report_run_canceled(run, message="dd_assets: backfill canceled before the run started")
                return True
        return False


def __getattr__(name: str):
    """``location_defs``, the attribute the runs' job origin points at: the definitions this
    process serves (:func:`workspace`); in another process that reconstructs the job (a step
    subprocess of the multiprocess executor, a dask worker) the module's own definitions, built
    there from the current params.yaml (the kit refuses a run whose params changed since)."""
    if name == "location_defs":
        if _location_defs is not None:
            return _location_defs
        from dd_assets.definitions import defs

        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def local_instance(home: str | Path) -> dg.DagsterInstance:
    """The instance of ``$DAGSTER_HOME`` (same storage: runs, events, backfills) with the run
    coordinator and launcher replaced: runs are launched at once and executed here. The config is
    ``dagster.yaml`` without its run-queue/coordinator/launcher keys (and without compute-log
    capture unless it names one), written to ``CONFIG_FILE``."""
    from dagster._core.instance.ref import InstanceRef

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((home / "dagster.yaml").read_text()) if (home / "dagster.yaml").exists() else {}
    cfg = {k: v for k, v in (base or {}).items() if k not in _QUEUE_KEYS}
    if isinstance(cfg.get("concurrency"), dict):
        cfg["concurrency"] = {k: v for k, v in cfg["concurrency"].items() if k != "runs"} or None
        if cfg["concurrency"] is None:
            del cfg["concurrency"]
    if "compute_logs" not in cfg:
        # stdout/stderr of the CLI's runs stay on the terminal, as with dg.materialize: Dagster's
        # default local capture mirrors each step through a `tail -F` process (~16 % of a short
        # run: 10 manifest runs 6.2 s vs 7.4 s); a dagster.yaml that names compute_logs is kept
        cfg["compute_logs"] = {"module": "dagster._core.storage.noop_compute_log_manager",
                               "class": "NoOpComputeLogManager"}
    cfg["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    cfg["run_launcher"] = {"module": __name__, "class": "InProcessRunLauncher"}
    text = yaml.safe_dump(cfg, sort_keys=True)
    path = home / CONFIG_FILE
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home), config_filename=CONFIG_FILE))


@contextlib.contextmanager
def workspace(instance: dg.DagsterInstance, defs: dg.Definitions) -> Iterator[Any]:
    """A code location named like the UI's (``dd_assets.definitions``) serving ``defs`` from this
    process (no gRPC server). ``defs`` rather than the module's own ``defs``: that one was built
    when the module was first imported, with the params of that moment (a long-lived process,
    e.g. pytest, may have changed them since); the runs' job origin points here too, so
    ``execute_run`` reconstructs the job from the same object."""
    global _location_defs
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

    _location_defs = defs
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=__name__, attribute="location_defs",
                             working_directory=str(PROJECT_ROOT)),
        location_name=CODE_LOCATION)
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as ctx:
        errors = {name: entry.load_error for name, entry in ctx.create_request_context().get_code_location_entries().items()
                  if entry.load_error is not None}
        if errors:
            raise RuntimeError(f"code location {CODE_LOCATION} did not load: {next(iter(errors.values())).to_string()}")
        yield ctx


def iterate(ctx, backfill_id: str, logger: logging.Logger) -> None:
    """One iteration of Dagster's backfill daemon on this backfill only (other backfills on the
    instance stay the daemon's); an error is recorded on the backfill by Dagster and raised here
    when it ended the backfill."""
    from dagster._daemon.backfill import execute_backfill_jobs

    backfill = ctx.instance.get_backfill(backfill_id)
    for err in execute_backfill_jobs(ctx, logger, [backfill]):
        now = ctx.instance.get_backfill(backfill_id)
        if err is not None and now is not None and now.status.value in ("FAILING", "FAILED"):
            if now.status.value == "FAILING":   # Dagster's next iteration cancels its runs, marks it FAILED
                list(execute_backfill_jobs(ctx, logger, [now]))
            raise RuntimeError(f"backfill {backfill_id} failed: {err.to_string()}")


def run(instance: dg.DagsterInstance, backfill_id: str, defs: dg.Definitions, on_run: Callable[[Any], None] | None = None,
        hold: Callable[[Any], Any] | None = None, tracking_uri: str | None = None,
        logger: logging.Logger | None = None, stall_limit: int = 5) -> list:
    """Drive backfill ``backfill_id`` to its end in this process: Dagster's iteration, then the
    runs it launched, until the backfill is terminal. Returns the backfill's runs.

    ``on_run(run)`` hears each run before it executes; ``hold(run)`` is a context manager held
    while it executes (the step locks). A failed run does not stop the others: Dagster's
    iteration skips what is downstream of it; :class:`~dd_assets.orchestrate.RunFailures` is
    raised at the end. SIGINT: the run it interrupted is marked canceled (MLflow: KILLED), the
    backfill canceled (launched runs not yet started are dropped, canceled), finished runs kept,
    :class:`~dd_assets.orchestrate.Interrupted` raised.
    """
    from dd_assets.backfill import BACKFILL_TAG, TERMINAL
    from dd_assets.orchestrate import Interrupted, _cancel
    from dd_assets.run_guard import InterruptFlag, SignalsSeen

    logger = logger or _quiet_logger()
    launcher = instance.run_launcher
    if not isinstance(launcher, InProcessRunLauncher):
        raise TypeError(f"the instance's run launcher is {type(launcher).__name__}; use local_instance()")
    hold = hold or (lambda r: contextlib.nullcontext())
    executed: list[str] = []
    stalls = 0

    def runs():
        return instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill_id}))

    with InterruptFlag() as flag, SignalsSeen() as seen, workspace(instance, defs) as ctx:
        def stop_after(r) -> bool:
            executed.append(r.run_id)
            if seen.sigint():   # a Ctrl-C Dagster took while the run was between steps
                flag.requested = True
            return flag.requested or _interrupted(instance, r)

        while True:
            if flag.requested:
                break
            iterate(ctx, backfill_id, logger)
            backfill = instance.get_backfill(backfill_id)
            if not launcher.pending:
                if backfill.status.value in TERMINAL:
                    _raise_failures(instance, backfill, runs())
                    return runs()
                stalls += 1
                if stalls >= stall_limit:
                    raise RuntimeError(f"backfill {backfill_id} is {backfill.status.value} but launched no run in "
                                       f"{stall_limit} iterations (another process serving it?)")
                continue
            stalls = 0
            if _execute(instance, on_run, hold, stop_after, lambda: flag.requested):
                break
        # interrupted: the last run, when it did not finish, is canceled; nothing more starts
        last = instance.get_run_by_id(executed[-1]) if executed else None
        canceled = None
        if _interrupted(instance, last):
            _cancel(instance, last.run_id, tracking_uri)
            canceled = last.run_id
        from dd_assets.backfill import cancel

        # launched, not started (STARTING): Dagster's cancel leaves those to their launcher
        # (CANCELABLE_RUN_STATUSES is STARTED and QUEUED, dagster/_core/storage/dagster_run.py)
        for run_id, _ in list(launcher.pending):
            launcher.terminate(run_id)
        cancel(instance, backfill_id)
        for _ in range(stall_limit):
            iterate(ctx, backfill_id, logger)   # Dagster's cancel: launched runs terminated (dropped here)
            if instance.get_backfill(backfill_id).status.value in TERMINAL:
                break
        done = sum(1 for r in runs() if r.is_success)
        raise Interrupted(done, len(runs()), canceled)


@dataclass
class Outcome:
    """A finished backfill carried out here: the instance it ran on, its id and its runs."""
    instance: dg.DagsterInstance
    backfill_id: str
    runs: list

    def materialization(self, key: str, partition: str | None = None) -> dg.AssetMaterialization:
        """The latest materialization of ``key`` (``partition``) on the instance."""
        flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey.from_user_string(key),
                                    asset_partitions=[partition] if partition else None)
        recs = self.instance.fetch_materializations(flt, limit=1).records
        if not recs:
            raise KeyError(f"{key}[{partition or '-'}] was not materialized")
        return recs[0].asset_materialization


def materialize(defs: dg.Definitions, keys: Iterable[dg.AssetKey], home: str | Path,
                partitions: dict[str, list[str]] | None = None, resource_config: dict | None = None,
                log_level: str = "INFO", tags: dict[str, str] | None = None, title: str = "dd-assets materialize",
                on_submit: Callable[[str, int], None] | None = None, on_run: Callable[[Any], None] | None = None,
                lock_dir: str | Path | None = None, on_wait: Callable[[str, str], None] | None = None,
                tracking_uri: str | None = None) -> Outcome:
    """Materialize ``keys`` (restricted to ``partitions``: user-string key -> partition keys) as
    one asset backfill on the instance in ``home``, carried out in this process (:func:`run`).

    This is ``dd-assets materialize`` without the command line (the CLI calls it). ``on_submit(id,
    pairs)`` hears the backfill id and its (asset, partition) count; ``lock_dir``: each run holds
    the :class:`~dd_assets.run_guard.StepLocks` of its (asset, partition) pairs, taken in sorted
    order, so two processes on one data root never compute the same pair at once (``on_wait(label,
    holder)`` hears a wait; the waiting process then computes it again: Dagster's backfill counts
    only its own runs). Raises :class:`~dd_assets.orchestrate.RunFailures` /
    :class:`~dd_assets.orchestrate.Interrupted` like the CLI reports them.
    """
    from dd_assets import backfill
    from dd_assets.orchestrate import _run_config
    from dd_assets.run_guard import StepLocks, process_tags

    keys = list(keys)
    instance = local_instance(home)
    _, pairs = backfill.target_subset(defs, keys, partitions or None)
    backfill_id = backfill.submit(instance, defs, keys, partitions or None, _run_config(resource_config, log_level),
                                  tags={"dd_assets/launched_by": "cli", **(tags or {}), **process_tags()},
                                  title=title, description="dd-assets materialize")
    if on_submit:
        on_submit(backfill_id, pairs)
    locks = StepLocks(lock_dir) if lock_dir else None

    @contextlib.contextmanager
    def hold(r):
        if locks is None:
            yield
            return
        part = r.tags.get(backfill.PARTITION_TAG)
        with contextlib.ExitStack() as stack:
            for name in sorted(k.to_user_string() for k in (r.asset_selection or ())):
                label = f"{name}[{part or '-'}]"
                stack.enter_context(locks.hold([name], part, lambda who, label=label: on_wait and on_wait(label, who)))
            yield

    return Outcome(instance, backfill_id, run(instance, backfill_id, defs, on_run, hold, tracking_uri=tracking_uri))


def _raise_failures(instance: dg.DagsterInstance, backfill, runs: list) -> None:
    """:class:`~dd_assets.orchestrate.RunFailures` for the backfill's failed runs, one entry per
    failed step (its asset, partition and cause; a run that failed outside any step names its
    assets), and the (asset, partition) pairs Dagster skipped downstream of them."""
    from dd_assets.backfill import PARTITION_TAG
    from dd_assets.orchestrate import RunFailures, StepFailure, failure_summary

    failures, failed_pairs = [], set()
    for r in reversed(runs):   # get_runs: newest first
        if r.is_success:
            continue
        keys = sorted(r.asset_selection or (), key=lambda k: k.to_user_string())
        by_step = {k.to_python_identifier(): k.to_user_string() for k in keys}
        part = r.tags.get(PARTITION_TAG)
        events = [e.dagster_event for e in instance.all_logs(r.run_id) if e.dagster_event is not None]
        steps = [ev for ev in events if ev.is_step_failure]
        for ev in steps:
            name = by_step.get(ev.step_key, ev.step_key)
            failures.append(StepFailure([name], part, failure_summary([ev], [name])))
            failed_pairs.add((name, part))
        if not steps:
            names = [k.to_user_string() for k in keys]
            failures.append(StepFailure(names, part, failure_summary(events, names)))
            failed_pairs |= {(n, part) for n in names}
    data = backfill.asset_backfill_data
    skipped = sorted(f"{ap.asset_key.to_user_string()}[{ap.partition_key or '-'}]"
                     for ap in (data.failed_and_downstream_subset.iterate_asset_partitions() if data else ())
                     if (ap.asset_key.to_user_string(), ap.partition_key) not in failed_pairs)
    if failures:
        raise RunFailures(failures, skipped)


def _interrupted(instance: dg.DagsterInstance, r) -> bool:
    """Whether run ``r`` ended by a SIGINT (Dagster's interrupted-step error in its events)."""
    from dd_assets.run_guard import interrupted

    return r is not None and not r.is_success and interrupted(
        e.dagster_event for e in instance.all_logs(r.run_id) if e.dagster_event is not None)


def _execute(instance, on_run, hold, stop_after, stop_before) -> bool:
    """Execute the runs the launcher took, in order, in this process (Dagster's ``execute_run``,
    as its ``SyncInMemoryRunLauncher`` does); True when ``stop_after(run)`` stopped it, or
    ``stop_before()`` (Ctrl-C between runs, or while waiting for a lock) did before a run started:
    that run goes back to the launcher's pending list, canceled with the others."""
    from dagster._core.definitions.reconstruct import ReconstructableJob
    from dagster._core.execution.api import execute_run
    from dagster._utils.hosted_user_process import recon_job_from_origin

    launcher = instance.run_launcher
    # Dagster keeps the last reconstructed job in a class-wide lru_cache keyed by the origin,
    # which is the same for every call here: without clearing it, a run would execute the
    # definitions of an earlier call in this process (other params, other code versions)
    ReconstructableJob.get_repository_definition.cache_clear()
    ReconstructableJob.get_definition.cache_clear()
    while launcher.pending:
        item = launcher.pending.pop(0)
        run_id, origin = item
        r = instance.get_run_by_id(run_id)
        if r is None or r.is_finished:
            continue
        if on_run:
            on_run(r)
        with hold(r):
            if stop_before():
                launcher.pending.insert(0, item)
                return True
            execute_run(recon_job_from_origin(origin), r, instance)
        if stop_after(instance.get_run_by_id(run_id)):
            return True
    return False


def _quiet_logger() -> logging.Logger:
    logger = logging.getLogger("dd_assets.local_backfill")
    logger.setLevel(logging.WARNING)
    return logger
