"""``dd-assets methods``, ``report``, ``results``, ``audit`` and ``easy-hard``: what the methods
are and what the materialized assets hold."""

from __future__ import annotations

import argparse
import sys

from dd_assets.commands.common import _load


def cmd_methods(args: argparse.Namespace) -> int:
    from dd_assets.methods import registry

    print("Methods (dd_assets/methods/registry.py; params.yaml 'methods:' entries override the defaults):")
    for name in registry.names():
        plugin = registry.get(name)
        extra = f" candidates={plugin.candidates}" if plugin.kind == "select" else ""
        print(f"  {name:10s} {plugin.description}")
        print(f"  {'':10s} kind={plugin.kind}{extra} version={plugin.version}")
        print(f"  {'':10s} defaults={plugin.defaults}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    params = _load(args.profile)
    from dd_assets.storage import DataRoot, layout

    root = DataRoot(params.data_root)
    if not root.exists(layout.REPORT_MD):
        print(f"no report at {root.url(layout.REPORT_MD)}; run `dd-assets materialize` first", file=sys.stderr)
        return 1
    print(root.read_bytes(layout.REPORT_MD).decode())
    print(f"(this report and the pictures it links: {root.url(layout.REPORT_MD).rsplit('/', 1)[0]}/)")
    warning = report_freshness(params)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def report_freshness(params, defs=None, instance=None) -> str | None:
    """``None`` when the stored report is current against params.yaml and its upstream
    materializations; else one line saying it is stale and why (``dd-assets stale``'s view:
    Dagster's stale-status resolver plus everything downstream of a stale or missing partition)."""
    import dagster as dg

    from dd_assets.definitions import build_definitions
    from dd_assets.orchestrate import ensure_dagster_home
    from dd_assets.staleness import find_stale

    if instance is None:
        ensure_dagster_home(params.profile)
        instance = dg.DagsterInstance.get()
    entries = find_stale(defs or build_definitions(params), instance)
    report = next((e for e in entries if e.asset == "report"), None)
    if report is None:
        return None
    upstream = [e for e in entries if e.asset != "report"]
    shown = ", ".join(f"{e.asset}[{e.partition}]" if e.partition else e.asset for e in upstream[:4])
    more = f" and {len(upstream) - 4} more" if len(upstream) > 4 else ""
    why = (f"{len(upstream)} upstream partitions are stale or missing ({shown}{more})" if upstream
           else "; ".join(report.causes) or report.status)
    return (f"report: this table is STALE against params.yaml: {why}; `dd-assets materialize --stale` "
            "rebuilds it (`dd-assets stale` lists everything)")


def cmd_results(args: argparse.Namespace) -> int:
    """Copy the report's results record into docs/results/<name>.csv, the budget curve into
    docs/img/, and regenerate the table embedded in docs/results.md from the CSV."""
    from pathlib import Path

    from dd_assets.config import PROJECT_ROOT
    from dd_assets.evaluation.publish import atomic_write, embed, generated_block
    from dd_assets.storage import DataRoot, layout

    params = _load(args.profile)
    root = DataRoot(params.data_root)
    if not root.exists(layout.RESULTS_CSV):
        print(f"no results record at {root.url(layout.RESULTS_CSV)}; materialize the report first", file=sys.stderr)
        return 1
    name = args.name or params.profile
    csv_path = Path(args.csv) if args.csv else PROJECT_ROOT / "docs" / "results" / f"{name}.csv"
    atomic_write(csv_path, root.read_bytes(layout.RESULTS_CSV))
    if root.exists(layout.BUDGET_CURVE):
        atomic_write(PROJECT_ROOT / "docs" / "img" / f"accuracy_vs_epochs_{name}.png", root.read_bytes(layout.BUDGET_CURVE))
    doc_path = Path(args.doc) if args.doc else PROJECT_ROOT / "docs" / "results.md"
    doc = doc_path.read_text(encoding="utf-8") if doc_path.exists() else f"# Results\n"
    atomic_write(doc_path, embed(doc, name, generated_block(csv_path)).encode())
    print(f"wrote {csv_path} and the '{name}' table of {doc_path}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from dd_assets.audit import audit_png, lineage_of
    from dd_assets.storage import DataRoot

    params = _load(args.profile)
    from dd_assets.methods.entries import images_source

    root = DataRoot(params.data_root)
    methods = params.block("methods")
    if args.method not in methods:
        print(f"audit: unknown method {args.method!r}; known: {', '.join(methods)}", file=sys.stderr)
        return 2
    try:  # a label-only variant (e.g. nrr_dbr) shows the images it was trained on
        record = lineage_of(root, images_source(methods, args.method), args.ipc, args.index)
    except (FileNotFoundError, IndexError) as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    png = audit_png(root, params.block("data"), record)
    out = args.out or f"audit_{args.method}_ipc{args.ipc}_{args.index}.png"
    rel = f"reports/audit/{out}" if "/" not in out else None
    if rel:
        root.write_bytes(rel, png)
        record["png"] = root.url(rel)
    else:
        with open(out, "wb") as fh:
            fh.write(png)
        record["png"] = out
    print(json.dumps(record, indent=2))
    return 0


def cmd_easy_hard(args: argparse.Namespace) -> int:
    """Comp-DD (EDF Sec. 3): the k least / most complex classes from the stored
    ``comp_dd_complexity`` tables, printed and written as pasteable ``data.classes`` lists."""
    import polars as pl
    import pyarrow.parquet as pq
    import yaml

    from dd_assets.core.complexity import class_complexity, split_easy_hard
    from dd_assets.storage import DataRoot, layout

    params = _load(args.profile)
    root = DataRoot(params.data_root)
    files = sorted(root.fs.glob(root.path(layout.COMP_DD_GLOB)))
    if not files:
        print(f"easy-hard: no Comp-DD tables at {root.url(layout.COMP_DD_GLOB)}; run "
              "`dd-assets materialize --select comp_dd_complexity` first", file=sys.stderr)
        return 1
    frames = []
    for f in files:
        with root.fs.open(f, "rb") as fh:
            frames.append(pl.from_arrow(pq.read_table(fh, columns=["class_index", "class_name", "complexity"])))
    df = pl.concat(frames, how="vertical_relaxed")
    names = dict(df.drop_nulls(["class_index", "class_name"]).group_by("class_index", maintain_order=True)
                 .agg(pl.col("class_name").first()).iter_rows())
    n_classes = max(len(root.fs.glob(root.path(layout.MANIFEST_GLOB))), max(names) + 1)
    gaps = sorted(set(range(n_classes)) - set(names))
    if gaps:
        print(f"easy-hard: classes {gaps} have no Comp-DD table yet (left out)", file=sys.stderr)
    class_names = [str(names.get(i, f"<class {i}>")) for i in range(n_classes)]
    complexity = df["complexity"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    table = class_complexity(complexity, df["class_index"].to_numpy(), class_names)
    have = int(table["complexity"].is_not_nan().sum())
    k = args.k if args.k is not None else min(10, have // 2)
    try:
        split = split_easy_hard(table, k=k, threshold=args.threshold)
    except ValueError as err:
        print(f"easy-hard: {err}; pass a smaller --k (or --threshold)", file=sys.stderr)
        return 2
    ranked = (table.drop_nulls("complexity").filter(pl.col("complexity").is_not_nan())
              .sort(["complexity", "class_index"], descending=[True, False], maintain_order=True))
    how = f"threshold {args.threshold}" if args.threshold is not None else f"k = {k}"
    print(f"Comp-DD class complexity, profile {params.profile} ({len(df)} train images; 1 - share of teacher "
          f"Grad-CAM >= 0.5, higher = more complex), {how}:")
    hard, easy = set(split.hard["class_name"].to_list()), set(split.easy["class_name"].to_list())
    for r in ranked.iter_rows(named=True):
        tag = "hard" if r["class_name"] in hard else "easy" if r["class_name"] in easy else ""
        print(f"  {r['class_name']:24s} {r['complexity']:.4f}  ({r['n_images']} images) {tag}")

    def in_order(rows) -> list[str]:  # dataset order, as data.classes indexes them
        return [str(c) for c in rows.sort("class_index", maintain_order=True)["class_name"].to_list()]

    doc = {
        "comp_dd": {"profile": params.profile, "k": None if args.threshold is not None else k, "threshold": args.threshold,
                    "complexity": {str(c): round(float(v), 6) for c, v in ranked.select("class_name", "complexity").iter_rows()}},
        "easy": {"data": {"classes": in_order(split.easy)}},
        "hard": {"data": {"classes": in_order(split.hard)}},
    }
    text = ("# Comp-DD easy / hard class subsets (dd-assets easy-hard); paste one `data:` block into a profile\n"
            + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    root.write_bytes(layout.EASY_HARD, text.encode())
    print(f"easy: {doc['easy']['data']['classes']}\nhard: {doc['hard']['data']['classes']}\nwrote {root.url(layout.EASY_HARD)}")
    return 0
