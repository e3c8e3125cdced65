"""Runs that survive Ctrl-C, kill -9 and a second process (dd_assets/run_guard.py, issue 17)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from dd_assets import local_backfill, orchestrate
from dd_assets.run_guard import (
    HOST_TAG, PID_TAG, START_TAG, StepLocks, process_alive, process_tags, reap_orphans,
)

PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_process_alive_tells_live_dead_reused_and_foreign():
    assert process_alive(process_tags()) is True
    assert process_alive(process_tags() | {PID_TAG: str(_dead_pid())}) is False
    if process_tags()[START_TAG]:   # Linux: a recycled pid (other start time) is another process
        assert process_alive(process_tags() | {START_TAG: "1"}) is False
    assert process_alive(process_tags() | {HOST_TAG: "some-other-host"}) is None
    assert process_alive({}) is None


def test_step_lock_waits_for_the_holder_and_says_so(tmp_path):
    locks = StepLocks(tmp_path / "locks")
    held, release = threading.Event(), threading.Event()

    def holder():
        with locks.hold(["x"], "a") as waited:
            assert waited is False
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    heard: list[str] = []
    threading.Timer(0.3, release.set).start()
    t0 = time.perf_counter()
    with locks.hold(["x"], "a", on_wait=heard.append) as waited:
        assert waited is True
        assert time.perf_counter() - t0 >= 0.25
    t.join()
    assert heard and f"pid {os.getpid()}" in heard[0]
    with locks.hold(["x"], "b") as waited:   # another partition: its own lock
        assert waited is False


def _run(instance: dg.DagsterInstance, tags: dict[str, str]) -> str:
    from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

    run_id = str(uuid.uuid4())
    instance.add_run(DagsterRun(job_name="__ephemeral_asset_job__", run_id=run_id, status=DagsterRunStatus.STARTED,
                                tags=tags))
    return run_id


def test_reap_orphans_fails_dead_runs_and_kills_their_mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    with dg.instance_for_test() as instance:
        dead = _run(instance, process_tags() | {PID_TAG: str(_dead_pid())})
        live = _run(instance, process_tags())
        foreign = _run(instance, process_tags() | {HOST_TAG: "elsewhere", PID_TAG: str(_dead_pid())})
        ml_dead = client.create_run(exp, tags={"dagster_run_id": dead}).info.run_id
        ml_live = client.create_run(exp, tags={"dagster_run_id": live}).info.run_id
        assert reap_orphans(instance, uri) == [dead]
        status = {r: instance.get_run_by_id(r).status for r in (dead, live, foreign)}
        assert status == {dead: dg.DagsterRunStatus.FAILURE, live: dg.DagsterRunStatus.STARTED,
                          foreign: dg.DagsterRunStatus.STARTED}
        assert client.get_run(ml_dead).info.status == "KILLED"
        assert client.get_run(ml_live).info.status == "RUNNING"
        assert reap_orphans(instance, uri) == []   # idempotent


def test_mlflow_run_marks_interrupts_killed_and_errors_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    from dd_assets.storage import DataRoot
    from dd_assets.tracking import mlflow_run, tracking_uri

    root = DataRoot(str(tmp_path))
    ids = {}
    for name, err in (("int", KeyboardInterrupt), ("err", ValueError)):
        with pytest.raises(err):
            with mlflow_run(root, "exp", name, {}, {}) as mlf:
                ids[name] = mlf.active_run().info.run_id
                raise err()
    client = MlflowClient(tracking_uri(root))
    assert client.get_run(ids["int"]).info.status == "KILLED"
    assert client.get_run(ids["err"]).info.status == "FAILED"


def _toy_defs(log: Path, interrupt_on: str | None = None) -> dg.Definitions:
    @dg.asset(partitions_def=PARTS)
    def toy(context):
        with log.open("a") as fh:
            fh.write(context.partition_key + "\n")
        if context.partition_key == interrupt_on:
            os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C while this run executes
            time.sleep(5)

    return dg.Definitions(assets=[toy], executor=dg.in_process_executor)


KEY = dg.AssetKey("toy")


def test_sigint_stops_launching_and_cancels_the_current_run(tmp_path):
    log = tmp_path / "log.txt"
    defs = _toy_defs(log, interrupt_on="b")
    with pytest.raises(orchestrate.Interrupted) as info:
        local_backfill.materialize(defs, [KEY], tmp_path / "home")
    assert log.read_text().split() == ["a", "b"]   # c never started
    assert info.value.finished == 1 and info.value.total == 3
    instance = local_backfill.local_instance(tmp_path / "home")
    run = instance.get_run_by_id(info.value.run_id)
    assert run.status == dg.DagsterRunStatus.CANCELED
    (backfill,) = instance.get_backfills()
    assert backfill.status.value == "CANCELED"
    statuses = sorted(r.status.value for r in instance.get_runs())
    assert statuses == ["CANCELED", "CANCELED", "SUCCESS"], statuses   # c: launched, canceled before it started
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored


def test_sigint_between_runs_stops_before_the_next(tmp_path):
    log = tmp_path / "log.txt"
    defs = _toy_defs(log)
    seen = []

    def on_run(run):
        seen.append(run.tags["dagster/partition"])
        if len(seen) == 2:   # Ctrl-C just before the second run would start (outside any run)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(orchestrate.Interrupted) as info:
        local_backfill.materialize(defs, [KEY], tmp_path / "home", on_run=on_run)
    assert log.read_text().split() == ["a"]
    assert info.value.finished == 1 and info.value.run_id is None   # nothing was running: nothing to cancel


def test_a_sigint_dagster_swallowed_after_the_last_step_still_stops(tmp_path, monkeypatch):
    """A Ctrl-C that lands while ``execute_run`` is past its last step is taken by Dagster's
    ``capture_interrupts`` handler, which records it, never raises it and forgets it on exit;
    materialize must still stop after that run (the run kept, the rest canceled)."""
    from dagster._core.execution import api
    from dagster._utils.interrupts import capture_interrupts

    log = tmp_path / "log.txt"
    defs = _toy_defs(log)
    real = api.execute_run

    def then_ctrl_c(*args, **kwargs):
        out = real(*args, **kwargs)
        if log.read_text().split() == ["a"]:
            with capture_interrupts():   # as at the end of execute_run: recorded, then cleared
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
        return out

    monkeypatch.setattr(api, "execute_run", then_ctrl_c)
    with pytest.raises(orchestrate.Interrupted) as info:
        local_backfill.materialize(defs, [KEY], tmp_path / "home")
    assert log.read_text().split() == ["a"]
    assert info.value.finished == 1 and info.value.run_id is None   # run a finished: kept, not canceled
    statuses = sorted(r.status.value for r in local_backfill.local_instance(tmp_path / "home").get_runs())
    assert statuses == ["CANCELED", "CANCELED", "SUCCESS"], statuses


def test_two_processes_never_compute_the_same_pair_at_once(tmp_path):
    """Another process holds toy[a]'s step lock: this one waits for it (and says so), then
    computes toy[a] itself after the other released it -- Dagster's backfill counts only its
    own runs, so a pair the other process finished is computed again, never concurrently."""
    log = tmp_path / "log.txt"
    defs = _toy_defs(log)
    lock_dir = tmp_path / "locks"
    held, waited, waits = threading.Event(), threading.Event(), []

    def other_process():   # holds toy[a] while it "computes" it, until this process is seen waiting
        with StepLocks(lock_dir).hold(["toy"], "a"):
            held.set()
            with log.open("a") as fh:
                fh.write("other-start\n")
            waited.wait(60)
            time.sleep(0.3)
            with log.open("a") as fh:
                fh.write("other-end\n")

    def on_wait(label, who):
        waits.append(label)
        waited.set()

    t = threading.Thread(target=other_process)
    t.start()
    held.wait(10)
    local_backfill.materialize(defs, [KEY], tmp_path / "home", lock_dir=lock_dir, on_wait=on_wait)
    t.join()
    lines = log.read_text().split()
    assert waits == ["toy[a]"]
    assert sorted(lines) == ["a", "b", "c", "other-end", "other-start"]
    assert lines.index("a") > lines.index("other-end")   # toy[a] waited for the other process
    # without contention nobody waits
    local_backfill.materialize(defs, [KEY], tmp_path / "home", lock_dir=lock_dir, on_wait=on_wait)
    assert waits == ["toy[a]"] and sorted(log.read_text().split()).count("a") == 2


def test_runs_are_tagged_with_their_process(tmp_path):
    from dd_assets.run_guard import tag_run

    with dg.instance_for_test() as instance:
        run_id = _run(instance, {})
        tag_run(instance, run_id)
        tags = instance.get_run_by_id(run_id).tags
        assert tags[PID_TAG] == str(os.getpid()) and process_alive(dict(tags)) is True
