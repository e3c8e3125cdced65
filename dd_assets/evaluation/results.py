"""Results as data: student tables -> ``docs/results/<dataset>.csv`` rows -> generated markdown.

One CSV row per (method, IPC, student, label mode, epochs) under one recipe.  Accuracies and
their differences are in **percent** (column names end in ``_pct`` / ``_pts``); LRS is a
unitless score in [0, 1] computed from fractions (:mod:`dd_assets.evaluation.metrics`).
Every entry whose base method is ``random`` is one *draw* of the random real subset; the draws
are pooled into one ``random`` row (``n = draws x seeds``) and every other row is compared with
them seed by seed (:func:`~dd_assets.evaluation.metrics.paired_difference`) -- only when both
were trained under the same recipe (an entry may have its own, e.g. NRR-DD's RandAugment views).

The record is computed from plain rows (the students as records) and returned as the caller's
frame: Polars for the report, pandas for ``benchmarks/gpu_table.py`` (its GPU machine has pandas
and no Polars, so Polars is imported only where a Polars frame is made).  The CSV is written
with the standard library, byte for byte what ``pandas.DataFrame.to_csv(float_format="%.4f")``
wrote; :func:`read_csv` reads published records with pandas.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dd_assets.evaluation.metrics import hlr, ior, lrs, paired_difference

if TYPE_CHECKING:
    import polars as pl

RANDOM = "random"
KEYS = ["method", "ipc", "student", "labels", "epochs"]
COLUMNS = [
    "dataset", "method", "base_method", "ipc", "student", "labels", "epochs", "recipe",
    "test_pct_mean", "test_pct_std", "n", "n_seeds", "draws",
    "vs_random_pts", "vs_random_lo_pts", "vs_random_hi_pts", "vs_random_n", "beats_random",
    "ior_pts", "hard_pct_mean", "full_data_pct", "hlr_pts", "lrs", "label_bytes", "commit", "params_hash",
]
_INTS = {"ipc", "epochs", "n", "n_seeds", "draws", "vs_random_n", "label_bytes"}
_STRS = {"dataset", "method", "base_method", "student", "labels", "recipe", "beats_random", "commit", "params_hash"}


def polars_schema() -> pl.Schema:
    """The record's columns and Polars types (int64 counts, float64 numbers, strings)."""
    import polars as pl

    return pl.Schema({c: pl.Int64 if c in _INTS else pl.String if c in _STRS else pl.Float64 for c in COLUMNS})


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _records(df: pl.DataFrame | pd.DataFrame) -> list[dict]:
    """The rows of a pandas or Polars frame as dicts of Python values (missing: None or NaN)."""
    return df.to_dict("records") if isinstance(df, pd.DataFrame) else df.to_dicts()


def _fmt_bool(lo: float, hi: float, n: int) -> str:
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    if lo > 0:
        return "yes"
    if hi < 0:
        return "worse"
    return "no"


def results_rows(students: pl.DataFrame | pd.DataFrame, bases: Mapping[str, str], *, dataset: str, recipe: str,
                 main_labels: str, full_data_acc: float = float("nan"), lrs_weight: float = 0.5,
                 commit: str = "", params_hash: Mapping[str, str] | None = None,
                 recipes: Mapping[str, str] | None = None) -> pl.DataFrame | pd.DataFrame:
    """The results record of one report.

    ``students``: one row per trained student (``method, ipc, seed, student, epochs, label_mode,
    test_acc`` in [0, 1], ``label_bytes``); ``bases``: methods entry -> base method;
    ``main_labels``: the profile's label mode (rows with their own label kind -- DBR, online --
    are compared with random under it); ``full_data_acc``: the full-data hard-label student's
    test accuracy (fraction; NaN leaves HLR/LRS empty); ``params_hash``: entry -> the code
    version of its students; ``recipe``: the profile's recipe, ``recipes``: entry -> its own
    recipe where it differs (a row is compared with random -- vs_random, IOR -- only when
    random was trained under the row's recipe; else those columns stay empty).
    Polars ``students`` give a Polars record (:func:`polars_schema`), pandas a pandas one.
    """
    if isinstance(students, pd.DataFrame):
        if students.empty:
            return pd.DataFrame(columns=COLUMNS)
        rows = _record(_records(students), students.columns, bases, dataset=dataset, recipe=recipe,
                       main_labels=main_labels, full_data_acc=full_data_acc, lrs_weight=lrs_weight, commit=commit,
                       params_hash=params_hash or {}, recipes=recipes or {})
        return pd.DataFrame(rows, columns=COLUMNS)
    import polars as pl

    rows = _record(_records(students), students.columns, bases, dataset=dataset, recipe=recipe,
                   main_labels=main_labels, full_data_acc=full_data_acc, lrs_weight=lrs_weight, commit=commit,
                   params_hash=params_hash or {}, recipes=recipes or {})
    return pl.DataFrame([[r[c] for c in COLUMNS] for r in rows], schema=polars_schema(), orient="row")


def _record(students: list[dict], columns: Iterable[str], bases: Mapping[str, str], *, dataset: str, recipe: str,
            main_labels: str, full_data_acc: float, lrs_weight: float, commit: str, params_hash: Mapping[str, str],
            recipes: Mapping[str, str]) -> list[dict]:
    """The record's rows (dicts of :data:`COLUMNS`), sorted, from the students' rows."""
    nan = float("nan")
    df = []
    for s in students:
        r = {("labels" if k == "label_mode" else k): v for k, v in s.items()}
        r["entry"] = entry = r["method"]
        # a random draw, also with a suffix (``random_d1+dft``: the same extra training as ``focusdc+dft``),
        # pools into the random row of its recipe (the suffix's recipe keeps the two apart)
        r["method"] = RANDOM if bases.get(entry.split("+")[0], entry.split("+")[0]) == RANDOM else entry
        r["recipe"] = recipes.get(entry, recipe)
        df.append(r)
    ref: dict[tuple, dict[int, list[float]]] = {}
    for r in df:
        if r["method"] == RANDOM:
            ref.setdefault((r["ipc"], r["student"], r["epochs"], r["labels"], r["recipe"]), {}).setdefault(
                int(r["seed"]), []).append(float(r["test_acc"]))
    group = [*KEYS, "recipe"]

    def key(r: dict) -> tuple:
        return tuple(r[k] for k in group)

    groups: dict[tuple, list[dict]] = {}
    for r in sorted((r for r in df if not any(_missing(v) for v in key(r))), key=key):   # stable: row order kept
        groups.setdefault(key(r), []).append(r)
    has_bytes = "label_bytes" in columns
    rows = []
    for (method, ipc, student, labels, epochs, rec), grp in groups.items():
        acc = np.asarray([nan if _missing(g["test_acc"]) else float(g["test_acc"]) for g in grp], np.float64)
        base = RANDOM if method == RANDOM else bases.get(method, method.split("+")[0])
        rnd = ref.get((ipc, student, epochs, labels, rec)) or ref.get((ipc, student, epochs, main_labels, rec))
        row = {
            "dataset": dataset, "method": method, "base_method": base, "ipc": int(ipc), "student": student,
            "labels": labels, "epochs": int(epochs), "recipe": rec,
            "test_pct_mean": 100 * float(acc.mean()), "test_pct_std": 100 * float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "n": int(len(acc)), "n_seeds": len({g["seed"] for g in grp if not _missing(g["seed"])}),
            "draws": len({g["entry"] for g in grp}),
            "label_bytes": int(max(g["label_bytes"] for g in grp if not _missing(g["label_bytes"]))) if has_bytes else 0,
            "commit": commit,
            "params_hash": ",".join(sorted({params_hash.get(g["entry"], "") for g in grp} - {""})),
        }
        if method == RANDOM:
            row.update(vs_random_pts=0.0, vs_random_lo_pts=nan, vs_random_hi_pts=nan, vs_random_n=0, beats_random="")
        elif rnd:
            d = paired_difference({int(g["seed"]): float(g["test_acc"]) for g in grp}, rnd)
            row.update(vs_random_pts=100 * d.mean, vs_random_lo_pts=100 * d.lo, vs_random_hi_pts=100 * d.hi,
                       vs_random_n=d.n, beats_random=_fmt_bool(d.lo, d.hi, d.n))
        else:
            row.update(vs_random_pts=nan, vs_random_lo_pts=nan, vs_random_hi_pts=nan, vs_random_n=0, beats_random="")
        rows.append(row)
    # IOR / HLR / LRS on every row that is not itself a hard-label row
    hard = {(r["method"], r["ipc"], r["student"], r["epochs"]): r["test_pct_mean"] for r in rows if r["labels"] == "hard"}
    rnd_mean = {(r["ipc"], r["student"], r["epochs"], r["labels"], r["recipe"]): r["test_pct_mean"]
                for r in rows if r["method"] == RANDOM}
    for r in rows:
        r["full_data_pct"] = 100 * full_data_acc if np.isfinite(full_data_acc) else nan
        if r["labels"] == "hard":
            r.update(ior_pts=nan, hard_pct_mean=nan, hlr_pts=nan, lrs=nan)
            continue
        rm = rnd_mean.get((r["ipc"], r["student"], r["epochs"], r["labels"], r["recipe"]),
                          rnd_mean.get((r["ipc"], r["student"], r["epochs"], main_labels, r["recipe"])))
        i = ior(r["test_pct_mean"] / 100, rm / 100) if rm is not None and np.isfinite(rm) else nan
        h_acc = hard.get((r["method"], r["ipc"], r["student"], r["epochs"]), nan)
        h = hlr(full_data_acc, h_acc / 100) if np.isfinite(h_acc) and np.isfinite(full_data_acc) else nan
        r.update(ior_pts=100 * i, hard_pct_mean=h_acc, hlr_pts=100 * h,
                 lrs=lrs(i, h, lrs_weight) if np.isfinite(i) and np.isfinite(h) else nan)
    rows.sort(key=lambda r: (r["ipc"], r["epochs"], r["labels"] == "hard", r["method"] != RANDOM, r["method"], r["labels"]))
    return [{c: r[c] for c in COLUMNS} for r in rows]


def _cell(v, is_float: bool) -> str:
    if _missing(v):
        return ""
    return "%.4f" % v if is_float else str(v)


def _float_columns(df: pl.DataFrame | pd.DataFrame) -> set[str]:
    if isinstance(df, pd.DataFrame):
        return {c for c in COLUMNS if df[c].dtype.kind == "f"}
    return {c for c in COLUMNS if df.schema[c].is_float()}


def to_csv(rows: pl.DataFrame | pd.DataFrame) -> str:
    """The CSV text of a results record (fixed column order, 4 decimals, missing values empty,
    minimal quoting, ``\\n`` line ends: byte for byte what pandas' ``to_csv`` wrote)."""
    floats = _float_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(COLUMNS)
    for r in _records(rows):
        w.writerow([_cell(r[c], c in floats) for c in COLUMNS])
    return buf.getvalue()


def read_csv(text_or_path) -> pd.DataFrame:
    df = pd.read_csv(text_or_path, keep_default_na=True, dtype={"beats_random": str, "commit": str, "params_hash": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results CSV lacks columns {missing}; regenerate it with `dd-assets results`")
    return df.fillna({"beats_random": "", "commit": "", "params_hash": ""})


def _finite(v) -> bool:
    return v is not None and bool(np.isfinite(v))


def _num(v: float, fmt: str = "{:.2f}") -> str:
    return fmt.format(v) if _finite(v) else "–"


def markdown_table(rows: pl.DataFrame | pd.DataFrame) -> str:
    """The generated markdown table of a results record (docs/results.md embeds it)."""
    lines = [
        "| method | IPC | epochs | labels | test acc (%) | n | vs random (pts) [95% CI] | beats random | IOR (pts) "
        "| HLR (pts) | LRS | label bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in _records(rows):
        ci = (f"{r['vs_random_pts']:+.2f} [{r['vs_random_lo_pts']:+.2f}, {r['vs_random_hi_pts']:+.2f}]"
              if _finite(r["vs_random_lo_pts"])
              else ("–" if r["method"] == RANDOM else _num(r["vs_random_pts"], "{:+.2f}")))
        n = f"{r['n']}" + (f" ({r['draws']} draws)" if r["draws"] > 1 else "")
        lines.append(
            f"| {r['method']} | {r['ipc']} | {r['epochs']} | {r['labels']} | {r['test_pct_mean']:.2f} ± {r['test_pct_std']:.2f} "
            f"| {n} | {ci} | {r['beats_random'] or '–'} | {_num(r['ior_pts'], '{:+.2f}')} | {_num(r['hlr_pts'])} "
            f"| {_num(r['lrs'], '{:.3f}')} | {int(r['label_bytes']):,} |"
        )
    return "\n".join(lines) + "\n"


def budget_curve_png(rows: pl.DataFrame | pd.DataFrame, title: str) -> bytes:
    """Test accuracy vs student epochs, one line per method, one panel per IPC (hard-label rows left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import polars as pl

    soft = (pl.from_pandas(rows) if isinstance(rows, pd.DataFrame) else rows).filter(pl.col("labels") != "hard")
    ipcs = sorted(soft["ipc"].unique().to_list())
    fig, axes = plt.subplots(1, max(1, len(ipcs)), figsize=(4.2 * max(1, len(ipcs)) + 2.0, 3.4), dpi=100, squeeze=False)
    colors = plt.get_cmap("tab10").colors
    methods = sorted(soft["method"].unique().to_list(), key=lambda m: (m != RANDOM, m))
    for ax, ipc in zip(axes[0], ipcs, strict=False):
        for i, m in enumerate(methods):
            g = soft.filter((pl.col("ipc") == ipc) & (pl.col("method") == m)).sort("epochs", maintain_order=True)
            if g.is_empty():
                continue
            ax.errorbar(g["epochs"].to_numpy(), g["test_pct_mean"].to_numpy(), yerr=g["test_pct_std"].to_numpy(),
                        capsize=3, label=m,
                        color="black" if m == RANDOM else colors[i % 10], marker="os^Dv"[(i // 10) % 5],
                        linewidth=2 if m == RANDOM else 1)
        ax.set_xscale("log")
        ax.set_xlabel("student epochs")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{title} — IPC {ipc}", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
