"""The whole tiny graph on an S3 data root (moto's S3 server on loopback; issue 20 item 3).

Zarr groups, Parquet partitions, checkpoints, pictures and the MLflow artifact store all go to
the bucket through fsspec/s3fs (MLflow through its own S3 client); the MLflow tracking database
is a local sqlite file (MLFLOW_TRACKING_URI), the Dagster instance stays local. Nothing is
written to the working directory."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket="dd-test")
    yield endpoint
    server.stop()


def test_the_tiny_graph_writes_and_reads_on_a_loopback_s3_store(s3, tmp_path, monkeypatch):
    import mlflow
    import numpy as np
    import s3fs

    from dd_assets.config import load_params
    from dd_assets.definitions import build_definitions
    from dd_assets import local_backfill
    from dd_assets.storage import DataRoot, layout
    from dd_assets.storage.arrays import read_group
    from dd_assets.storage.tables import read_table
    from tests.conftest import write_params

    monkeypatch.setenv("DD_ASSETS_PARAMS", str(write_params(tmp_path, "tiny", raw_root=tmp_path / "raw")))
    monkeypatch.delenv("DD_ASSETS_PROFILE", raising=False)
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", "s3://dd-test/tiny")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "dh").mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)

    params = load_params()
    defs = build_definitions(params, executor="in_process")
    keys = list(defs.resolve_asset_graph().get_all_asset_keys())
    runs = local_backfill.materialize(defs, keys, tmp_path / "dh").runs
    assert runs and all(r.is_success for r in runs)

    fs = s3fs.S3FileSystem()
    stored = set(fs.find("dd-test/tiny"))

    def has(prefix):
        return any(p.startswith(f"dd-test/tiny/{prefix}") for p in stored)

    for prefix in ("manifest/", "models/teacher/checkpoint.pt", "models/expert_trajectories/trajectories.npy",
                   "models/diffusion_model/", "scores/rded/", "scores/cam_maps/", "distilled/rded/ipc=1.zarr/",
                   "labels/nrr_dbr/", "students/focusdc/ipc=2/seed=0.pt", "students/focusdc+dft/",
                   "reports/grids/udd/", "reports/results.parquet", "mlruns/"):
        assert has(prefix), f"nothing under s3://dd-test/tiny/{prefix}"
    assert not has("catalog.duckdb")   # the DuckDB catalog is for local roots only (logged skip)
    assert not any(work.iterdir()), f"written to the working directory: {list(work.iterdir())}"

    # read back through the same root
    root = DataRoot("s3://dd-test/tiny")
    summary = read_table(root, layout.REPORT_TABLE)
    assert {"random", "rded", "nrr", "ddps", "edf", "udd"} <= set(summary["method"])
    arrays, _ = read_group(root, layout.distilled("rded", 2))
    assert arrays["images"].dtype == np.uint8 and len(arrays["images"]) == 2 * 10   # IPC 2 x 10 classes
    # MLflow: runs in the local database, their artifacts in the bucket
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    report = runs[runs["tags.asset_key"] == "report"].iloc[0]
    assert report["artifact_uri"].startswith("s3://dd-test/tiny/")
    assert "results.md" in {a.path for a in mlflow.MlflowClient().list_artifacts(report["run_id"])}
