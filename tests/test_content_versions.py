"""``raw_images`` / ``manifest`` data versions come from file content: replacing one image's
bytes changes ``raw_images`` and exactly its class's ``manifest`` partition; identical bytes
change nothing."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_params

CLASSES = ("ant", "bee", "cow")


def _png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder_env(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    for ci, c in enumerate(CLASSES):
        for i in range(4):
            _png(raw / "train" / c / f"{i}.png", 10 * ci + i)
    params = write_params(tmp_path, "tiny", {"data.source": "folder", "data.classes": None}, raw_root=raw)
    monkeypatch.setenv("DD_ASSETS_PARAMS", str(params))
    monkeypatch.delenv("DD_ASSETS_PROFILE", raising=False)
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(tmp_path / "artifacts"))
    return raw


def _defs():
    from dd_assets.config import load_params
    from dd_assets.defs import data_assets
    from dd_assets.defs.partitions import build_partitions
    from dd_assets.defs.resources import DDResource

    params = load_params()
    return dg.Definitions(assets=data_assets.build(params, build_partitions(params)), resources={"dd": DDResource()})


def _version(instance, name: str, part: str | None = None) -> str:
    flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[part] if part else None)
    rec = instance.fetch_materializations(flt, limit=1).records[0]
    return rec.asset_materialization.tags["dagster/data_version"]


def _materialize_all(defs, instance) -> dict[str, str]:
    assets = list(defs.assets)
    res = dg.materialize(assets, selection=[dg.AssetKey("raw_images")], instance=instance, resources=defs.resources)
    assert res.success
    for c in CLASSES:
        res = dg.materialize(assets, selection=[dg.AssetKey("manifest")], partition_key=c, instance=instance,
                             resources=defs.resources)
        assert res.success
    return {"raw_images": _version(instance, "raw_images"), **{c: _version(instance, "manifest", c) for c in CLASSES}}


def test_one_changed_image_changes_only_its_class_version(folder_env):
    from dd_assets.staleness import find_stale

    defs, instance = _defs(), dg.DagsterInstance.ephemeral()
    v0 = _materialize_all(defs, instance)
    assert len(set(v0.values())) == len(v0)  # every class has its own version

    # identical bytes rewritten (new mtime): nothing changes
    target = folder_env / "train" / "bee" / "2.png"
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(data)
    assert _materialize_all(defs, instance) == v0

    # one image of "bee" replaced: raw_images and manifest[bee] change, ant and cow do not
    _png(target, 999)
    assert target.read_bytes() != data
    res = dg.materialize(list(defs.assets), selection=[dg.AssetKey("raw_images")], instance=instance,
                         resources=defs.resources)
    assert res.success
    assert _version(instance, "raw_images") != v0["raw_images"]
    stale = {(e.asset, e.partition) for e in find_stale(defs, instance)}
    assert ("manifest", "bee") in stale  # the change is noticed (before: "everything is up to date")
    v1 = _materialize_all(defs, instance)
    assert v1["bee"] != v0["bee"]
    assert {c: v1[c] for c in ("ant", "cow")} == {c: v0[c] for c in ("ant", "cow")}
    assert not find_stale(defs, instance)

    # the fix reverted (original bytes back): the original versions come back
    target.write_bytes(data)
    assert _materialize_all(defs, instance) == v0


def test_fingerprint_streams_and_tracks_content_per_class(tmp_path, monkeypatch):
    from dd_assets.data import fingerprint

    for ci, c in enumerate(CLASSES):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", 10 * ci + i)
    v0, per0, counts = fingerprint.folder_fingerprint(tmp_path, CLASSES)
    assert counts == {c: 3 for c in CLASSES}
    reads: list[int] = []
    real_open = open

    class Spy:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

        def read(self, n=-1):
            reads.append(n)
            return self.fh.read(n)

    monkeypatch.setattr(fingerprint, "open", lambda p, m="r": Spy(real_open(p, m)), raising=False)
    monkeypatch.setattr(fingerprint, "CHUNK", 64)
    (tmp_path / "cow" / "big.bin").write_bytes(b"x" * 1000)
    v1, per1, _ = fingerprint.folder_fingerprint(tmp_path, CLASSES)
    assert reads and all(0 < n <= 64 for n in reads)  # chunked reads, never a whole file at once
    assert v1 != v0 and per1["cow"] != per0["cow"]
    assert {c: per1[c] for c in ("ant", "bee")} == {c: per0[c] for c in ("ant", "bee")}
