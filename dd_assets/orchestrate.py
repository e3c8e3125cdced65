"""What the CLI's runs share: the Dagster instance home of a profile, the run config of the
operational knobs, and how failed and interrupted runs are reported.

The runs themselves are Dagster's: ``dd-assets materialize`` submits one asset backfill and
carries it out with Dagster's backfill iteration (dd_assets/local_backfill.py), or leaves it to
the daemon's run queue and launcher (``--backfill``, dd_assets/backfill.py). No planner here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
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


def _run_config(resource_config: dict | None, log_level: str) -> dict:
    run_config: dict = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if resource_config:
        run_config["resources"] = {"dd": {"config": resource_config}}
    return run_config


@dataclass
class StepFailure:
    """A failed run: its assets (user strings), partition and the causes of its failed steps."""
    assets: list[str]
    partition: str | None
    messages: list[str]

    def __str__(self) -> str:
        return f"{','.join(self.assets)}[{self.partition or '-'}]: " + "; ".join(self.messages)


class Interrupted(RuntimeError):
    """SIGINT (Ctrl-C): nothing more was launched; finished runs are kept, the interrupted one
    (if any) is marked canceled and its MLflow runs KILLED."""

    def __init__(self, finished: int, total: int, run_id: str | None):
        self.finished, self.total, self.run_id = finished, total, run_id
        where = f"; run {run_id} canceled" if run_id else ""
        super().__init__(f"interrupted after {finished} of {total} runs{where}; finished runs are kept, "
                         "`dd-assets materialize --stale` continues")


class RunFailures(RuntimeError):
    """Some runs failed; the rest of the backfill ran (downstream of failures was skipped)."""

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
