"""The results report: method x IPC x student -> accuracy mean ± std, recovery ratio vs the
full-data teacher, improvement over the random real subset under the same evaluation,
label bytes and wall times.  No Dagster imports (the CLI prints it too)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from dd_assets.storage import DataRoot


def summarize(students: pd.DataFrame, teacher_test_acc: float, timings: pd.DataFrame) -> pd.DataFrame:
    keys = ["method", "ipc", "student", "epochs", "label_mode"]
    g = students.groupby(keys, sort=True)
    out = g.agg(
        acc_mean=("test_acc", "mean"),
        acc_std=("test_acc", lambda a: float(np.std(a, ddof=0))),
        val_mean=("val_acc", "mean"),
        seeds=("seed", lambda s: ",".join(str(int(x)) for x in sorted(s))),
        n_seeds=("seed", "count"),
        label_bytes=("label_bytes", "max"),
    ).reset_index()
    out["recovery"] = out["acc_mean"] / teacher_test_acc if teacher_test_acc > 0 else np.nan
    # The random real subset is evaluated with the profile's label mode; methods with their own
    # labels (DBR, DFT's online teacher) are compared with that same random row.
    rnd = out[out["method"] == "random"].groupby(["ipc", "student", "epochs"])["acc_mean"].first()
    out["vs_random"] = [row.acc_mean - rnd.get((row.ipc, row.student, row.epochs), np.nan) for row in out.itertuples()]
    if len(timings):
        chain = {}
        for row in out.itertuples():
            mask = timings["asset"].isin(chain_assets(row.method)) & (timings["partition"] == str(row.ipc))
            chain[(row.method, row.ipc)] = float(timings.loc[mask, "seconds"].sum())
        out["chain_seconds"] = [chain[(r.method, r.ipc)] for r in out.itertuples()]
    return out


#: The per-IPC assets of one methods entry's chain (the "chain wall" column sums them).
CHAIN_STAGES = ("selection", "distilled", "soft_labels", "students")


def chain_assets(row_method: str) -> set[str]:
    """Asset names of a report row's chain at one IPC: ``<entry>_<stage>`` exactly, so an entry
    never counts the assets of entries that extend its name (``udd`` vs ``udd_dc``); a
    ``<entry>+dft`` row is its fine-tuning students only."""
    if row_method.endswith("+dft"):
        return {f"{row_method[:-len('+dft')]}_dft_students"}
    return {f"{row_method}_{stage}" for stage in CHAIN_STAGES}


def read_timings(root: DataRoot) -> pd.DataFrame:
    rows = []
    for path in root.fs.glob(root.path("timings/*/*.json")):
        with root.fs.open(path, "rb") as fh:
            rows.append(json.loads(fh.read()))
    df = pd.DataFrame(rows, columns=["asset", "partition", "seconds", "run_id"])
    df["partition"] = df["partition"].fillna("").astype(str)
    return df


def markdown(summary: pd.DataFrame, teacher: dict, timings: pd.DataFrame, dataset: str,
             record: pd.DataFrame | None = None) -> str:
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
    if record is not None and len(record):
        from dd_assets.evaluation.results import markdown_table

        r0 = record.iloc[0]
        full = r0["full_data_pct"]
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
    for r in summary.itertuples():
        agree = (f"{100 * r.teacher_image_agree:.0f} / {100 * r.teacher_tile_agree:.0f}"
                 if hasattr(r, "teacher_image_agree") and np.isfinite(r.teacher_image_agree) else "–")
        mue = getattr(r, "mue", float("nan"))
        lines.append(
            f"| {r.method} | {r.ipc} | {r.student} | {r.epochs} | {r.label_mode} | {100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f} "
            f"| {r.seeds} | {r.recovery:.3f} | {int(r.label_bytes):,} | {agree} | "
            f"{getattr(r, 'chain_seconds', float('nan')):.1f} | {f'{mue:.3f}' if np.isfinite(mue) else '–'} |"
        )
    lines += ["", "(teacher agrees = share of the distilled images, and of their tiles resized to the full "
              "input, that the teacher classifies as their label: a train-side diagnostic.)",
              "", "(mUE = UDD's utilization metric (App. E, Eq. 11-12) of the distilled set under the teacher: "
              "normalized entropy of each image's activation map over d = 5..10 intervals, mean over d and images; "
              "0 = one activation level everywhere, 1 = evenly spread; the `utilization` asset, docs/udd.md.)"]
    if len(timings):
        lines += ["", "## Wall time per asset (s, summed over partitions)", "", "| asset | partitions | seconds |", "| --- | --- | --- |"]
        agg = timings.groupby("asset")["seconds"].agg(["count", "sum"]).reset_index()
        for r in agg.itertuples():
            lines.append(f"| {r.asset} | {r.count} | {r.sum:.1f} |")
    return "\n".join(lines) + "\n"


def plot_png(summary: pd.DataFrame, dataset: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted(summary["method"].unique())
    ncol = max(1, -(-len(methods) // 16))        # the legend sits right of the axes, 16 rows a column
    fig, ax = plt.subplots(figsize=(5 + 1.8 * ncol, 3.5), dpi=100)
    colors = plt.get_cmap("tab10").colors
    markers, styles = "os^Dv", ["-", "--", ":"]
    for i, method in enumerate(methods):     # colour x marker x line style: distinct for 150 methods
        grp = summary[summary["method"] == method].sort_values("ipc")
        ax.errorbar(grp["ipc"], 100 * grp["acc_mean"], yerr=100 * grp["acc_std"], capsize=3, label=method,
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
