"""benchmarks/gpu_table.py: the one-call GPU benchmark stays runnable (tiny mode, CPU) and stays
importable on a bare GPU machine (torch, timm, numpy, pandas, pillow, pyyaml: no Dagster, Zarr,
DuckDB, MLflow, diffusers, pydantic; scikit-learn may be missing too)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dd_assets.config import PROJECT_ROOT
from dd_assets.evaluation.results import COLUMNS, read_csv

SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_table.py"
# never imported, not even tried; scikit-learn / scipy / threadpoolctl are blocked as well, so the
# run also covers the machine without them (coresets' k-means falls back to SeededKMeans)
FORBIDDEN = ("dagster", "dagster_webserver", "zarr", "duckdb", "mlflow", "diffusers", "pydantic", "fsspec",
             "dd_assets.defs", "dd_assets.storage", "dd_assets.tracking", "dd_assets.params_schema")
ABSENT = ("sklearn", "scipy", "threadpoolctl")

RUNNER = textwrap.dedent("""
    import json, runpy, sys
    script, log, forbidden, absent = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
    tried = []

    def hit(name, roots):
        return any(name == r or name.startswith(r + ".") for r in roots)

    class Block:
        def find_spec(self, name, path=None, target=None):
            if hit(name, forbidden):
                tried.append(name)
                raise ModuleNotFoundError(f"blocked on the bare GPU machine: {name}", name=name)
            return None

    preloaded = [m for m in sys.modules if hit(m, forbidden) or hit(m, absent)]
    sys.meta_path.insert(0, Block())
    for name in absent:  # not installed: `import` fails and importlib.util.find_spec says None (torch probes these)
        sys.modules[name] = None
    sys.argv = [script, *sys.argv[5:]]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    finally:
        loaded = [m for m in sys.modules if hit(m, forbidden) or (hit(m, absent) and sys.modules[m] is not None)]
        with open(log, "w") as fh:
            json.dump({"tried": tried, "loaded": loaded, "preloaded": preloaded}, fh)
    sys.exit(code)
""")


def _load_script():
    name = "gpu_table_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_table")
    runner, log, out = tmp / "runner.py", tmp / "imports.json", tmp / "out"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(runner), str(SCRIPT), str(log), ",".join(FORBIDDEN), ",".join(ABSENT),
         "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(log.read_text()), out


def test_tiny_run_writes_the_results_schema(tiny_run):
    proc, _imports, out = tiny_run
    rows = read_csv(out / "results.csv")
    assert list(rows.columns) == COLUMNS
    assert {"random", "rded", "herding", "kmeans"} <= set(rows["method"])
    assert set(rows["ipc"]) == {1, 2}
    # NRR-DD (FKD labels, DBR labels on the same images) and FocusDC, at both tiny IPCs
    for method, labels in (("nrr", "fkd"), ("nrr_dbr", "dbr"), ("focusdc", "fkd")):
        got = rows[(rows["method"] == method) & (rows["labels"] == labels)]
        assert set(got["ipc"]) == {1, 2}, method
        assert (got["base_method"] == method.split("_")[0]).all()
    # the cifar10 profile's variants run too; nrr_ra is its own recipe (Supp. A.2's RandAugment views)
    assert {"nrr_ra", "nrr_cidd", "nrr_lr", "focusdc_m4n0", "focusdc_m0n4", "focusdc_m2n2"} <= set(rows["method"])
    # EDF (its Table 4 ablation rows) and UDD (its ablation rows and the 10x budget probe), at both tiny IPCs
    for method, base in (("edf", "edf"), ("mtt", "edf"), ("edf_cpd", "edf"), ("edf_dae", "edf"), ("udd", "udd"),
                         ("udd_dc", "udd"), ("udd_response", "udd"), ("udd_jitter", "udd"), ("udd_dc_x10", "udd")):
        got = rows[(rows["method"] == method) & (rows["labels"] == "fkd")]
        assert set(got["ipc"]) == {1, 2}, method
        assert (got["base_method"] == base).all(), method
    assert rows.loc[rows["method"] == "nrr_ra", "recipe"].str.endswith("-ra2m9").all()
    assert set(rows.loc[rows["method"] == "nrr_lr", "labels"]) == {"dbr"}
    rnd = rows[(rows["method"] == "random") & (rows["labels"] == "fkd")]
    assert (rnd["draws"] == 3).all() and (rnd["n"] == 3).all()   # random, random_d1, random_d2 pooled
    hard = rows[rows["labels"] == "hard"]
    assert set(hard["method"]) == {"random", "rded"}               # the cifar10 profile's eval.hard_labels
    assert rows["full_data_pct"].notna().all()
    assert rows.loc[(rows["method"] == "rded") & (rows["labels"] == "fkd") & (rows["epochs"] == 2), "hlr_pts"].notna().all()
    assert rows["test_pct_mean"].between(0, 100).all()
    students = (out / "students.csv").read_text().splitlines()
    # per IPC: 3 random draws x 2 budgets + 1 hard (eval.hard_labels names the entry `random`, not its
    # draws), rded 2 + 1 hard, herding 2, kmeans 2 = 14; + 5 NRR-DD, 4 FocusDC, 4 EDF, 5 UDD entries x 2 = 50
    assert len(students) - 1 == 100
    timings = (out / "timings.csv").read_text().splitlines()
    assert timings[0].startswith("stage,what,seconds")
    stages = {line.split(",")[0] for line in timings[1:]}
    assert {"read_tarballs", "decode_images", "teacher_train", "rded_scores", "teacher_features", "distill",
            "soft_labels", "students", "results", "cam_maps", "cidd_scores", "nrr_refine", "vit_scorer_train",
            "focusdc_attention", "expert_trajectories", "expert_accuracy", "comp_dd_complexity", "edf_distill",
            "udd_distill"} <= stages
    # refinement: nrr (its images shared by nrr_dbr, nrr_ra) and nrr_lr at each IPC; nrr_cidd: refine false
    assert sum(line.startswith("nrr_refine,") for line in timings[1:]) == 4
    # EDF: the experts are trained once and shared by the 4 entries x 2 IPCs, as the assets share them
    tdf = pd.read_csv(out / "timings.csv")
    assert (tdf["stage"] == "expert_trajectories").sum() == 1 and (tdf["stage"] == "comp_dd_complexity").sum() == 1
    assert tdf.loc[tdf["stage"] == "expert_trajectories", "what"].tolist() == ["2 experts x 3 epochs"]
    edf = tdf[tdf["stage"] == "edf_distill"]
    assert sorted(edf["what"]) == sorted(f"{m} ipc{i}" for m in ("edf", "mtt", "edf_cpd", "edf_dae") for i in (1, 2))
    assert (edf["iterations"] == 3).all() and (edf["syn_steps"] == 3).all()   # the tiny overrides
    # UDD: one run per entry and IPC; in tiny mode udd_dc_x10 (udd_dc with 50 iterations) gets the same
    # 1 iteration as udd_dc, so its images are udd_dc's (images_source), computed once
    udd = tdf[tdf["stage"] == "udd_distill"]
    assert sorted(udd["what"]) == sorted(f"{m} ipc{i}" for m in ("udd", "udd_dc", "udd_response", "udd_jitter")
                                         for i in (1, 2))
    assert (udd["iterations"] == 1).all() and (udd["inner_steps"] == 2).all()
    assert {"udd_dc_x10 ipc1 (images of udd_dc)", "udd_dc_x10 ipc2 (images of udd_dc)"} <= set(tdf["what"])
    assert "seconds per stage" in proc.stdout and "| method | IPC |" in proc.stdout
    # bulk by default: every student of one IPC and budget in one vmapped group (e.g. "ipc1 e2 x9")
    groups = [line.split(",") for line in timings[1:] if line.startswith("students,")]
    assert groups and all(" x" in g[1] for g in groups)
    assert sum(int(g[1].rsplit(" x", 1)[1]) for g in groups) == 100
    info = json.loads((out / "run.json").read_text())
    assert (info["student_batch"], info["render"], info["precision"]) == (0, "exact", "fp32")
    assert info["vit_scorer"].startswith("trained here")       # tiny: the shared ViT knows 10 classes
    assert {"nrr", "nrr_dbr", "focusdc"} <= set(info["entries"])
    assert "nrr_dbr" not in info["skipped_entries"] and "ddps" in info["skipped_reasons"]
    assert "focusdc+dft" in info["not_run"]
    assert {"edf", "mtt", "edf_cpd", "edf_dae", "udd", "udd_dc", "udd_dc_x10"} <= set(info["entries"])
    # DDPS has a function, but diffusers is blocked here (as on a bare GPU machine): skipped, the rest ran
    reason = "needs diffusers: carry its wheel (benchmarks/README.md)"
    assert info["skipped_reasons"] == {"ddps": reason, "ddps_nocluster": reason, "ddps_flip": reason}
    assert info["ddps_diffusion"] is None and not {"diffusion_train", "ddps_scores"} & stages
    assert (info["edf_experts"]["experts"], info["edf_experts"]["epochs"]) == (2, 3)
    assert len(info["edf_experts"]["val_acc_last_epoch"]) == 2
    assert set(info["comp_dd_class_complexity"]) == {"airplane", "automobile"}   # the tiny run's 2 classes
    assert all(0.0 <= v <= 1.0 for v in info["comp_dd_class_complexity"].values())


def test_nrr_cidd_keys_match_the_asset_piece():
    """The script shares CIDD scores between NRR-DD entries exactly as the assets do."""
    from dd_assets.defs.methods.nrr import CIDD_KEYS

    assert _load_script().NRR_CIDD_KEYS == CIDD_KEYS


def test_tiny_run_one_at_a_time_agrees_with_bulk(tiny_run, tmp_path):
    """``--student-batch 1`` (the assets' loop) trains the same students as the bulk default
    (equal up to float rounding: the same selected epoch and, at tiny sizes, the same accuracy)."""
    _proc, _imports, out = tiny_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--synthetic", "--ipcs", "1",
                           "--methods", "random", "rded", "--student-batch", "1", "--out", str(tmp_path / "one")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bulk = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--synthetic", "--ipcs", "1",
                           "--methods", "random", "rded", "--out", str(tmp_path / "bulk")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert bulk.returncode == 0, bulk.stdout[-3000:] + bulk.stderr[-3000:]
    import pandas as pd

    one, many = (pd.read_csv(tmp_path / d / "students.csv").sort_values(["method", "seed", "epochs", "label_mode"])
                 .reset_index(drop=True) for d in ("one", "bulk"))
    assert len(one) == len(many) == 6   # random, rded: 2 budgets + 1 hard-label student each
    assert (one["best_epoch"].to_numpy() == many["best_epoch"].to_numpy()).all()
    np.testing.assert_allclose(one["val_acc"], many["val_acc"], atol=1e-9)
    np.testing.assert_allclose(one["test_acc"], many["test_acc"], atol=1e-9)


def test_tiny_run_imports_nothing_a_bare_gpu_machine_lacks(tiny_run):
    _proc, imports, out = tiny_run
    assert imports["preloaded"] == []
    # the one probe: DDPS's `import diffusers` (refused, so its entries were skipped); nothing else tried
    assert set(m for m in imports["tried"] if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)) <= {"diffusers"}
    assert imports["loaded"] == []
    info = json.loads((out / "run.json").read_text())
    assert info["kmeans"].startswith("SeededKMeans")   # scikit-learn was blocked
    assert info["device"] == "cpu" and info["tiny"] is True


def test_tiny_ddps_run_with_diffusers(tmp_path):
    """With diffusers importable (not blocked), DDPS runs as the assets do: one diffusion model,
    ``ddps_scores`` once (``ddps_flip`` shares it), ``dift_features`` / ``ddps_clusters`` once per
    owner (``ddps_nocluster`` shares ``ddps``'s); the level keys are the asset piece's."""
    pytest.importorskip("diffusers")
    from dd_assets.defs.methods.ddps import LEVELS

    mod = _load_script()
    assert (mod.DDPS_SCORE_KEYS, mod.DDPS_FEATURE_KEYS, mod.DDPS_CLUSTER_KEYS) == (
        LEVELS["ddps_scores"], LEVELS["dift_features"], LEVELS["ddps_clusters"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("OUT", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--synthetic", "--ipcs", "1",
                           "--methods", "random", "ddps", "ddps_nocluster", "ddps_flip", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_csv(out / "results.csv")
    for method in ("ddps", "ddps_nocluster", "ddps_flip"):
        got = rows[(rows["method"] == method) & (rows["labels"] == "fkd")]
        assert set(got["ipc"]) == {1} and len(got) == 2, method     # the main budget + the 1-epoch budget
        assert (got["base_method"] == "ddps").all() and got["test_pct_mean"].between(0, 100).all()
    tdf = pd.read_csv(out / "timings.csv")
    per = tdf.groupby("stage")["what"].apply(list).to_dict()
    assert per["diffusion_train"] == ["3 steps x 16"]                   # the tiny diffusion block
    assert per["ddps_scores"] == ["ddps"]                               # shared by ddps_flip (same scoring keys)
    assert sorted(per["dift_features"]) == sorted(per["ddps_clusters"]) == ["ddps", "ddps_flip"]
    assert (tdf.loc[tdf["stage"] == "ddps_scores", "n_draws"] == 2).all()
    info = json.loads((out / "run.json").read_text())
    assert info["entries"] == ["random", "ddps", "ddps_nocluster", "ddps_flip"]
    assert not any(m.startswith("ddps") for m in info["skipped_reasons"])
    assert info["ddps_diffusion"]["steps"] == 3 and info["ddps_diffusion"]["train_images"] == 54


def test_seeded_kmeans_and_synthetic_splits():
    mod = _load_script()
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(0, 0.5, (20, 2)) for c in centres])
    km = mod.SeededKMeans(3, random_state=0, n_init=3).fit(x)
    groups = {tuple(np.unique(km.labels_[i * 20:(i + 1) * 20])) for i in range(3)}
    assert len(groups) == 3 and all(len(g) == 1 for g in groups)
    again = mod.SeededKMeans(3, random_state=0, n_init=3).fit(x)
    assert np.array_equal(km.labels_, again.labels_)
    coresets, impl, cls = mod.import_coresets("torch")
    before = coresets.KMeans
    with mod.kmeans_with(coresets, cls):
        picks = coresets.kmeans_select(x, 3, seed=0, n_init=3)
    assert coresets.KMeans is before                       # swapped for the call only
    assert impl.startswith("SeededKMeans") and len(set(picks.tolist())) == 3
    data = {"image_size": 32, "val_fraction": 0.1, "split_seed": 0, "max_per_class": 30, "test_fraction": 0.0}
    tr, va, te, origin = mod.build_splits(data, ["a", "b"], None, True, 1, mod.Timer(torch.device("cpu")))
    assert origin.startswith("synthetic")
    assert (len(tr.labels), len(va.labels), len(te.labels)) == (54, 6, 60)
    assert tr.images.dtype == np.uint8 and tr.images.shape[1:] == (3, 32, 32)
    assert len(set(tr.source_ids) | set(va.source_ids) | set(te.source_ids)) == 120
