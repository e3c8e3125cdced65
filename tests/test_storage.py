from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dd_assets.storage import DataRoot
from dd_assets.storage.arrays import read_group, write_group
from dd_assets.storage.tables import read_table, refresh_catalog, write_table


def test_atomic_dir_keeps_old_version_when_writer_fails(tmp_path):
    root = DataRoot(str(tmp_path))
    write_group(root, "g.zarr", {"a": np.arange(5)})
    with pytest.raises(RuntimeError):
        with root.atomic_dir("g.zarr"):
            (tmp_path / "partial").write_text("x")
            raise RuntimeError("killed mid-write")
    arrays, attrs = read_group(root, "g.zarr")
    np.testing.assert_array_equal(arrays["a"], np.arange(5))
    assert attrs["schema_version"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_zarr_round_trip_and_content_hash(tmp_path):
    root = DataRoot(str(tmp_path))
    imgs = np.random.default_rng(0).integers(0, 255, (7, 3, 4, 4), dtype=np.uint8)
    h1 = write_group(root, "x.zarr", {"images": imgs, "labels": np.arange(7)}, attrs={"k": "v"}, chunk_rows=3)
    h2 = write_group(root, "y.zarr", {"images": imgs, "labels": np.arange(7)}, attrs={"k": "other"})
    assert h1 == h2  # the hash covers content, not attrs or chunking
    got, attrs = read_group(root, "x.zarr")
    np.testing.assert_array_equal(got["images"], imgs)
    assert attrs["k"] == "v" and attrs["content_hash"] == h1
    imgs[0, 0, 0, 0] ^= 1
    assert write_group(root, "z.zarr", {"images": imgs, "labels": np.arange(7)}) != h1


def test_table_hash_ignores_metadata_and_excluded_columns(tmp_path):
    root = DataRoot(str(tmp_path))
    df = pd.DataFrame({"a": [1, 2], "run": ["x", "y"]})
    h1 = write_table(root, "t1.parquet", df, metadata={"run_id": "1"}, hash_exclude=("run",))
    h2 = write_table(root, "t2.parquet", df.assign(run=["p", "q"]), metadata={"run_id": "2"}, hash_exclude=("run",))
    assert h1 == h2
    assert write_table(root, "t3.parquet", df.assign(a=[1, 3])) != write_table(root, "t4.parquet", df)
    pd.testing.assert_frame_equal(read_table(root, "t1.parquet"), df)


def test_missing_artifact_error_names_path(tmp_path):
    root = DataRoot(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothere.parquet.*materialize"):
        read_table(root, "nothere.parquet")


def test_duckdb_catalog_views(tmp_path):
    import duckdb

    root = DataRoot(str(tmp_path))
    write_table(root, "s/m1.parquet", pd.DataFrame({"x": [1, 2]}))
    write_table(root, "s/m2.parquet", pd.DataFrame({"x": [3]}))
    path = refresh_catalog(root, {"s": "s/*.parquet", "empty": "none/*.parquet"})
    con = duckdb.connect(path, read_only=True)
    assert con.execute("select sum(x) from s").fetchone()[0] == 6
    con.close()


def test_unwritable_root_is_reported(tmp_path):
    # A root below a regular file cannot be created, whoever runs the test (root included).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    root = DataRoot(str(blocker / "sub"))
    with pytest.raises(PermissionError, match="not writable.*DD_ASSETS_DATA_ROOT"):
        root.check_writable()
