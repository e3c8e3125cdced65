"""Results as data: student tables -> ``docs/results/<dataset>.csv`` rows -> generated markdown.

One CSV row per (method, IPC, student, label mode, epochs) under one recipe.  Accuracies and
their differences are in **percent** (column names end in ``_pct`` / ``_pts``); LRS is a
unitless score in [0, 1] computed from fractions (:mod:`dd_assets.evaluation.metrics`).
Every entry whose base method is ``random`` is one *draw* of the random real subset; the draws
are pooled into one ``random`` row (``n = draws x seeds``) and every other row is compared with
them seed by seed (:func:`~dd_assets.evaluation.metrics.paired_difference`) -- only when both
were trained under the same recipe (an entry may have its own, e.g. NRR-DD's RandAugment views).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from dd_assets.evaluation.metrics import hlr, ior, lrs, paired_difference

RANDOM = "random"
KEYS = ["method", "ipc", "student", "labels", "epochs"]
COLUMNS = [
    "dataset", "method", "base_method", "ipc", "student", "labels", "epochs", "recipe",
    "test_pct_mean", "test_pct_std", "n", "n_seeds", "draws",
    "vs_random_pts", "vs_random_lo_pts", "vs_random_hi_pts", "vs_random_n", "beats_random",
    "ior_pts", "hard_pct_mean", "full_data_pct", "hlr_pts", "lrs", "label_bytes", "commit", "params_hash",
]


def _fmt_bool(lo: float, hi: float, n: int) -> str:
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    if lo > 0:
        return "yes"
    if hi < 0:
        return "worse"
    return "no"


def results_rows(students: pd.DataFrame, bases: Mapping[str, str], *, dataset: str, recipe: str,
                 main_labels: str, full_data_acc: float = float("nan"), lrs_weight: float = 0.5,
                 commit: str = "", params_hash: Mapping[str, str] | None = None,
                 recipes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The results record of one report.

    ``students``: one row per trained student (``method, ipc, seed, student, epochs, label_mode,
    test_acc`` in [0, 1], ``label_bytes``); ``bases``: methods entry -> base method;
    ``main_labels``: the profile's label mode (rows with their own label kind -- DBR, online --
    are compared with random under it); ``full_data_acc``: the full-data hard-label student's
    test accuracy (fraction; NaN leaves HLR/LRS empty); ``params_hash``: entry -> the code
    version of its students; ``recipe``: the profile's recipe, ``recipes``: entry -> its own
    recipe where it differs (a row is compared with random -- vs_random, IOR -- only when
    random was trained under the row's recipe; else those columns stay empty).
    """
    if students.empty:
        return pd.DataFrame(columns=COLUMNS)
    df = students.rename(columns={"label_mode": "labels"}).copy()
    df["entry"] = df["method"]
    # a random draw, also with a suffix (``random_d1+dft``: the same extra training as ``focusdc+dft``),
    # pools into the random row of its recipe (the suffix's recipe keeps the two apart)
    df["method"] = [RANDOM if bases.get(m.split("+")[0], m.split("+")[0]) == RANDOM else m for m in df["entry"]]
    df["recipe"] = [(recipes or {}).get(e, recipe) for e in df["entry"]]
    ref: dict[tuple, dict[int, list[float]]] = {}
    for r in df[df["method"] == RANDOM].itertuples():
        ref.setdefault((r.ipc, r.student, r.epochs, r.labels, r.recipe), {}).setdefault(
            int(r.seed), []).append(float(r.test_acc))
    rows = []
    for key, grp in df.groupby([*KEYS, "recipe"], sort=True):
        method, ipc, student, labels, epochs, rec = key
        acc = grp["test_acc"].to_numpy(np.float64)
        base = RANDOM if method == RANDOM else bases.get(method, method.split("+")[0])
        rnd = ref.get((ipc, student, epochs, labels, rec)) or ref.get((ipc, student, epochs, main_labels, rec))
        row = {
            "dataset": dataset, "method": method, "base_method": base, "ipc": int(ipc), "student": student,
            "labels": labels, "epochs": int(epochs), "recipe": rec,
            "test_pct_mean": 100 * float(acc.mean()), "test_pct_std": 100 * float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "n": int(len(acc)), "n_seeds": int(grp["seed"].nunique()), "draws": int(grp["entry"].nunique()),
            "label_bytes": int(grp["label_bytes"].max()) if "label_bytes" in grp else 0,
            "commit": commit,
            "params_hash": ",".join(sorted({(params_hash or {}).get(e, "") for e in grp["entry"]} - {""})),
        }
        if method == RANDOM:
            row.update(vs_random_pts=0.0, vs_random_lo_pts=float("nan"), vs_random_hi_pts=float("nan"),
                       vs_random_n=0, beats_random="")
        elif rnd:
            d = paired_difference({int(s): float(a) for s, a in zip(grp["seed"], grp["test_acc"], strict=True)}, rnd)
            row.update(vs_random_pts=100 * d.mean, vs_random_lo_pts=100 * d.lo, vs_random_hi_pts=100 * d.hi,
                       vs_random_n=d.n, beats_random=_fmt_bool(d.lo, d.hi, d.n))
        else:
            row.update(vs_random_pts=float("nan"), vs_random_lo_pts=float("nan"), vs_random_hi_pts=float("nan"),
                       vs_random_n=0, beats_random="")
        rows.append(row)
    out = pd.DataFrame(rows)
    # IOR / HLR / LRS on every row that is not itself a hard-label row
    hard = out[out["labels"] == "hard"].set_index(["method", "ipc", "student", "epochs"])["test_pct_mean"]
    rnd_mean = out[out["method"] == RANDOM].set_index(["ipc", "student", "epochs", "labels", "recipe"])["test_pct_mean"]
    iors, hards, hlrs, lrss = [], [], [], []
    for r in out.itertuples():
        if r.labels == "hard":
            iors.append(float("nan")), hards.append(float("nan")), hlrs.append(float("nan")), lrss.append(float("nan"))
            continue
        rm = rnd_mean.get((r.ipc, r.student, r.epochs, r.labels, r.recipe),
                          rnd_mean.get((r.ipc, r.student, r.epochs, main_labels, r.recipe)))
        i = ior(r.test_pct_mean / 100, rm / 100) if rm is not None and np.isfinite(rm) else float("nan")
        h_acc = hard.get((r.method, r.ipc, r.student, r.epochs), float("nan"))
        h = hlr(full_data_acc, h_acc / 100) if np.isfinite(h_acc) and np.isfinite(full_data_acc) else float("nan")
        iors.append(100 * i), hards.append(h_acc), hlrs.append(100 * h)
        lrss.append(lrs(i, h, lrs_weight) if np.isfinite(i) and np.isfinite(h) else float("nan"))
    out["ior_pts"], out["hard_pct_mean"], out["hlr_pts"], out["lrs"] = iors, hards, hlrs, lrss
    out["full_data_pct"] = 100 * full_data_acc if np.isfinite(full_data_acc) else float("nan")
    order = out.assign(_r=(out["method"] != RANDOM).astype(int), _h=(out["labels"] == "hard").astype(int))
    order = order.sort_values(["ipc", "epochs", "_h", "_r", "method", "labels"]).drop(columns=["_r", "_h"])
    return order[COLUMNS].reset_index(drop=True)


def to_csv(rows: pd.DataFrame) -> str:
    """The CSV text of a results record (fixed column order, 4 decimals)."""
    buf = io.StringIO()
    rows[COLUMNS].to_csv(buf, index=False, float_format="%.4f", lineterminator="\n")
    return buf.getvalue()


def read_csv(text_or_path) -> pd.DataFrame:
    df = pd.read_csv(text_or_path, keep_default_na=True, dtype={"beats_random": str, "commit": str, "params_hash": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results CSV lacks columns {missing}; regenerate it with `dd-assets results`")
    return df.fillna({"beats_random": "", "commit": "", "params_hash": ""})


def _num(v: float, fmt: str = "{:.2f}") -> str:
    return fmt.format(v) if v is not None and np.isfinite(v) else "–"


def markdown_table(rows: pd.DataFrame) -> str:
    """The generated markdown table of a results record (docs/results.md embeds it)."""
    lines = [
        "| method | IPC | epochs | labels | test acc (%) | n | vs random (pts) [95% CI] | beats random | IOR (pts) "
        "| HLR (pts) | LRS | label bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows.itertuples():
        ci = (f"{r.vs_random_pts:+.2f} [{r.vs_random_lo_pts:+.2f}, {r.vs_random_hi_pts:+.2f}]"
              if np.isfinite(r.vs_random_lo_pts) else ("–" if r.method == RANDOM else _num(r.vs_random_pts, "{:+.2f}")))
        n = f"{r.n}" + (f" ({r.draws} draws)" if r.draws > 1 else "")
        lines.append(
            f"| {r.method} | {r.ipc} | {r.epochs} | {r.labels} | {r.test_pct_mean:.2f} ± {r.test_pct_std:.2f} | {n} | {ci} "
            f"| {r.beats_random or '–'} | {_num(r.ior_pts, '{:+.2f}')} | {_num(r.hlr_pts)} | {_num(r.lrs, '{:.3f}')} "
            f"| {int(r.label_bytes):,} |"
        )
    return "\n".join(lines) + "\n"


def budget_curve_png(rows: pd.DataFrame, title: str) -> bytes:
    """Test accuracy vs student epochs, one line per method, one panel per IPC (hard-label rows left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    soft = rows[rows["labels"] != "hard"]
    ipcs = sorted(soft["ipc"].unique())
    fig, axes = plt.subplots(1, max(1, len(ipcs)), figsize=(4.2 * max(1, len(ipcs)) + 2.0, 3.4), dpi=100, squeeze=False)
    colors = plt.get_cmap("tab10").colors
    methods = sorted(soft["method"].unique(), key=lambda m: (m != RANDOM, m))
    for ax, ipc in zip(axes[0], ipcs, strict=False):
        for i, m in enumerate(methods):
            g = soft[(soft["ipc"] == ipc) & (soft["method"] == m)].sort_values("epochs")
            if g.empty:
                continue
            ax.errorbar(g["epochs"], g["test_pct_mean"], yerr=g["test_pct_std"], capsize=3, label=m,
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
