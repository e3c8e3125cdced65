"""Tables in Polars (issue 20, item 6) without moving a data version: a table's content hash -- the
asset's data version -- is the same whether pandas or Polars built the frame, and the report's
numbers are pandas' bit for bit."""

import math

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dd_assets.storage import DataRoot
from dd_assets.storage.tables import arrow_table, read_table_pl, read_tables_pl, write_table

NAN = float("nan")

#: every kind of column the tables hold, with missing values: (pandas values, Polars dtype)
COLUMNS = {
    "s": (["a", "bé", "c"], pl.String),
    "s_null": (["x", None, "z"], pl.String),
    "i64": ([1, -2, 3], pl.Int64),
    "i32": (np.array([1, 2, 3], np.int32), pl.Int32),
    "f64": ([1.5, NAN, -0.0], pl.Float64),
    "f32": (np.array([0.25, NAN, 3.0], np.float32), pl.Float32),
    "b": ([True, False, True], pl.Boolean),
    "b_null": ([True, None, False], pl.Boolean),
    "l_int": ([[1, 2], [], [3]], pl.List(pl.Int64)),
    "l_str": ([["a"], ["b", "c"], []], pl.List(pl.String)),
    "l_f64": ([[1.0, NAN], [2.0], []], pl.List(pl.Float64)),
}


def _pandas() -> pd.DataFrame:
    return pd.DataFrame({k: v for k, (v, _) in COLUMNS.items()})


def _polars() -> pl.DataFrame:
    return pl.DataFrame([pl.Series(k, list(v), dt, strict=False) for k, (v, dt) in COLUMNS.items()])


def _file_schema(root: DataRoot, rel: str) -> pa.Schema:
    return pq.read_schema(root.local(rel)).remove_metadata()


@pytest.mark.parametrize("cols", [[c] for c in COLUMNS] + [list(COLUMNS)], ids=lambda c: "+".join(c) if len(c) < 3 else "all")
def test_polars_and_pandas_frames_write_the_same_table(tmp_path, cols):
    """Same content -> same hash, same file schema, same values, for every column kind."""
    root = DataRoot(str(tmp_path))
    h_pd = write_table(root, "pd.parquet", _pandas()[cols], metadata={"run_id": "1"})
    h_pl = write_table(root, "pl.parquet", _polars().select(cols), metadata={"run_id": "2"})
    assert h_pd == h_pl
    assert _file_schema(root, "pd.parquet").equals(_file_schema(root, "pl.parquet"))
    assert pq.read_table(root.local("pd.parquet")).replace_schema_metadata(None).equals(
        pq.read_table(root.local("pl.parquet")).replace_schema_metadata(None))
    # the provenance is kept either way
    assert pq.read_schema(root.local("pl.parquet")).metadata[b"dd_assets.run_id"] == b"2"


def test_the_arrow_types_are_pandas_conventions():
    """The types a pandas 3 frame has always stored: large_string columns, list (not large_list)
    cells with string items, NaN stored as null (also inside lists)."""
    t = arrow_table(_polars())
    assert t.schema.field("s").type == pa.large_string()
    assert t.schema.field("l_int").type == pa.list_(pa.int64())
    assert t.schema.field("l_str").type == pa.list_(pa.string())
    assert t.schema.field("i32").type == pa.int32() and t.schema.field("f32").type == pa.float32()
    assert t.column("f64").null_count == 1 and t.column("f32").null_count == 1
    assert t.column("l_f64").to_pylist()[0] == [1.0, None]
    assert t.schema.metadata is None


def test_hash_exclude_and_declared_schema_apply_to_polars(tmp_path):
    root = DataRoot(str(tmp_path))
    df = pl.DataFrame({"a": [1, 2], "run": ["x", "y"]})
    assert (write_table(root, "a.parquet", df, hash_exclude=("run",))
            == write_table(root, "b.parquet", df.with_columns(run=pl.lit("z")), hash_exclude=("run",))
            == write_table(root, "c.parquet", df.to_pandas().assign(run="q"), hash_exclude=("run",)))
    # an untyped (all-missing) pandas column is Arrow null; a declared schema says so for Polars
    legacy = pd.DataFrame({"a": [1, 2], "note": [None, None]})
    schema = pa.schema([("a", pa.int64()), ("note", pa.null())])
    assert write_table(root, "d.parquet", legacy) == write_table(root, "e.parquet", df.with_columns(note=pl.lit(None)).drop("run"),
                                                                 schema=schema)
    with pytest.raises(TypeError, match="pandas or Polars"):
        write_table(root, "f.parquet", {"a": [1]})


def test_read_table_pl_and_concat(tmp_path):
    root = DataRoot(str(tmp_path))
    write_table(root, "t/1.parquet", _pandas())
    write_table(root, "t/2.parquet", _polars().select("s", "i64"))
    one = read_table_pl(root, "t/1.parquet")
    assert one.schema["s"] == pl.String and one.schema["l_str"] == pl.List(pl.String)
    assert one["f64"].null_count() == 1   # NaN was stored as null
    both = read_tables_pl(root, ["t/1.parquet", "t/2.parquet"])
    assert both.height == 6 and both["f64"].null_count() == 4 and both.columns == list(COLUMNS)
    assert read_table_pl(root, "t/1.parquet", columns=["i64"]).columns == ["i64"]
    assert read_tables_pl(root, []).is_empty()
    with pytest.raises(FileNotFoundError, match="materialize"):
        read_table_pl(root, "t/none.parquet")


# -- the tables of the graph --------------------------------------------------------------------


def test_manifest_polars_stores_and_reads_as_pandas(tmp_path):
    """The manifest built in Polars stores what the pandas manifest stored; the Polars reader gives
    the values the pandas reader gave."""
    from dd_assets.data.manifest import COLUMNS as MANIFEST_COLUMNS
    from dd_assets.data.manifest import assign_splits, build_class_manifest
    from dd_assets.defs.io import read_class_manifest_pl
    from tests.test_manifest import _folder

    data = _folder(tmp_path / "images")
    cm = build_class_manifest(data, "dög", 1)
    assert isinstance(cm.frame, pl.DataFrame) and cm.frame.columns == MANIFEST_COLUMNS
    legacy = pd.DataFrame(cm.frame.to_dicts(), columns=MANIFEST_COLUMNS)   # the pandas frame the old code built
    root = DataRoot(str(tmp_path / "root"))
    assert write_table(root, "a.parquet", cm.frame) == write_table(root, "b.parquet", legacy)
    # assign_splits: pandas in, pandas out (the benchmark script); Polars in, Polars out
    raw = legacy.assign(split="train").sample(frac=1, random_state=0)
    a = assign_splits(raw, data, 1, has_test_dir=False)
    b = assign_splits(pl.from_pandas(raw), data, 1, has_test_dir=False)
    assert isinstance(a, pd.DataFrame) and isinstance(b, pl.DataFrame)
    pd.testing.assert_frame_equal(a, b.to_pandas())
    assert a["source_id"].is_monotonic_increasing
    # the per-class readers
    from dd_assets.storage import layout

    write_table(root, layout.manifest(1), cm.frame)
    with root.fs.open(root.path(layout.manifest(1)), "rb") as fh:
        before = pq.read_table(fh).to_pandas()   # what the pandas reader returned before Polars
    got = read_class_manifest_pl(root, 1, ("train", "val"))
    want = before[before["split"].isin(("train", "val"))].reset_index(drop=True)
    pd.testing.assert_frame_equal(got.to_pandas(), want, check_exact=True)
    assert read_class_manifest_pl(root, 1, ("test",)).height == int((before["split"] == "test").sum())


def test_selection_rows_and_lineage_hash_as_pandas(tmp_path, monkeypatch):
    """select_rows_pl (plugin rows -> the common schema) and the lineage of compose_method store what
    the pandas code stored."""
    from dd_assets.defs import candidates, composition
    from dd_assets.methods.plugin import SELECTION_COLUMNS, ClassCandidates, interleaved

    size = 16

    class Plugin:
        name = "toy"

        @staticmethod
        def select(cfg, cands, ipc, size):
            return interleaved(cands, np.argsort(cands.score, kind="stable")[: 4 * ipc], ipc)   # NaN last

    def load(root, method, asset, cidx, cname, size_):
        n, rng = 12, np.random.default_rng(cidx)
        boxes = np.sort(rng.integers(0, size, (n, 2, 2)), axis=2).transpose(0, 2, 1).reshape(n, 4)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        score = rng.random(n).astype(np.float32)
        score[0] = np.nan   # a missing score is NaN in pandas, null in Polars
        return ClassCandidates(cidx, cname, (cidx << 32) + np.arange(n), boxes.astype(np.int32), score)

    monkeypatch.setattr(candidates, "load", load)
    sel_pl = candidates.select_rows_pl(Plugin, None, 3, None, ["a", "b"], size, "x")
    assert sel_pl.columns == SELECTION_COLUMNS and sel_pl.schema["x0"] == pl.Int32
    frames = []
    for c, n in enumerate("ab"):
        df = Plugin.select(None, load(None, "", "", c, n, size), 3, size)
        df.insert(0, "class_index", c)
        frames.append(df)
    legacy = pd.concat(frames, ignore_index=True)[SELECTION_COLUMNS]   # the old pandas selection
    root = DataRoot(str(tmp_path))
    assert write_table(root, "a.parquet", sel_pl) == write_table(root, "b.parquet", legacy)
    sel_pd = sel_pl.to_pandas()
    pd.testing.assert_frame_equal(sel_pd, legacy, check_exact=True)
    # the lineage: the pandas frame the old code built from the same rows hashes the same
    man = pl.DataFrame({"source_id": [(c << 32) + i for c in range(2) for i in range(12)],
                        "path": [f"{c}/{i}.png" for c in range(2) for i in range(12)],
                        "class_name": [n for n in "ab" for _ in range(12)], "sha256": "h",
                        "width": 32, "height": 24})
    monkeypatch.setattr(composition, "load_rows",
                        lambda rows, data: np.full((len(rows), 3, size, size), 7, np.uint8))
    sel_pd = sel_pd.assign(params_hash="p", scorer_version="v")
    images, labels, lin_pl = composition.compose_method(pl.from_pandas(sel_pd), man, {"image_size": size}, 2)
    assert isinstance(lin_pl, pl.DataFrame) and len(images) == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert lin_pl.schema == composition.LINEAGE_SCHEMA and lin_pl["score"].is_nan().sum() >= 1
    old = pd.DataFrame(lin_pl.to_dicts())   # the old code: pd.DataFrame(list of row dicts)
    assert write_table(root, "c.parquet", lin_pl) == write_table(root, "d.parquet", old)


def test_utilization_table_hashes_as_pandas(tmp_path, monkeypatch):
    from dd_assets.defs import report_assets

    class U:
        per_image = np.array([0.25, 0.5, 0.75])

    monkeypatch.setattr("dd_assets.core.utilization.set_utilization", lambda *a, **k: U)
    methods = {"random": {"method": "random"}, "rded": {"method": "rded"}}
    sets = {"random": np.zeros(1), "rded": None}
    df = report_assets.utilization_table(None, sets, ["random", "rded"], methods, 1, {"mean": 0, "std": 1}, "cpu")
    cols = list(report_assets.UTILIZATION_SCHEMA)
    root = DataRoot(str(tmp_path))
    assert df.height == 1 and df.columns == cols
    assert write_table(root, "a.parquet", df) == write_table(root, "b.parquet", pd.DataFrame(df.to_dicts(), columns=cols))
    empty = report_assets.utilization_table(None, {}, ["random"], methods, 1, {}, "cpu")
    assert write_table(root, "c.parquet", empty) == write_table(root, "d.parquet", pd.DataFrame([], columns=cols))


# -- the report's numbers -----------------------------------------------------------------------


def _pandas_summarize(students: pd.DataFrame, teacher_test_acc: float) -> pd.DataFrame:
    """The report summary as the pandas code computed it (the reference)."""
    keys = ["method", "ipc", "student", "epochs", "label_mode"]
    out = students.groupby(keys, sort=True).agg(
        acc_mean=("test_acc", "mean"), acc_std=("test_acc", lambda a: float(np.std(a, ddof=0))),
        val_mean=("val_acc", "mean"), seeds=("seed", lambda s: ",".join(str(int(x)) for x in sorted(s))),
        n_seeds=("seed", "count"), label_bytes=("label_bytes", "max"),
    ).reset_index()
    out["recovery"] = out["acc_mean"] / teacher_test_acc
    rnd = out[out["method"] == "random"].groupby(["ipc", "student", "epochs"])["acc_mean"].first()
    out["vs_random"] = [r.acc_mean - rnd.get((r.ipc, r.student, r.epochs), np.nan) for r in out.itertuples()]
    return out


def _students(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for m in ("random", "rded", "nrr", "focusdc+dft"):
        for ipc in (1, 10):
            for student in ("convnet_d3", "resnet18"):
                for lm in ("fkd", "hard") if m != "nrr" else ("fkd",):
                    for s in range(int(rng.integers(1, 7))):
                        rows.append(dict(method=m, ipc=ipc, seed=s, student=student, epochs=300, label_mode=lm,
                                         test_acc=rng.integers(0, 10000) / 10000, val_acc=rng.integers(0, 1000) / 1000,
                                         label_bytes=int(rng.integers(1, 10**6))))
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)


@pytest.mark.parametrize("seed", range(5))
def test_summary_is_pandas_bit_for_bit(tmp_path, seed):
    """Grouped means are Kahan sums as pandas' (Polars' own mean differs in the last bit for ~1 group
    in 4), so the report table's data version does not move."""
    from dd_assets.report import summarize

    st = _students(seed)
    want = _pandas_summarize(st, 0.9)
    got = summarize(pl.from_pandas(st), 0.9, pl.DataFrame())
    pd.testing.assert_frame_equal(got.to_pandas(), want, check_exact=True)
    pd.testing.assert_frame_equal(summarize(st, 0.9, pd.DataFrame()), want, check_exact=True)   # pandas in, out
    root = DataRoot(str(tmp_path))
    assert write_table(root, "a.parquet", got) == write_table(root, "b.parquet", want)


def test_report_stacks_students_as_pandas_did(tmp_path):
    """Partitions of different ages (one without ``label_bytes``): the stacked frame, and the
    summary's table, are what pandas' concat gave (an integer column with gaps is float)."""
    from dd_assets.defs.report_assets import stack_students
    from dd_assets.report import summarize

    st = _students(2)
    old = st[st["method"] == "random"].drop(columns=["label_bytes"])
    new = st[st["method"] != "random"]
    want = _pandas_summarize(pd.concat([old, new], ignore_index=True), 0.9)
    stacked = stack_students([pl.from_pandas(old), pl.from_pandas(new)])
    assert stacked.schema["label_bytes"] == pl.Float64 and stacked.schema["seed"] == pl.Int64
    got = summarize(stacked, 0.9, pl.DataFrame())
    root = DataRoot(str(tmp_path))
    assert write_table(root, "a.parquet", got) == write_table(root, "b.parquet", want)


def test_results_csv_is_what_pandas_wrote():
    from dd_assets.evaluation.results import COLUMNS as RESULT_COLUMNS
    from dd_assets.evaluation.results import markdown_table, results_rows, to_csv

    st = _students(1)
    kw = dict(dataset="X", recipe="r", main_labels="fkd", full_data_acc=0.8, commit="abc",
              params_hash={"rded": "p1", "nrr": "p2"}, recipes={"focusdc+dft": "r+dft"})
    rec_pl = results_rows(pl.from_pandas(st), {"random": "random", "focusdc": "focusdc"}, **kw)
    rec_pd = results_rows(st, {"random": "random", "focusdc": "focusdc"}, **kw)
    assert isinstance(rec_pl, pl.DataFrame) and isinstance(rec_pd, pd.DataFrame)
    pd.testing.assert_frame_equal(rec_pl.to_pandas(), rec_pd, check_exact=True)
    # quoting (a comma in a value), missing values, -0.0 and 4 decimals as pandas' to_csv
    odd = rec_pd.copy()
    odd.loc[0, "params_hash"] = "a,b"
    odd.loc[1, "commit"] = 'say "x"'
    odd.loc[2, "test_pct_std"] = -0.0
    odd.loc[3, "lrs"] = 1 / 3
    want = odd[RESULT_COLUMNS].to_csv(index=False, float_format="%.4f", lineterminator="\n")
    assert to_csv(odd) == to_csv(pl.from_pandas(odd)) == want
    assert markdown_table(rec_pl) == markdown_table(rec_pd)
    assert math.isnan(rec_pl.filter(pl.col("method") == "random")["vs_random_lo_pts"][0])


def test_sampler_and_loader_take_polars_rows(tmp_path):
    """The sampler reads Polars rows (stable sort by source_id); the loader reads Polars or pandas rows (benchmarks/imagenet_cost.py builds pandas) alike."""
    from dd_assets.data.loading import ManifestDataset
    from dd_assets.data.sampling import ClassSampler

    rows = pd.DataFrame({"source_id": [5, 3, 9, 3], "path": ["a.png", "b.png", "c.png", "d.png"], "class_index": 1})
    data = {"root": str(tmp_path), "image_size": 8}
    b = ClassSampler({1: pl.from_pandas(rows)}, data)
    assert [p.rsplit("/", 1)[1] for p in b.paths[1]] == ["b.png", "d.png", "a.png", "c.png"]
    assert b.source_ids[1].tolist() == [3, 3, 5, 9] and b.source_ids[1].dtype == np.int64
    with pytest.raises(ValueError, match="no real images"):
        ClassSampler({2: pl.from_pandas(rows).clear()}, data)
    da, db = ManifestDataset(rows, str(tmp_path), 8), ManifestDataset(pl.from_pandas(rows), str(tmp_path), 8)
    assert da.paths == db.paths and (da.labels == db.labels).all() and db.labels.dtype == np.int64


def test_gpu_benchmark_modules_run_without_polars():
    """benchmarks/gpu_table.py runs on a GPU machine with pandas and no Polars: every dd_assets
    module it imports loads, and their pandas paths (splits, the results record and its CSV) run,
    with Polars unimportable."""
    import re
    import subprocess
    import sys
    import textwrap

    from dd_assets.config import PROJECT_ROOT

    script = (PROJECT_ROOT / "benchmarks" / "gpu_table.py").read_text()
    modules = sorted(set(re.findall(r"^\s*from (dd_assets[\w.]*) import", script, re.M)))
    assert "dd_assets.data.manifest" in modules and "dd_assets.evaluation.results" in modules
    code = textwrap.dedent("""
        import importlib, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "polars" or name.startswith("polars."):
                    raise ModuleNotFoundError("no polars here", name=name)

        sys.meta_path.insert(0, Block())
        for name in sys.argv[1:]:
            importlib.import_module(name)
        import pandas as pd
        from dd_assets.data.manifest import assign_splits, source_id
        from dd_assets.evaluation.results import markdown_table, results_rows, to_csv
        from dd_assets.methods import registry
        from dd_assets.methods.plugin import SELECTION_COLUMNS, ClassCandidates

        rows = pd.DataFrame({"source_id": [source_id(0, i) for i in range(10)], "split": "train"})
        split = assign_splits(rows, {"split_seed": 0, "test_fraction": 0.2, "val_fraction": 0.25}, 0, False)
        assert sorted(split["split"].value_counts().items()) == [("test", 2), ("train", 6), ("val", 2)]
        st = pd.DataFrame([dict(method=m, ipc=1, seed=s, student="c", epochs=2, label_mode="fkd", test_acc=0.1 * s + a,
                                label_bytes=8) for m, a in (("random", 0.1), ("rded", 0.2)) for s in range(3)])
        rec = results_rows(st, {"random": "random", "rded": "rded"}, dataset="d", recipe="r", main_labels="fkd")
        assert isinstance(rec, pd.DataFrame) and to_csv(rec).count("\\n") == 3 and "rded" in markdown_table(rec)
        assert registry.get("rded") and "polars" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_student_rows_and_checks_read_polars(tmp_path):
    """Students tables built with Polars from row dicts (a resumed row first, its keys sorted as
    JSON stores them) hash as ``pd.DataFrame(rows)`` did; the students check skips a missing
    accuracy as pandas' mean did; the audit reads a null score as None."""
    from dd_assets.audit import lineage_of
    from dd_assets.defs.checks import check_students
    from dd_assets.storage import layout

    fresh = [{"method": "random", "ipc": 1, "seed": s, "student": "convnet", "epochs": 2, "label_mode": m,
              "best_epoch": 1, "val_acc": 0.5, "test_acc": 0.25 * s, "n_images": 2,
              "label_bytes": 0 if m == "hard" else 8,
              "mlflow_run_id": f"r{s}", "mlflow_link": None, "code_version": "c"} for s, m in ((1, "fkd"), (2, "hard"))]
    rows = [dict(sorted({**fresh[0], "seed": 0, "test_acc": float("nan")}.items())), *fresh]
    root = DataRoot(str(tmp_path))
    rel = layout.students("random", 1)
    assert write_table(root, rel, pl.DataFrame(rows, infer_schema_length=None)) \
        == write_table(root, "old.parquet", pd.DataFrame(rows))
    res = check_students(root, "random", 1, n_classes=10, epochs=2)
    assert res.passed and res.metadata["test_acc_mean"].value == 0.25 and res.metadata["students"].value == 2
    lin = pl.DataFrame({"method": "m", "ipc": 1, "image_index": [0, 0], "tile": [1, 0], "class_index": 3,
                        "class_name": "c", "dest_x0": 0, "dest_y0": 0, "dest_x1": 4, "dest_y1": 4,
                        "source_id": [7, 8], "source_path": ["a.png", "b.png"], "source_sha256": "h",
                        "src_x0": 0, "src_y0": 0, "src_x1": 4, "src_y1": 4, "score": [float("nan"), 0.5],
                        "params_hash": "p", "scorer_version": "v", "seed": 0, "scorer_asset": "s"})
    write_table(root, layout.lineage("m", 1), lin)
    rec = lineage_of(root, "m", 1, 0)
    assert [t["tile"] for t in rec["tiles"]] == [0, 1] and [t["score"] for t in rec["tiles"]] == [0.5, None]
    assert rec["class_name"] == "c" and rec["seed"] == 0
