"""An interrupted students partition keeps its finished students (defs/student_resume.py)."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from dd_assets.config import load_params
from dd_assets.defs.student_resume import FinishedStudents
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.tables import read_table
from tests.conftest import write_params


def test_rows_are_kept_only_under_the_same_key(tmp_path):
    root = DataRoot(str(tmp_path))
    row = {"seed": 0, "test_acc": 0.5, "val_acc": 0.4}
    fs = FinishedStudents(root, "rded", 1, "cv1", {"rded_distilled": "d1"})
    assert fs.get(0, 300, "fkd", checkpoint=False) is None
    fs.put(0, 300, "fkd", row)
    assert fs.get(0, 300, "fkd", checkpoint=False) == row
    # another budget, mode or seed is another student
    assert fs.get(0, 100, "fkd", checkpoint=False) is None and fs.get(1, 300, "fkd", checkpoint=False) is None
    assert fs.get(0, 300, "hard", checkpoint=False) is None
    # a changed code version or upstream data version: nothing is reused
    assert FinishedStudents(root, "rded", 1, "cv2", {"rded_distilled": "d1"}).get(0, 300, "fkd", False) is None
    assert FinishedStudents(root, "rded", 1, "cv1", {"rded_distilled": "d2"}).get(0, 300, "fkd", False) is None
    # the main student also needs its checkpoint (FocusDC's DFT fine-tunes it)
    assert fs.get(0, 300, "fkd", checkpoint=True) is None
    root.write_bytes(layout.student_checkpoint("rded", 1, 0), b"x")
    assert fs.get(0, 300, "fkd", checkpoint=True) == row
    # a torn record is trained again, not trusted
    root.write_bytes(layout.student_done("rded", 1, 0, 300, "fkd"), b'{"key": ')
    assert fs.get(0, 300, "fkd", checkpoint=False) is None
    fs.clear()
    assert not root.exists(layout.students_done_dir("rded", 1))


@pytest.mark.slow
def test_a_rerun_after_an_interruption_trains_only_the_missing_students(tmp_path, monkeypatch):
    params_path = write_params(tmp_path, "tiny", raw_root=tmp_path / "raw",
                               overrides={"student.seeds": [0, 1], "eval.hard_labels": False, "eval.budgets": []})
    monkeypatch.setenv("DD_ASSETS_PARAMS", str(params_path))
    monkeypatch.delenv("DD_ASSETS_PROFILE", raising=False)
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    from dd_assets.definitions import build_definitions
    from dd_assets.core import student_training as training
    from dd_assets import local_backfill
    from dd_assets.orchestrate import RunFailures

    params = load_params()
    defs = build_definitions(params, executor="in_process")
    graph = defs.resolve_asset_graph()
    target = dg.AssetKey("random_students")
    ups = set()
    stack = [target]
    while stack:
        for parent in graph.get(stack.pop()).parent_keys:
            if parent not in ups:
                ups.add(parent)
                stack.append(parent)
    home = tmp_path / "dh"
    local_backfill.materialize(defs, ups, home, {"random_distilled": ["1"], "random_soft_labels": ["1"],
                                                 "random_selection": ["1"]})   # raises when a run failed
    real, calls = training.train_student, []

    def dies_on_the_second(*a, **k):
        calls.append(k.get("views"))
        if len(calls) == 2:
            raise RuntimeError("machine lost")   # the partition stops after its first student
        return real(*a, **k)

    monkeypatch.setattr(training, "train_student", dies_on_the_second)
    only = {"random_students": ["1"]}
    try:
        failed = not all(r.is_success for r in local_backfill.materialize(defs, [target], home, only).runs)
    except RunFailures:
        failed = True
    assert failed and len(calls) == 2
    root = DataRoot(params.data_root)
    assert not root.exists(layout.students("random", 1))
    assert len(root.fs.ls(root.path(layout.students_done_dir("random", 1)))) == 1   # seed 0 kept

    calls.clear()

    def counts(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(training, "train_student", counts)
    out = local_backfill.materialize(defs, [target], home, only)
    assert out.runs and all(r.is_success for r in out.runs)
    assert len(calls) == 1   # only seed 1 trained; seed 0's row was kept
    messages = [e.user_message for r in out.runs for e in out.instance.all_logs(r.run_id)]
    assert any("random IPC 1 seed 0 2 epochs fkd: kept from the interrupted run" in m for m in messages)
    # progress while a student trains: a line every ~10 % of its epochs (tiny: every epoch)
    assert any("random IPC 1 seed 1 (fkd): epoch 2/2" in m for m in messages), [m for m in messages if "epoch" in m]
    table = read_table(root, layout.students("random", 1))
    assert sorted(table["seed"]) == [0, 1] and table["test_acc"].between(0, 1).all()
    assert not root.exists(layout.students_done_dir("random", 1))   # records gone once the table is written
    assert isinstance(table, pd.DataFrame)


@pytest.mark.slow
def test_student_batch_trains_a_rows_seeds_at_once_with_the_same_results(tmp_path, monkeypatch):
    """Run config ``student_batch: 2``: the row's two seeds train in one bulk call (no
    one-at-a-time student), and the table equals the one-at-a-time table (same rows and order,
    same selected epochs and accuracies at tiny sizes; bulk differs only by float rounding)."""
    params_path = write_params(tmp_path, "tiny", raw_root=tmp_path / "raw",
                               overrides={"student.seeds": [0, 1], "eval.hard_labels": False, "eval.budgets": []})
    monkeypatch.setenv("DD_ASSETS_PARAMS", str(params_path))
    monkeypatch.delenv("DD_ASSETS_PROFILE", raising=False)
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    from dd_assets.core import bulk_students
    from dd_assets.core import student_training as training
    from dd_assets.definitions import build_definitions
    from dd_assets import local_backfill

    params = load_params()
    defs = build_definitions(params, executor="in_process")
    home = tmp_path / "dh"
    target = dg.AssetKey("random_students")
    graph = defs.resolve_asset_graph()
    ups, stack = set(), [target]
    while stack:
        for parent in graph.get(stack.pop()).parent_keys:
            if parent not in ups:
                ups.add(parent)
                stack.append(parent)
    local_backfill.materialize(defs, ups, home, {"random_distilled": ["1"], "random_soft_labels": ["1"],
                                                 "random_selection": ["1"]})   # raises when a run failed
    root = DataRoot(params.data_root)
    only = {"random_students": ["1"]}
    local_backfill.materialize(defs, [target], home, only)
    one = read_table(root, layout.students("random", 1))

    single, bulk = [], []
    real_one, real_bulk = training.train_student, bulk_students.train_students_bulk
    monkeypatch.setattr(training, "train_student", lambda *a, **k: single.append(1) or real_one(*a, **k))
    monkeypatch.setattr(bulk_students, "train_students_bulk", lambda jobs, *a, **k: bulk.append(len(jobs)) or
                        real_bulk(jobs, *a, **k))
    root.fs.rm(root.path(layout.students("random", 1)), recursive=True)
    local_backfill.materialize(defs, [target], home, only, resource_config={"student_batch": 2})
    assert single == [] and bulk == [2]
    many = read_table(root, layout.students("random", 1))
    assert list(many["seed"]) == list(one["seed"]) == [0, 1]
    assert list(many["best_epoch"]) == list(one["best_epoch"])
    pd.testing.assert_series_equal(many["test_acc"], one["test_acc"], atol=1e-9)
    pd.testing.assert_series_equal(many["val_acc"], one["val_acc"], atol=1e-9)
