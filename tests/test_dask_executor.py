"""Class partitions through Dagster's own machinery onto a dask.distributed cluster (issue 20).

A dask scheduler and two workers run as separate processes on 127.0.0.1; ``dd-assets
materialize --backfill`` with ``DD_ASSETS_EXECUTOR=dask`` submits one Dagster asset backfill,
the daemon's run queue launches one run per class partition (two at a time) and each run's
step executes on a worker. One worker is killed (SIGKILL) while it runs a step: dask re-runs
that task on the other worker, and every partition is materialized exactly once, by a worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from dd_assets.backfill import BACKFILL_TAG, target_subset
from dd_assets.dask_executor import RunScopedDaskExecutor, run_id_of, task_key
from tests.conftest import write_params

pytestmark = pytest.mark.slow
CLASSES = ["0", "1", "2", "3"]
HERE = Path(__file__).resolve().parent


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _env(tmp_path: Path) -> dict[str, str]:
    params = write_params(tmp_path, "tiny", overrides={"data.classes": CLASSES}, raw_root=tmp_path / "raw")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DD_ASSETS_", "DAGSTER_"))}
    env.update(DD_ASSETS_PARAMS=str(params), DD_ASSETS_DATA_ROOT=str(tmp_path / "artifacts"),
               DAGSTER_HOME=str(tmp_path / "dagster_home"), PYTHONPATH=str(HERE.parent), DD_TEST_STEP_DELAY="8")
    (tmp_path / "dagster_home").mkdir()
    return env


def _step_starts(instance: dg.DagsterInstance, backfill_id: str) -> list[tuple[str, int]]:
    """(run id, pid) of every step start of the backfill's runs."""
    out = []
    for run in instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill_id})):
        for rec in instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_START).records:
            out.append((run.run_id, rec.event_log_entry.dagster_event.pid))
    return out


def _materialized(instance: dg.DagsterInstance, run_id: str) -> bool:
    return bool(instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records)


@pytest.mark.timeout(1200)
def test_class_partitions_on_dask_workers_survive_a_killed_worker(tmp_path):
    from dask.distributed import Client

    env = _env(tmp_path)
    cli = [sys.executable, "-m", "dd_assets.cli", "materialize", "--log-level", "WARNING"]
    subprocess.run([*cli, "--select", "raw_images", "teacher", "manifest"], env=env, check=True,
                   capture_output=True, timeout=600)

    sched_file = tmp_path / "scheduler.json"
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        procs.append(subprocess.Popen([_bin("dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                       "--no-dashboard", "--scheduler-file", str(sched_file)], env=env,
                                      stdout=open(logs / "scheduler.log", "wb"), stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        for name in ("wA", "wB"):
            procs.append(subprocess.Popen(
                [_bin("dask"), "worker", "--scheduler-file", str(sched_file), "--nthreads", "1", "--no-nanny",
                 "--no-dashboard", "--host", "127.0.0.1", "--name", name, "--local-directory", str(tmp_path / "dask"),
                 "--preload", str(HERE / "dask_preload_slow.py")],
                env=env, stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT))
        client = Client(scheduler_file=str(sched_file), timeout=60)
        client.wait_for_workers(2, timeout=180)
        worker_pids = set(client.run(os.getpid).values())
        assert len(worker_pids) == 2

        launch = subprocess.Popen([*cli, "--select", "rded_scores", "--backfill"],
                                  env={**env, "DD_ASSETS_EXECUTOR": "dask", "DD_ASSETS_DASK_SCHEDULER": str(sched_file)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
        killed: tuple[str, int] | None = None
        deadline = time.time() + 900
        while launch.poll() is None and time.time() < deadline:
            backfills = instance.get_backfills()
            if killed is None and backfills:
                running = [(r, p) for r, p in _step_starts(instance, backfills[0].backfill_id)
                           if p in worker_pids and not _materialized(instance, r)]
                if running:
                    killed = running[0]
                    os.kill(killed[1], signal.SIGKILL)   # mid-step: the preload holds each step >= 8 s
            time.sleep(0.2)
        out = launch.communicate(timeout=60)[0] if launch.poll() is not None else ""
        assert launch.returncode == 0, out
        assert killed is not None, "no step ever started on a worker"

        backfill_id = instance.get_backfills()[0].backfill_id
        runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill_id}))
        assert sorted(r.tags["dagster/partition"] for r in runs) == CLASSES
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        # steps on workers do not tag the run with their process: a killed worker's run must not
        # look orphaned (reaped, marked failed) while dask retries its step
        from dd_assets.run_guard import PID_TAG

        assert not any(int(r.tags.get(PID_TAG, -1)) in worker_pids for r in runs)
        survivor = (worker_pids - {killed[1]}).pop()
        key = dg.AssetKey("rded_scores")
        for part in CLASSES:
            recs = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=[part]), limit=10).records
            assert len(recs) == 1, f"partition {part}: {len(recs)} materializations"   # exactly once
            pid = recs[0].event_log_entry.dagster_event.pid
            assert pid in worker_pids, f"partition {part} computed by pid {pid}, not a dask worker"
        # the killed worker's step ran again, to the end, on the other worker
        starts = [p for r, p in _step_starts(instance, backfill_id) if r == killed[0]]
        assert killed[1] in starts and survivor in starts, starts
        killed_part = next(r.tags["dagster/partition"] for r in runs if r.run_id == killed[0])
        rec = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[killed_part]), limit=1).records[0]
        assert rec.run_id == killed[0] and rec.event_log_entry.dagster_event.pid == survivor
        # the artifact on disk is whole (atomic writes: nothing of the killed attempt remains)
        from dd_assets.config import load_params
        from dd_assets.storage import DataRoot, layout
        from dd_assets.storage.tables import read_table

        os.environ.update(DD_ASSETS_PARAMS=env["DD_ASSETS_PARAMS"], DD_ASSETS_DATA_ROOT=env["DD_ASSETS_DATA_ROOT"])
        try:
            root = DataRoot(load_params().data_root)
            assert all(len(read_table(root, layout.scores("rded", int(c)))) == 8 for c in CLASSES)
        finally:
            os.environ.pop("DD_ASSETS_PARAMS"), os.environ.pop("DD_ASSETS_DATA_ROOT")
        client.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_task_keys_are_unique_per_run():
    """dagster-dask's own executor keys a task ``<job>.<step>``: two concurrent runs of one asset
    job (two class partitions) would share one dask task. Ours carries the run id."""
    a, b = task_key("run-a", "rded_scores"), task_key("run-b", "rded_scores")
    assert a != b and run_id_of(a) == "run-a" and run_id_of(b) == "run-b"


def test_dask_executor_is_refused_without_a_scheduler(monkeypatch):
    from dd_assets import definitions

    monkeypatch.setenv(definitions.EXECUTOR_ENV, "dask")
    monkeypatch.delenv("DD_ASSETS_DASK_SCHEDULER", raising=False)
    with pytest.raises(ValueError, match="DD_ASSETS_DASK_SCHEDULER"):
        definitions.ui_executor()
    monkeypatch.setenv("DD_ASSETS_DASK_SCHEDULER", "tcp://127.0.0.1:8786")
    assert definitions.ui_executor() == "dask"
    assert isinstance(definitions.dask_executor.executor_creation_fn(None), RunScopedDaskExecutor)


def test_backfill_target_covers_partitions_and_unpartitioned_assets(tiny_env):
    from dd_assets.config import load_params
    from dd_assets.definitions import build_definitions

    defs = build_definitions(load_params(), executor="in_process")
    keys = [dg.AssetKey("rded_scores"), dg.AssetKey("teacher")]
    subset, n = target_subset(defs, keys)
    assert n == 10 + 1 and subset.asset_keys == set(keys)
    subset, n = target_subset(defs, keys, {"rded_scores": ["2", "5"]})
    assert n == 3 and set(subset.get_partitions_subset(keys[0]).get_partition_keys()) == {"2", "5"}
    with pytest.raises(ValueError, match="rded_scores: no partition"):
        target_subset(defs, keys, {"rded_scores": ["11"]})
    # a backfill whose runs all ended but left a target unmaterialized (e.g. dagster-dask's shared
    # task keys: one partition's run "succeeds" with another partition's events) is not a success
    from types import SimpleNamespace

    from dd_assets.backfill import Outcome, _missing

    done, _ = target_subset(defs, keys, {"rded_scores": ["2"]})
    fake = SimpleNamespace(asset_backfill_data=SimpleNamespace(target_subset=subset, materialized_subset=done))
    assert _missing(fake) == ["rded_scores[5]"]   # teacher was materialized (in done)
    out = Outcome("COMPLETED_FAILED", {"r1": "SUCCESS"}, [], _missing(fake))
    assert not out.success and "not materialized although their runs ended: rded_scores[5]" in out.describe("b")
