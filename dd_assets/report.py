"""The results report: method x IPC x student -> accuracy mean ± std, recovery ratio vs the
full-data teacher, improvement over the random real subset under the same evaluation,
label bytes and wall times.  No Dagster imports (the CLI prints it too)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
import polars as pl

from dd_assets.storage import DataRoot
from dd_assets.storage.tables import as_polars

KEYS = ["method", "ipc", "student", "epochs", "label_mode"]


def _kahan(values: Iterable[float]) -> tuple[float, int]:
    """(sum, count) of the non-missing ``values``, summed in order with Kahan compensation: pandas'
    grouped ``sum`` / ``mean``, bit for bit (the report's numbers -- and its data version -- do not
    depend on which library grouped the rows)."""
    total = comp = 0.0
    n = 0
    for v in values:
        if v is None or v != v:
            continue
        y = float(v) - comp
        t = total + y
        comp = t - total - y
        if comp != comp:   # an infinite value: no compensation (as pandas)
            comp = 0.0
        total = t
        n += 1
    return total, n


def kahan_mean(values: Iterable[float]) -> float:
    """pandas' grouped ``mean`` of ``values`` (NaN when none is present)."""
    total, n = _kahan(values)
    return total / n if n else float("nan")


def kahan_sum(values: Iterable[float]) -> float:
    """pandas' grouped ``sum`` of ``values`` (0 when none is present)."""
    return _kahan(values)[0]


def _std0(values: Iterable[float]) -> float:
    """Population standard deviation of the non-missing ``values`` (``np.std(ddof=0)``)."""
    a = np.asarray([v for v in values if v is not None and v == v], np.float64)
    return float(np.std(a, ddof=0)) if len(a) else float("nan")


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def summarize(students: pl.DataFrame | pd.DataFrame, teacher_test_acc: float,
              timings: pl.DataFrame | pd.DataFrame) -> pl.DataFrame | pd.DataFrame:
    """One row per (method, IPC, student, epochs, label mode), sorted by these: accuracy mean ±
    std over seeds, recovery vs the teacher, gain over the random row, ``chain_seconds`` when
    there are timings.  Polars ``students`` give Polars, pandas give pandas."""
    st, tm = as_polars(students), as_polars(timings)
    g = (st.drop_nulls(KEYS).sort(KEYS, maintain_order=True)
         .group_by(KEYS, maintain_order=True)
         .agg(pl.col("test_acc").alias("_acc"), pl.col("val_acc").alias("_val"),
              pl.col("seed").drop_nulls().alias("_seed"), pl.col("label_bytes").max()))
    acc = [kahan_mean(a) for a in g["_acc"].to_list()]
    out = g.select(
        *KEYS,
        pl.Series("acc_mean", acc, pl.Float64),
        pl.Series("acc_std", [_std0(a) for a in g["_acc"].to_list()], pl.Float64),
        pl.Series("val_mean", [kahan_mean(a) for a in g["_val"].to_list()], pl.Float64),
        pl.Series("seeds", [",".join(str(int(x)) for x in sorted(s)) for s in g["_seed"].to_list()], pl.String),
        pl.col("_seed").list.len().cast(pl.Int64).alias("n_seeds"),
        "label_bytes",
    )
    # numpy's division (Polars may multiply by the reciprocal: another last bit)
    recovery = np.asarray(acc, np.float64) / teacher_test_acc if teacher_test_acc > 0 else np.full(len(acc), np.nan)
    out = out.with_columns(pl.Series("recovery", recovery, pl.Float64))
    # The random real subset is evaluated with the profile's label mode; methods with their own
    # labels (DBR, DFT's online teacher) are compared with that same random row.
    rnd = (out.filter((pl.col("method") == "random") & pl.col("acc_mean").is_not_nan())
           .group_by(["ipc", "student", "epochs"], maintain_order=True).agg(pl.col("acc_mean").first().alias("_rnd")))
    out = (out.join(rnd, on=["ipc", "student", "epochs"], how="left", maintain_order="left", nulls_equal=True)
           .with_columns((pl.col("acc_mean") - pl.col("_rnd").fill_null(float("nan"))).alias("vs_random"))
           .drop("_rnd"))
    if tm.height:
        assets, parts = tm["asset"].to_list(), tm["partition"].to_list()
        secs = tm["seconds"].cast(pl.Float64).to_numpy()
        chain = []
        for method, ipc in out.select("method", "ipc").iter_rows():
            names, part = chain_assets(method), str(ipc)
            hit = np.asarray([a in names and p == part for a, p in zip(assets, parts, strict=True)], bool)
            chain.append(float(np.nansum(secs[hit])))
        out = out.with_columns(pl.Series("chain_seconds", chain, pl.Float64))
    return out.to_pandas() if isinstance(students, pd.DataFrame) else out


#: The per-IPC assets of one methods entry's chain (the "chain wall" column sums them).
CHAIN_STAGES = ("selection", "distilled", "soft_labels", "students")


def chain_assets(row_method: str) -> set[str]:
    """Asset names of a report row's chain at one IPC: ``<entry>_<stage>`` exactly, so an entry
    never counts the assets of entries that extend its name (``udd`` vs ``udd_dc``); a
    ``<entry>+dft`` row is its fine-tuning students only."""
    if row_method.endswith("+dft"):
        return {f"{row_method[:-len('+dft')]}_dft_students"}
    return {f"{row_method}_{stage}" for stage in CHAIN_STAGES}


TIMINGS_SCHEMA = pl.Schema({"asset": pl.String, "partition": pl.String, "seconds": pl.Float64, "run_id": pl.String})


def read_timings(root: DataRoot) -> pl.DataFrame:
    """One row per timed asset run (``timings/<asset>/*.json``): asset, partition ('' when
    unpartitioned), seconds, run id."""
    rows = []
    for path in root.fs.glob(root.path("timings/*/*.json")):
        with root.fs.open(path, "rb") as fh:
            t = json.loads(fh.read())
        part = t.get("partition")
        rows.append((t.get("asset"), "" if part is None or (isinstance(part, float) and math.isnan(part)) else str(part),
                     None if t.get("seconds") is None else float(t["seconds"]),
                     None if t.get("run_id") is None else str(t["run_id"])))
    return pl.DataFrame(rows, schema=TIMINGS_SCHEMA, orient="row")


def _records(df: pl.DataFrame | pd.DataFrame) -> list[dict]:
    return as_polars(df).to_dicts()


def _finite(v) -> bool:
    return v is not None and bool(np.isfinite(v))


#: Picture folders under ``reports/`` that show a method's mechanism (one picture per folder is
#: linked first): CAM / attention / score overlays, DDPS's clusters, training curves.
MECHANISM_KINDS = ("overlays", "clusters", "curves")


def first_pictures(paths: Iterable[str], methods: list[str], ipcs: list[int]) -> list[tuple[str, str]]:
    """``(caption, path)`` of the pictures a person looks at first, from the picture files under
    ``reports/`` (``paths`` relative to it, e.g. ``grids/rded/ipc=10.png``): each method's
    distilled images at its largest IPC present (methods order), then the first picture of every
    mechanism folder (:data:`MECHANISM_KINDS`, sorted)."""
    have = set(paths)
    out: list[tuple[str, str]] = []
    for m in methods:
        for ipc in sorted(ipcs, reverse=True):
            rel = f"grids/{m}/ipc={int(ipc)}.png"
            if rel in have:
                out.append((f"`{m}` distilled images, IPC {int(ipc)}", rel))
                break
    for kind in MECHANISM_KINDS:
        firsts: dict[str, str] = {}
        for rel in sorted(have):
            parts = rel.split("/")
            if len(parts) == 3 and parts[0] == kind:
                firsts.setdefault(parts[1], rel)
        out += [(f"`{owner}` {kind[:-1]} ({rel.rsplit('/', 1)[-1][:-4]})", rel) for owner, rel in firsts.items()]
    return out


def markdown(summary: pl.DataFrame | pd.DataFrame, teacher: dict, timings: pl.DataFrame | pd.DataFrame,
             dataset: str, record: pl.DataFrame | pd.DataFrame | None = None,
             pictures: list[tuple[str, str]] | None = None) -> str:
    """The report's markdown; ``pictures`` (:func:`first_pictures`, paths relative to the file)
    become a "Look first" section of links."""
    lines = [
        f"# dd_assets results — {dataset}",
        "",
        f"Teacher `{teacher.get('arch')}`: val {100 * teacher['val_acc']:.2f}%, test {100 * teacher['test_acc']:.2f}% "
        f"(epoch {teacher.get('best_epoch')} selected on val; {teacher.get('train_images')} train images).",
        "",
        "Students are trained from scratch on each distilled set; the epoch is selected on the "
        "validation split carved from train, and the test top-1 is reported as mean ± std over seeds.",
        "",
    ]
    if pictures:
        lines += ["## Look first", "",
                  "What each method made, and the maps it chose its regions by (files beside this one):", ""]
        lines += [f"- [{caption}]({rel})" for caption, rel in pictures]
        lines.append("")
    if record is not None and len(record):
        from dd_assets.evaluation.results import markdown_table

        r0 = _records(record)[0]
        full = _nan(r0["full_data_pct"])
        lines += [
            "## Results and DD-Ranking metrics",
            "",
            f"Recipe `{r0['recipe']}` for every row. `random` pools every random draw x student seed; each other "
            "row is compared with it seed by seed (mean paired difference, two-sided 95 % t-interval; "
            "\"beats random\" = the interval excludes 0). IOR and HLR in percentage points, LRS in [0, 1] "
            f"(w = 0.5, from fractions). Full-data hard-label student: "
            f"{f'{full:.2f} %' if np.isfinite(full) else 'not trained'}.",
            "",
            markdown_table(record).rstrip("\n"),
            "",
            "## Diagnostics at the main budget",
            "",
        ]
    lines += [
        "| method | IPC | student | epochs | labels | test acc (%) | seeds | recovery | label bytes "
        "| teacher agrees: images / tiles (%) | chain wall (s) | mUE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in _records(summary):
        agree = (f"{100 * r['teacher_image_agree']:.0f} / {100 * _nan(r['teacher_tile_agree']):.0f}"
                 if _finite(r.get("teacher_image_agree")) else "–")
        mue = _nan(r.get("mue"))
        lines.append(
            f"| {r['method']} | {r['ipc']} | {r['student']} | {r['epochs']} | {r['label_mode']} "
            f"| {100 * _nan(r['acc_mean']):.2f} ± {100 * _nan(r['acc_std']):.2f} "
            f"| {r['seeds']} | {_nan(r['recovery']):.3f} | {int(r['label_bytes']):,} | {agree} | "
            f"{_nan(r.get('chain_seconds')):.1f} | {f'{mue:.3f}' if np.isfinite(mue) else '–'} |"
        )
    lines += ["", "(teacher agrees = share of the distilled images, and of their tiles resized to the full "
              "input, that the teacher classifies as their label: a train-side diagnostic.)",
              "", "(mUE = UDD's utilization metric (App. E, Eq. 11-12) of the distilled set under the teacher: "
              "normalized entropy of each image's activation map over d = 5..10 intervals, mean over d and images; "
              "0 = one activation level everywhere, 1 = evenly spread; the `utilization` asset, docs/udd.md.)"]
    tm = as_polars(timings)
    if tm.height:
        lines += ["", "## Wall time per asset (s, summed over partitions)", "", "| asset | partitions | seconds |", "| --- | --- | --- |"]
        agg = (tm.drop_nulls("asset").sort("asset", maintain_order=True).group_by("asset", maintain_order=True)
               .agg(pl.col("seconds").count().alias("count"), pl.col("seconds").alias("_s")))
        for asset, count, secs in agg.iter_rows():
            lines.append(f"| {asset} | {count} | {kahan_sum(secs):.1f} |")
    return "\n".join(lines) + "\n"


def plot_png(summary: pl.DataFrame | pd.DataFrame, dataset: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = as_polars(summary)
    methods = sorted(summary["method"].unique().to_list())
    ncol = max(1, -(-len(methods) // 16))        # the legend sits right of the axes, 16 rows a column
    fig, ax = plt.subplots(figsize=(5 + 1.8 * ncol, 3.5), dpi=100)
    colors = plt.get_cmap("tab10").colors
    markers, styles = "os^Dv", ["-", "--", ":"]
    for i, method in enumerate(methods):     # colour x marker x line style: distinct for 150 methods
        grp = summary.filter(pl.col("method") == method).sort("ipc", maintain_order=True)
        ax.errorbar(grp["ipc"].to_numpy(), 100 * grp["acc_mean"].to_numpy(), yerr=100 * grp["acc_std"].to_numpy(),
                    capsize=3, label=method,
                    color=colors[i % 10], marker=markers[(i // 10) % 5], linestyle=styles[(i // 50) % 3])
    ax.set_xscale("log")
    ax.set_xlabel("images per class")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(dataset, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=ncol, borderaxespad=0.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
