"""The per-materialization costs benchmarks/orchestration_overhead.py found (issue 19 item 4):
an asset reading every class partition looks their data versions up in batched queries, not one
query per partition, and ``load_params`` parses params.yaml only when its bytes changed. Both
must return exactly what the unbatched / uncached code returned."""

from __future__ import annotations

from types import SimpleNamespace

import dagster as dg
import yaml

from dd_assets import config
from dd_assets.defs.common import upstream_versions


def _per_key_reference(instance: dg.DagsterInstance, keys):
    """The former ``upstream_versions``: one ``fetch_materializations`` per (asset, partition)."""
    out = {}
    for name, part in keys:
        flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[part] if part else None)
        recs = instance.fetch_materializations(flt, limit=1).records
        if recs:
            mat = recs[0].asset_materialization
            out[f"{name}[{part}]" if part else name] = (mat.tags or {}).get("dagster/data_version", "?")
    return out


class CountingInstance:
    """Forwards to a real instance, counting ``fetch_materializations`` calls."""

    def __init__(self, instance: dg.DagsterInstance):
        self._instance, self.fetches = instance, 0

    def fetch_materializations(self, *args, **kwargs):
        self.fetches += 1
        return self._instance.fetch_materializations(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._instance, name)


def _report(instance, key: str, partition: str | None, version: str | None) -> None:
    tags = {"dagster/data_version": version} if version is not None else None
    instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition, tags=tags))


def test_upstream_versions_batched_equal_to_per_partition_lookups(tmp_path):
    classes = [f"c{i:03d}" for i in range(40)]
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        for i, c in enumerate(classes[:-3]):          # the last three classes: never materialized
            _report(instance, "manifest", c, f"v1-{i}")
        for i, c in enumerate(classes[:10]):          # re-materialized: the latest version wins
            _report(instance, "manifest", c, f"v2-{i}")
        _report(instance, "manifest", classes[10], None)   # latest has no data version: "?"
        _report(instance, "other", classes[0], "o")       # same partition key, another asset
        _report(instance, "teacher", None, "t1")
        _report(instance, "teacher", None, "t2")
        keys = [("manifest", c) for c in classes] + [("teacher", None), ("missing", None), ("other", classes[0]),
                                                     ("other", classes[1])]
        counting = CountingInstance(instance)
        got = upstream_versions(SimpleNamespace(instance=counting), keys)
        want = _per_key_reference(instance, keys)
        assert got == want
        assert list(got) == list(want)                    # same order too
        assert got["manifest[c000]"] == "v2-0" and got["manifest[c011]"] == "v1-11"
        assert got["manifest[c010]"] == "?" and "manifest[c039]" not in got and got["teacher"] == "t2"
        # one lookup per unpartitioned key; the 41 partitioned keys cost no per-partition fetch
        assert counting.fetches == 2


def test_upstream_versions_more_partitions_than_one_batch(tmp_path, monkeypatch):
    from dd_assets.defs import common

    monkeypatch.setattr(common, "PARTITION_BATCH", 7)
    classes = [f"c{i:02d}" for i in range(20)]
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        for i, c in enumerate(classes[::2]):
            _report(instance, "manifest", c, f"v{i}")
        keys = [("manifest", c) for c in classes]
        assert upstream_versions(SimpleNamespace(instance=instance), keys) == _per_key_reference(instance, keys)


def test_load_params_parses_an_unchanged_file_once(tiny_env, monkeypatch):
    calls = []
    real = yaml.safe_load
    monkeypatch.setattr(config.yaml, "safe_load", lambda stream: calls.append(1) or real(stream))
    monkeypatch.setattr(config, "_DOC_CACHE", {}, raising=False)
    path = config.params_path()
    first = config.load_params()
    first.raw["student"]["epochs"] = 999          # a caller mutating its copy changes no later load
    first.overrides["student"]["epochs"] = 999
    second = config.load_params()
    assert len(calls) == 1
    assert second == config.load_params(path)     # same effective parameters as a fresh parse
    assert second.raw["student"]["epochs"] != 999 and second.overrides["student"]["epochs"] != 999
    doc = yaml.safe_load(path.read_text())
    doc["profiles"]["tiny"]["student"]["epochs"] = 7
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    calls.clear()
    third = config.load_params()
    assert calls and third.raw["student"]["epochs"] == 7   # changed bytes: parsed again


def test_loading_the_definitions_does_not_import_diffusers_or_sklearn():
    """diffusers (~1.3 s) and scikit-learn (~1.7 s) are imported only where a diffusion model is
    built or k-means runs, not by every run's definitions load (benchmarks/orchestration.md: a UI
    run's cost is mostly imports)."""
    import subprocess
    import sys

    code = "import sys, dd_assets.definitions; print('diffusers' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False False"
