"""Plain ``dd-assets materialize`` (issue 20): one Dagster asset backfill -- the object the UI's
"Materialize" and ``--backfill`` create -- carried out by Dagster's backfill iteration in the CLI's
own process (dd_assets/local_backfill.py), with the same results as Dagster's plain
per-partition ``dg.materialize`` calls, and Ctrl-C canceling it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from dd_assets.backfill import BACKFILL_TAG
from dd_assets.cli import main
from dd_assets.config import load_params
from dd_assets.run_guard import PID_TAG

SELECT = ["raw_images", "manifest", "random_selection"]


def _versions(instance) -> dict:
    """(asset, partition) -> data version of its latest materialization."""
    out = {}
    for key in instance.get_asset_keys():
        recs = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1000, ascending=True).records
        for r in recs:
            ev = r.event_log_entry.dagster_event
            out[(key.to_user_string(), ev.partition)] = ev.event_specific_data.materialization.tags["dagster/data_version"]
    return out


def _tables(root) -> dict:
    """Parquet file -> (values, dd_assets metadata without the run id): the bytes hold the run id."""
    out = {}
    for p in sorted(root.rglob("*.parquet")):
        meta = {k: v for k, v in (pq.read_metadata(p).metadata or {}).items()
                if k not in (b"ARROW:schema", b"dd_assets.dagster_run_id")}
        out[str(p.relative_to(root))] = (pl.read_parquet(p), meta)
    return out


def test_plain_materialize_is_one_backfill_run_in_this_process_equal_to_the_reference(tiny_env, monkeypatch, capsys):
    assert main(["materialize", "--select", *SELECT]) == 0
    out = capsys.readouterr().out
    instance = dg.DagsterInstance.from_config(str(tiny_env / "dagster_home"))
    (backfill,) = instance.get_backfills()
    assert backfill.status.value == "COMPLETED_SUCCESS"
    runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill.backfill_id}))
    assert len(runs) == len(instance.get_runs()) >= 3 and all(r.is_success for r in runs)
    assert {r.tags[PID_TAG] for r in runs} == {str(os.getpid())}   # executed here, no run worker
    pairs = 1 + 10 + len(load_params().ipcs)                         # raw_images, manifest[class], random_selection[ipc]
    assert f"[{pairs}/{pairs}] " in out and "done" in out
    got = _versions(instance)
    assert len(got) == pairs

    # the reference: Dagster's plain dg.materialize, one call per (asset, partition), in dependency order,
    # in another data root and instance
    from dd_assets.definitions import build_definitions

    (tiny_env / "ref_home").mkdir()
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(tiny_env / "ref_artifacts"))
    monkeypatch.setenv("DAGSTER_HOME", str(tiny_env / "ref_home"))
    ref = dg.DagsterInstance.from_config(str(tiny_env / "ref_home"))
    defs = build_definitions(load_params(), executor="in_process")
    graph = defs.resolve_asset_graph()
    for name in SELECT:   # raw_images -> manifest -> random_selection
        pdef = graph.get(dg.AssetKey(name)).partitions_def
        for part in (pdef.get_partition_keys() if pdef else [None]):
            assert dg.materialize([*defs.assets, *defs.asset_checks], selection=[dg.AssetKey(name)], partition_key=part,
                                  instance=ref, resources=defs.resources).success
    assert _versions(ref) == got
    mine, theirs = _tables(tiny_env / "artifacts"), _tables(tiny_env / "ref_artifacts")
    assert mine.keys() == theirs.keys() and mine
    for name, (frame, meta) in mine.items():
        assert frame.equals(theirs[name][0]) and meta == theirs[name][1], name


def test_ctrl_c_cancels_the_backfill_keeps_finished_runs(tiny_env):
    """A real SIGINT to a CLI materialize while it runs class partitions: exit 130, the backfill
    CANCELED, finished runs kept, the interrupted and the launched ones CANCELED."""
    home = tiny_env / "dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "dd_assets.cli", "materialize", "--select", "raw_images", "manifest"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    instance = dg.DagsterInstance.from_config(str(home))
    key = dg.AssetKey("manifest")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(instance.get_materialized_partitions(key)) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "canceled" in out and "--stale" in out
    (backfill,) = instance.get_backfills()
    assert backfill.status.value == "CANCELED"
    runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill.backfill_id}))
    statuses = [r.status.value for r in runs]
    assert set(statuses) <= {"SUCCESS", "CANCELED"}, statuses
    # raw_images + a manifest kept (a run interrupted after its materialization is stored counts as canceled)
    assert statuses.count("SUCCESS") >= 2 and "CANCELED" in statuses
    assert len(instance.get_materialized_partitions(key)) < 10


def test_multiprocess_executor_steps_run_in_a_subprocess_of_the_cli(tiny_env):
    """``DD_ASSETS_EXECUTOR=multiprocess``: the backfill's run executes in the CLI's process, its step
    in a child process that reconstructs the job from the run's origin (``local_backfill.location_defs``
    resolves to the module's definitions there)."""
    home = tiny_env / "dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(home), "DD_ASSETS_EXECUTOR": "multiprocess"}
    proc = subprocess.run([sys.executable, "-m", "dd_assets.cli", "materialize", "--select", "raw_images"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    instance = dg.DagsterInstance.from_config(str(home))
    (run,) = instance.get_runs()
    assert run.is_success
    pid = {e.dagster_event.event_type_value: e.dagster_event.pid for e in instance.all_logs(run.run_id)
           if e.dagster_event is not None}
    assert pid["PIPELINE_START"] != pid["STEP_START"]   # the run in the CLI's process, its step in a child
    assert pid["STEP_WORKER_STARTED"] == pid["STEP_START"]
    assert instance.get_latest_materialization_event(dg.AssetKey("raw_images")) is not None


def test_local_instance_captures_no_compute_logs_unless_dagster_yaml_names_a_manager(tmp_path):
    """The CLI's runs print to its terminal (no `tail -F` per step); an explicit ``compute_logs`` of
    dagster.yaml is kept, and so are its other keys; the run queue/launcher are replaced."""
    import yaml
    from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
    from dagster._core.storage.noop_compute_log_manager import NoOpComputeLogManager

    from dd_assets.local_backfill import InProcessRunLauncher, local_instance

    plain = local_instance(tmp_path / "plain")
    assert isinstance(plain.compute_log_manager, NoOpComputeLogManager)
    assert isinstance(plain.run_launcher, InProcessRunLauncher)
    named = tmp_path / "named"
    named.mkdir()
    (named / "dagster.yaml").write_text(yaml.safe_dump({
        "compute_logs": {"module": "dagster._core.storage.local_compute_log_manager", "class": "LocalComputeLogManager",
                         "config": {"base_dir": str(named / "logs")}},
        "run_queue": {"max_concurrent_runs": 2}, "telemetry": {"enabled": False}}))
    inst = local_instance(named)
    assert isinstance(inst.compute_log_manager, LocalComputeLogManager)
    assert isinstance(inst.run_launcher, InProcessRunLauncher) and inst.telemetry_enabled is False
