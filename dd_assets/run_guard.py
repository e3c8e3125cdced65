"""Runs that survive the ways people stop them (issue 17): Ctrl-C, ``kill -9``, two processes.

* **Who runs a run.**  Every run that opens the ``dd`` resource tags itself with its process
  (:func:`tag_run`: pid, host, the process start time from ``/proc``), whether the CLI or a
  run launcher (the UI's, a backfill's) started it; steps on dask workers do not tag (the worker is
  not the run's process; dask re-runs a dead worker's steps).
* **Orphans.**  A run still STARTED whose process is gone (``kill -9``, OOM killer, a closed
  laptop) is an orphan: :func:`reap_orphans` marks it failed on the Dagster instance (freeing
  its slot in the UI's run queue) and its MLflow runs KILLED.  ``dd-assets materialize`` and
  ``doctor`` call it at start, and the ``orphaned_runs_sensor`` (``dd_assets/defs/sensors.py``)
  calls it under ``dagster dev``'s daemon.  Dagster's own run monitoring cannot: the default
  run launcher does not support worker health checks.  A run on another host is never judged.
* **Step locks.**  :class:`StepLocks` is one ``flock`` per (assets, partition) step in
  ``$DAGSTER_HOME/locks/<data root hash>/``: two ``materialize`` processes on one data root never
  compute the same step at once; the second waits, then skips the step if the first
  materialized it meanwhile (the orchestrator checks), so disjoint selections still run in
  parallel and overlapping ones do the shared work once.
* **Ctrl-C.**  :class:`InterruptFlag` notices a SIGINT that arrives between runs; one that arrives
  inside a run is turned by Dagster into a ``DagsterExecutionInterruptedError`` step failure,
  which :func:`interrupted` recognizes.  Either way the orchestrator launches nothing more.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

PID_TAG = "dd_assets/pid"
HOST_TAG = "dd_assets/host"
START_TAG = "dd_assets/proc_start"
INTERRUPT_ERRORS = ("DagsterExecutionInterruptedError", "KeyboardInterrupt")


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22); ''
    where ``/proc`` is unavailable.  Together with the pid it names one process (pids recycle)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def process_tags(pid: int | None = None) -> dict[str, str]:
    pid = os.getpid() if pid is None else int(pid)
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), START_TAG: _proc_start(pid)}


def process_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process named by a run's tags still runs: None when it cannot be told
    (no tags, or another host), False when the pid is gone or now names another process."""
    if PID_TAG not in tags or tags.get(HOST_TAG) != socket.gethostname():
        return None
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = tags.get(START_TAG, "")
    return not (start and _proc_start(pid) not in ("", start))


def in_dask_worker() -> bool:
    """Whether this code runs as a task of a dask.distributed worker (DD_ASSETS_EXECUTOR=dask)."""
    if "distributed" not in sys.modules:   # never imported: not a dask worker (and no import cost)
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def tag_run(instance, run_id: str | None) -> None:
    """Record the current process on run ``run_id`` (no-op without an instance or run).

    Not from a step on a dask worker: the worker is not the run's process, and when it dies
    dask re-runs the step elsewhere; a run tagged with the dead worker would be reaped as an
    orphan (marked failed) while its step is still being retried."""
    if instance is None or not run_id or in_dask_worker():
        return
    with contextlib.suppress(Exception):  # an ephemeral/test instance without the run
        if instance.get_run_by_id(run_id) is not None:
            instance.add_run_tags(run_id, process_tags())


def find_orphans(instance) -> list:
    """Runs the instance believes in flight whose tagged process is gone (on this host)."""
    import dagster as dg

    flt = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING,
                                  dg.DagsterRunStatus.CANCELING])
    return [r for r in instance.get_runs(filters=flt) if process_alive(dict(r.tags)) is False]


def kill_mlflow_runs(tracking_uri: str, dagster_run_ids: Iterable[str]) -> int:
    """Mark every RUNNING MLflow run tagged with one of ``dagster_run_ids`` as KILLED."""
    ids = list(dagster_run_ids)
    if not ids:
        return 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    n = 0
    for rid in ids:
        safe = rid.replace("'", "")
        for run in client.search_runs(exps, filter_string=f"tags.dagster_run_id = '{safe}' and attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, status="KILLED")
            n += 1
    return n


def reap_orphans(instance, tracking_uri: str | None = None) -> list[str]:
    """Mark orphaned runs failed (message names the dead process) and their MLflow runs KILLED;
    returns their run ids."""
    orphans = find_orphans(instance)
    for run in orphans:
        instance.report_run_failed(
            run, message=f"dd_assets: the run's process (pid {run.tags.get(PID_TAG)} on {run.tags.get(HOST_TAG)}) "
                         "is gone (killed, e.g. kill -9 or out of memory); marked failed so its slot is freed")
        with contextlib.suppress(Exception):   # its pool slots (e.g. the `gpu` pool) are freed too
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    if orphans and tracking_uri:
        kill_mlflow_runs(tracking_uri, [r.run_id for r in orphans])
    return [r.run_id for r in orphans]


def interrupted(events: Iterable) -> bool:
    """Whether a run's events show it was stopped by SIGINT (Dagster's interrupted-step error)."""
    for ev in events:
        err = getattr(getattr(ev, "event_specific_data", None), "error", None)   # step and run failures
        if err is not None:
            while err is not None:
                if getattr(err, "cls_name", None) in INTERRUPT_ERRORS:
                    return True
                err = getattr(err, "cause", None)
    return False


class InterruptFlag:
    """A SIGINT handler for the orchestrator's loop: the first Ctrl-C sets ``requested`` (the
    current run is stopped by Dagster's own handler, which replaces this one while a run
    executes); a second one outside a run raises ``KeyboardInterrupt`` as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def _handler(self, signo, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class StepLocks:
    """One exclusive ``flock`` per (asset, partition) pair -- or per set of assets and a
    partition -- shared by every process on this machine that uses the same lock directory
    (``for_root`` keys it by data root; ``local_backfill.materialize`` takes one per pair of a run)."""

    def __init__(self, lock_dir: str | Path) -> None:
        self.dir = Path(lock_dir)

    @classmethod
    def for_root(cls, data_root: str, home: str | Path | None = None) -> StepLocks:
        home = Path(home or os.environ.get("DAGSTER_HOME") or ".")
        return cls(home / "locks" / hashlib.sha1(str(data_root).encode()).hexdigest()[:12])

    @staticmethod
    def name(keys: Iterable[str], partition: str | None) -> str:
        raw = ",".join(sorted(keys)) + f"[{partition or '-'}]"
        safe = "".join(c if c.isalnum() or c in "_-.," else "_" for c in raw)[:150]
        return f"{safe}.{hashlib.sha1(raw.encode()).hexdigest()[:8]}.lock"

    @contextlib.contextmanager
    def hold(self, keys: Iterable[str], partition: str | None, on_wait=None) -> Iterator[bool]:
        """Hold the step's lock; yields True when another process held it first (we waited)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process locking
            yield False
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / self.name(keys, partition)
        with open(path, "a+") as fh:
            waited = False
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waited = True
                fh.seek(0)
                holder = fh.read().strip() or "?"
                if on_wait:
                    on_wait(holder)
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.seek(0)
                fh.truncate()
                fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
                fh.flush()
                yield waited
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class SignalsSeen:
    """Whether a SIGINT reached this process, whichever Python handler took it. ``execute_run``
    runs under Dagster's ``capture_interrupts``, which only records a Ctrl-C that arrives between
    steps, raises it at the next step checkpoint -- there is none after the last step -- and
    clears the record on exit: without this the Ctrl-C would be lost and the next run started.
    The interpreter's wakeup fd receives every signal's number regardless of the handler."""

    def __enter__(self) -> SignalsSeen:
        self._fds = None
        if threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._fds = (r, w)
        return self

    def sigint(self) -> bool:
        """Whether a SIGINT arrived since the last call."""
        if self._fds is None:
            return False
        seen = False
        while True:
            try:
                data = os.read(self._fds[0], 4096)
            except BlockingIOError:
                return seen
            if not data:
                return seen
            seen = seen or signal.SIGINT in data

    def __exit__(self, *exc) -> None:
        if self._fds is not None:
            signal.set_wakeup_fd(self._old)
            for fd in self._fds:
                os.close(fd)


def reap_backfills(instance) -> list[str]:
    """Backfills a ``materialize`` process was carrying out in itself when it died (``kill -9``):
    still REQUESTED, tagged with a process that is gone. Marked CANCELED, so that no daemon
    resumes them later (their runs are reaped as orphans by run_guard.reap_orphans)."""
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    out = []
    for b in instance.get_backfills(filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED,
                                                                          BulkActionStatus.CANCELING])):
        tags = dict(b.tags or {})
        if PID_TAG in tags and tags.get("dd_assets/launched_by") == "cli" and process_alive(tags) is False:
            import time

            instance.update_backfill(b.with_status(BulkActionStatus.CANCELED).with_end_timestamp(time.time()))
            out.append(b.backfill_id)
    return out
