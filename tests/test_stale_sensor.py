"""The UI's stale view: ``stale_sensor`` requests exactly what ``dd-assets stale`` lists, wave by wave."""

from __future__ import annotations

import dagster as dg

from dd_assets.defs.sensors import stale_sensor
from dd_assets.staleness import find_stale

PARTS = dg.StaticPartitionsDefinition(["a", "b"])


def _defs(up_version: str) -> dg.Definitions:
    @dg.asset(partitions_def=PARTS, code_version=up_version)
    def up() -> None:
        return None

    @dg.asset(partitions_def=PARTS, deps=[up], code_version="1")
    def down() -> None:
        return None

    @dg.asset(deps=[down], code_version="1")
    def total() -> None:
        return None

    return dg.Definitions(assets=[up, down, total], sensors=[stale_sensor([up, down, total])])


def _evaluate(defs: dg.Definitions, instance):
    """One tick of the real sensor, as the daemon / the UI's preview evaluates it."""
    sensor = defs.get_sensor_def("stale_sensor")
    return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()))


def _materialize(defs: dg.Definitions, instance, names: list[str], partitions=("a", "b")) -> None:
    assets = list(defs.assets)
    for name in names:
        key = dg.AssetKey(name)
        parts = partitions if name != "total" else [None]
        for p in parts:
            assert dg.materialize(assets, selection=[key], partition_key=p, instance=instance).success


def _requested(defs: dg.Definitions, instance) -> set[tuple[str, str | None]] | str:
    out = _evaluate(defs, instance)
    if not out.run_requests:
        return out.skip_message
    return {(r.asset_selection[0].to_user_string(), r.partition_key) for r in out.run_requests}


def test_a_code_change_is_requested_upstream_first_then_downstream():
    with dg.instance_for_test() as instance:
        v1 = _defs("1")
        assert _requested(v1, instance) == {("up", "a"), ("up", "b")}   # nothing yet: the roots first
        _materialize(v1, instance, ["up", "down", "total"])
        assert _requested(v1, instance) == "everything is up to date"

        v2 = _defs("2")   # a parameter of `up` changed (its code version)
        stale = {(e.asset, e.partition) for e in find_stale(v2, instance)}
        assert stale == {("up", "a"), ("up", "b"), ("down", "a"), ("down", "b"), ("total", None)}
        assert _requested(v2, instance) == {("up", "a"), ("up", "b")}   # down waits for up
        _materialize(v2, instance, ["up"], partitions=["a"])
        assert _requested(v2, instance) == {("up", "b"), ("down", "a")}   # a's chain moves on
        _materialize(v2, instance, ["up"], partitions=["b"])
        _materialize(v2, instance, ["down"])
        assert _requested(v2, instance) == {("total", None)}
        _materialize(v2, instance, ["total"])
        assert _requested(v2, instance) == "everything is up to date"


def test_run_keys_are_stable_until_something_changes():
    with dg.instance_for_test() as instance:
        v1 = _defs("1")
        keys1 = {r.run_key for r in _evaluate(v1, instance).run_requests}
        keys2 = {r.run_key for r in _evaluate(v1, instance).run_requests}
        assert keys1 == keys2 and len(keys1) == 2   # the daemon does not request them twice
        _materialize(v1, instance, ["up", "down", "total"])
        v2 = _defs("2")
        keys3 = {r.run_key for r in _evaluate(v2, instance).run_requests}
        assert keys3.isdisjoint(keys1)   # the same partitions, stale again for a new reason: new keys


def test_requests_name_the_job_of_their_partitioning():
    with dg.instance_for_test() as instance:
        v1 = _defs("1")
        dg.Definitions.validate_loadable(v1)   # mixed partitionings: one job each
        _materialize(v1, instance, ["up", "down"])
        (req,) = _evaluate(v1, instance).run_requests
        assert (req.asset_selection, req.job_name) == ([dg.AssetKey("total")], "stale_runs")


def test_the_project_registers_both_sensors_and_loads():
    from dd_assets.definitions import defs

    dg.Definitions.validate_loadable(defs)   # the stale sensor's jobs resolve (the UI loads them)
    names = {s.name for s in defs.sensors}
    assert {"stale_sensor", "orphaned_runs_sensor"} <= names
    jobs = {j.name for j in defs.get_repository_def().get_all_jobs()}
    assert {"stale_runs", "stale_runs_by_class", "stale_runs_by_ipc"} <= jobs
