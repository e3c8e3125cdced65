"""Incremental re-runs: a new IPC reuses every IPC-independent asset, a method parameter
re-runs only that method's chain, a teacher change re-runs everything downstream, and a
killed class-partitioned run resumes without recomputing finished classes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest
import yaml

from dd_assets import local_backfill
from dd_assets.config import load_params
from dd_assets.definitions import build_definitions
from dd_assets.staleness import find_stale
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.tables import read_table

pytestmark = pytest.mark.slow

IPC_INDEPENDENT = {"raw_images", "manifest", "teacher", "teacher_features", "rded_scores", "vit_scorer", "focusdc_attention",
                   "expert_trajectories", "comp_dd_complexity"}


def _set(params_path, key, value):
    doc = yaml.safe_load(params_path.read_text())
    node = doc["profiles"]["tiny"]
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    params_path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _materialize_stale(home):
    """``dd-assets materialize --stale`` without the CLI: one backfill of the stale pairs, carried out here."""
    defs = build_definitions(load_params(), executor="in_process")
    entries = find_stale(defs, local_backfill.local_instance(home))
    restrict: dict[str, list[str]] = {}
    for e in entries:
        restrict.setdefault(e.asset, [])
        if e.partition is not None:
            restrict[e.asset].append(e.partition)
    keys = [dg.AssetKey.from_user_string(a) for a in restrict]
    t0 = time.perf_counter()
    out = local_backfill.materialize(defs, keys, home, {a: p for a, p in restrict.items() if p})
    seconds = time.perf_counter() - t0
    executed = sorted(
        (e.dagster_event.event_specific_data.materialization.asset_key.to_user_string(), e.dagster_event.partition)
        for r in out.runs
        for e in out.instance.all_logs(r.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    )
    return entries, executed, seconds


def _stale_set(home):
    defs = build_definitions(load_params(), executor="in_process")
    return {(e.asset, e.partition) for e in find_stale(defs, local_backfill.local_instance(home))}


def test_adding_an_ipc_reuses_ipc_independent_work(tiny_env, capsys):
    params_path = tiny_env / "params.yaml"
    _set(params_path, "ipcs", [1])
    home = tiny_env / "run_home"
    _, first, t_first = _materialize_stale(home)
    assert {a for a, _ in first} >= IPC_INDEPENDENT
    _set(params_path, "ipcs", [1, 2])
    _, second, t_second = _materialize_stale(home)
    assert second, "the new IPC must run"
    assert not ({a for a, _ in second} & IPC_INDEPENDENT), second
    assert {p for a, p in second if a != "report"} == {"2"}
    assert ("report", None) in second
    ratio = t_second / t_first
    with capsys.disabled():
        print(f"\n[incremental] IPC {{1}}: {len(first)} materializations in {t_first:.1f}s; "
              f"adding IPC 2: {len(second)} in {t_second:.1f}s (ratio {ratio:.2f})")
    assert _stale_set(home) == set()


@pytest.mark.timeout(1800)   # two full tiny graphs + stale checks: ~8 min on a loaded 2-core machine
def test_method_param_change_rebuilds_only_that_chain_and_teacher_change_everything(tiny_env):
    params_path = tiny_env / "params.yaml"
    home = tiny_env / "run_home"
    _materialize_stale(home)
    assert _stale_set(home) == set()

    from dd_assets.commands.inspection import report_freshness

    assert report_freshness(load_params(), instance=local_backfill.local_instance(home)) is None
    _set(params_path, "methods.kmeans.n_init", 3)
    stale = _stale_set(home)
    assert {a for a, _ in stale} == {"kmeans_selection", "kmeans_distilled", "kmeans_soft_labels", "kmeans_students",
                                     "utilization", "report"}  # utilization: mUE of every distilled set per IPC
    warning = report_freshness(load_params(), instance=local_backfill.local_instance(home))   # `dd-assets report` says the table is stale
    assert "STALE" in warning and "kmeans_selection[1]" in warning
    _, executed, _ = _materialize_stale(home)
    assert {(a, p) for a, p in executed} == stale
    assert report_freshness(load_params(), instance=local_backfill.local_instance(home)) is None

    _set(params_path, "teacher.lr", 0.04)
    defs = build_definitions(load_params(), executor="in_process")
    graph = defs.resolve_asset_graph()
    teacher = dg.AssetKey("teacher")
    downstream, stack = set(), [teacher]
    while stack:
        for child in graph.get(stack.pop()).child_keys:
            if child not in downstream:
                downstream.add(child)
                stack.append(child)
    expected = {("teacher", None)}
    for k in downstream:
        pdef = graph.get(k).partitions_def
        expected |= {(k.to_user_string(), p) for p in (pdef.get_partition_keys() if pdef else [None])}
    assert _stale_set(home) == expected
    assert "random_selection" not in {a for a, _ in expected}  # random never reads the teacher


def test_killed_scoring_run_resumes_without_recomputing(tiny_env):
    """A real SIGKILL of a CLI run scoring class partitions; the re-run does only the rest."""
    instance_home = tiny_env / "dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(instance_home)}
    cli = [sys.executable, "-m", "dd_assets.cli"]
    subprocess.run([*cli, "materialize", "--select", "raw_images", "manifest", "teacher"], env=env, check=True,
                   capture_output=True)
    proc = subprocess.Popen([*cli, "materialize", "--select", "rded_scores"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    instance = dg.DagsterInstance.from_config(str(instance_home))
    key = dg.AssetKey("rded_scores")
    deadline = time.time() + 120
    done: set[str] = set()
    while time.time() < deadline and proc.poll() is None:
        done = set(instance.get_materialized_partitions(key))
        if len(done) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = set(instance.get_materialized_partitions(key))
    assert 3 <= len(done) < 10
    before = {p: _count(instance, key, p) for p in done}

    subprocess.run([*cli, "materialize", "--stale", "--select", "rded_scores"], env=env, check=True, capture_output=True)
    after = set(instance.get_materialized_partitions(key))
    assert after == {str(i) for i in range(10)}
    for p in done:  # finished partitions were not recomputed
        assert _count(instance, key, p) == before[p] == 1
    for p in after - done:
        assert _count(instance, key, p) == 1
    root = DataRoot(load_params().data_root)
    for c in range(10):  # every class's table is complete and readable
        assert len(read_table(root, layout.scores("rded", c))) == 8


def _count(instance, key, partition) -> int:
    flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition])
    return len(instance.fetch_materializations(flt, limit=100).records)


def test_jobs_flag_points_to_the_backfill(tiny_env):
    """The home-made process pool (`--jobs N`) is gone: parallel partitions are Dagster's run queue
    (`--backfill`, tests/test_dask_executor.py runs it on two dask workers)."""
    cli = [sys.executable, "-m", "dd_assets.cli", "materialize", "--select", "manifest", "--jobs", "2"]
    res = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "--backfill" in res.stderr and "max_concurrent_runs" in res.stderr
