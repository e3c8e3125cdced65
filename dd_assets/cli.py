"""``dd-assets``: the command line (argparse is built in ``main``, never at import)."""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys


def _load(profile: str | None):
    if profile:
        os.environ["DD_ASSETS_PROFILE"] = profile
    from dd_assets.config import load_params

    return load_params()


def cmd_methods(args: argparse.Namespace) -> int:
    from dd_assets.methods import registry
    from dd_assets.methods_catalog import METHODS

    print("Methods (params.yaml 'methods:' keys, with defaults):")
    for name, spec in METHODS.items():
        print(f"  {name:10s} {spec.description}")
        print(f"  {'':10s} select={spec.select} candidates={spec.candidates} defaults={spec.defaults}")
    print("\nRegistered stage implementations:")
    for stage, names in registry.available().items():
        print(f"  {stage:8s} {', '.join(names) or '-'}")
    return 0


def _select_keys(defs, patterns: list[str] | None, groups: list[str] | None = None):
    import dagster as dg

    graph = defs.resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    if groups:
        known = sorted({graph.get(k).group_name for k in keys})
        unknown = sorted(set(groups) - set(known))
        if unknown:
            raise SystemExit(f"--group {' '.join(unknown)}: no such group; groups: {', '.join(known)}")
        keys = [k for k in keys if graph.get(k).group_name in groups]
    if not patterns:
        return keys
    chosen = [k for k in keys if any(fnmatch.fnmatch(k.to_user_string(), p) for p in patterns)]
    if not chosen:
        names = ", ".join(k.to_user_string() for k in keys)
        raise SystemExit(f"--select {patterns} matches no asset; assets: {names}")
    return [dg.AssetKey(k.path) for k in chosen]


def _defs_and_instance(args: argparse.Namespace):
    params = _load(args.profile)
    import dagster as dg

    from dd_assets.definitions import build_definitions
    from dd_assets.orchestrate import ensure_dagster_home

    ensure_dagster_home(params.profile)
    return params, build_definitions(params), dg.DagsterInstance.get()


def _reap(params, instance) -> str | None:
    """Mark runs whose process died (kill -9, OOM) failed and their MLflow runs KILLED; returns
    the MLflow tracking URI (None for a remote root without one)."""
    from dd_assets.run_guard import reap_orphans
    from dd_assets.storage import DataRoot
    from dd_assets.tracking import tracking_uri

    try:
        uri = tracking_uri(DataRoot(params.data_root))
    except RuntimeError:
        uri = None
    for run_id in reap_orphans(instance, uri):
        print(f"run {run_id}: its process is gone (killed); marked failed, MLflow runs KILLED", file=sys.stderr)
    return uri


def _ipc_restriction(defs, keys, ipcs: list[str] | None) -> dict[str, list[str]]:
    if not ipcs:
        return {}
    graph = defs.resolve_asset_graph()
    out: dict[str, list[str]] = {}
    for k in keys:
        pdef = graph.get(k).partitions_def
        if pdef is None or not all(p.isdigit() for p in pdef.get_partition_keys()):
            continue
        unknown = sorted(set(ipcs) - set(pdef.get_partition_keys()))
        if unknown:
            raise SystemExit(f"--ipc {' '.join(unknown)}: not in params.yaml 'ipcs' {pdef.get_partition_keys()}; add it there first")
        out[k.to_user_string()] = list(ipcs)
    return out


def cmd_materialize(args: argparse.Namespace) -> int:
    import dagster as dg

    from dd_assets.orchestrate import execute, plan

    params, defs, instance = _defs_and_instance(args)  # a ParamsError: one line, exit 2 (main)
    tracking = _reap(params, instance)
    keys = _select_keys(defs, args.select, args.group)
    restrict = _ipc_restriction(defs, keys, args.ipc)
    if args.stale:
        from dd_assets.staleness import find_stale

        wanted = {k.to_user_string() for k in keys}
        entries = [e for e in find_stale(defs, instance) if e.asset in wanted]
        if not entries:
            print("nothing is stale or missing")
            return 0
        stale: dict[str, list[str]] = {}
        for e in entries:
            stale.setdefault(e.asset, [])
            if e.partition is not None and e.partition in restrict.get(e.asset, [e.partition]):
                stale[e.asset].append(e.partition)
        keys = [dg.AssetKey.from_user_string(a) for a in stale]
        restrict = {a: ps for a, ps in stale.items() if ps}
    the_plan = plan(defs, keys, restrict or None)
    print(f"profile {params.profile}: {len(keys)} assets in {len(the_plan)} runs (data root {params.data_root})", flush=True)

    def on_step(i, total, step):
        names = ",".join(k.to_user_string() for k in step.keys)
        print(f"[{i + 1}/{total}] {names} [{step.partition or '-'}]", flush=True)

    knobs = {k: v for k, v in {"device": args.device, "inference_batch_size": args.batch_size,
                               "num_workers": args.workers, "progress": args.progress or None}.items() if v is not None}
    if args.jobs > 1 and "threads" not in knobs:
        knobs["threads"] = max(1, (os.cpu_count() or 1) // args.jobs)
    from dd_assets.orchestrate import Interrupted, RunFailures
    from dd_assets.run_guard import StepLocks

    locks = StepLocks.for_root(params.data_root, instance.root_directory)
    try:
        execute(defs, the_plan, instance, on_step, resource_config=knobs, log_level=args.log_level, jobs=args.jobs,
                lock_dir=locks.dir, on_note=lambda msg: print(f"  {msg}", flush=True), tracking_uri=tracking)
    except Interrupted as err:
        print(f"materialize: {err}", file=sys.stderr)
        return 130
    except RunFailures as err:
        print(f"materialize: {err}", file=sys.stderr)
        return 1
    print("done")
    return 0


def cmd_stale(args: argparse.Namespace) -> int:
    from dd_assets.staleness import find_stale

    _, defs, instance = _defs_and_instance(args)
    entries = find_stale(defs, instance)
    if not entries:
        print("everything is up to date")
        return 0
    for e in entries:
        part = f"[{e.partition}]" if e.partition else ""
        print(f"{e.status:8s} {e.asset}{part}" + (f"  <- {'; '.join(e.causes)}" if e.causes else ""))
    print(f"{len(entries)} stale or missing; `dd-assets materialize --stale` runs exactly these")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    params = _load(args.profile)
    from dd_assets.storage import DataRoot, layout

    root = DataRoot(params.data_root)
    if not root.exists(layout.REPORT_MD):
        print(f"no report at {root.url(layout.REPORT_MD)}; run `dd-assets materialize` first", file=sys.stderr)
        return 1
    print(root.read_bytes(layout.REPORT_MD).decode())
    return 0


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
    from dd_assets.methods_catalog import images_source

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
    import pandas as pd
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
            frames.append(pq.read_table(fh, columns=["class_index", "class_name", "complexity"]).to_pandas())
    df = pd.concat(frames, ignore_index=True)
    names = df.groupby("class_index")["class_name"].first()
    n_classes = max(len(root.fs.glob(root.path(layout.MANIFEST_GLOB))), int(names.index.max()) + 1)
    gaps = sorted(set(range(n_classes)) - set(names.index))
    if gaps:
        print(f"easy-hard: classes {gaps} have no Comp-DD table yet (left out)", file=sys.stderr)
    class_names = [str(names.get(i, f"<class {i}>")) for i in range(n_classes)]
    table = class_complexity(df["complexity"].to_numpy(), df["class_index"].to_numpy(), class_names)
    have = int(table["complexity"].notna().sum())
    k = args.k if args.k is not None else min(10, have // 2)
    try:
        split = split_easy_hard(table, k=k, threshold=args.threshold)
    except ValueError as err:
        print(f"easy-hard: {err}; pass a smaller --k (or --threshold)", file=sys.stderr)
        return 2
    ranked = table.dropna(subset=["complexity"]).sort_values(["complexity", "class_index"], ascending=[False, True])
    how = f"threshold {args.threshold}" if args.threshold is not None else f"k = {k}"
    print(f"Comp-DD class complexity, profile {params.profile} ({len(df)} train images; 1 - share of teacher "
          f"Grad-CAM >= 0.5, higher = more complex), {how}:")
    for r in ranked.itertuples():
        tag = "hard" if r.class_name in set(split.hard["class_name"]) else "easy" if r.class_name in set(split.easy["class_name"]) else ""
        print(f"  {r.class_name:24s} {r.complexity:.4f}  ({r.n_images} images) {tag}")

    def in_order(rows: pd.DataFrame) -> list[str]:  # dataset order, as data.classes indexes them
        return [str(c) for c in rows.sort_values("class_index")["class_name"]]

    doc = {
        "comp_dd": {"profile": params.profile, "k": None if args.threshold is not None else k, "threshold": args.threshold,
                    "complexity": {str(r.class_name): round(float(r.complexity), 6) for r in ranked.itertuples()}},
        "easy": {"data": {"classes": in_order(split.easy)}},
        "hard": {"data": {"classes": in_order(split.hard)}},
    }
    text = ("# Comp-DD easy / hard class subsets (dd-assets easy-hard); paste one `data:` block into a profile\n"
            + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    root.write_bytes(layout.EASY_HARD, text.encode())
    print(f"easy: {doc['easy']['data']['classes']}\nhard: {doc['hard']['data']['classes']}\nwrote {root.url(layout.EASY_HARD)}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """`dagster dev` on loopback with the repo's workspace and this profile's instance."""
    from dd_assets.config import PROJECT_ROOT
    from dd_assets.orchestrate import ensure_dagster_home

    params = _load(args.profile)
    home = ensure_dagster_home(params.profile)
    os.environ["DD_ASSETS_PROFILE"] = params.profile
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    cmd = [dagster, "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", args.host, "-p", str(args.port)]
    print(f"profile {params.profile}: DAGSTER_HOME={home}; {' '.join(cmd)}", flush=True)
    os.chdir(PROJECT_ROOT)
    os.execv(dagster, cmd)
    return 0  # not reached


def cmd_mlflow_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI over the profile's tracking store, where the run links point."""
    from dd_assets.storage import DataRoot
    from dd_assets.tracking import DEFAULT_MLFLOW_UI, MLFLOW_UI_ENV, mlflow_ui_base, tracking_uri

    params = _load(args.profile)
    uri = tracking_uri(DataRoot(params.data_root))
    base = f"http://{args.host}:{args.port}"
    if base != mlflow_ui_base():
        print(f"note: run links point at {mlflow_ui_base()}; set {MLFLOW_UI_ENV}={base} before materializing "
              f"(or serve on the default, {DEFAULT_MLFLOW_UI}) so they open this UI", flush=True)
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    print(f"profile {params.profile}: MLflow UI at {base} over {uri}", flush=True)
    os.execv(mlflow, cmd)
    return 0  # not reached


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the install: required (packages, torch device, params, data root) and optional
    (the DVC environment).  Exit 1 only when something required is missing; an optional part
    missing is a warning."""
    import importlib.metadata as md
    import shutil

    from dd_assets.config import PROJECT_ROOT

    problems = warnings = 0

    def line(ok: bool, what: str, detail: str, optional: bool = False) -> None:
        nonlocal problems, warnings
        if not ok:
            warnings += optional
            problems += not optional
        mark = "ok" if ok else ("--" if optional else "!!")
        print(f"[{mark}] {what:18s} {detail}" + (" (optional)" if optional and not ok else ""))

    print("required:")
    for pkg in ("torch", "torchvision", "timm", "dagster", "dagster-webserver", "mlflow", "zarr", "duckdb", "mlxtend", "diffusers"):
        try:
            line(True, pkg, md.version(pkg))
        except md.PackageNotFoundError:
            line(False, pkg, "not installed: run `make install`")
    try:
        import torch

        dev = "cuda (" + torch.cuda.get_device_name(0) + ")" if torch.cuda.is_available() else "cpu"
        line(True, "torch device", f"{dev}, {torch.get_num_threads()} threads")
    except Exception as err:  # a broken torch install is exactly what doctor is for
        line(False, "torch device", f"{type(err).__name__}: {err}")
    try:
        params = _load(args.profile)
        line(True, "params", f"{params.path} (profile {params.profile})")
        from dd_assets.storage import DataRoot

        DataRoot(params.data_root).check_writable()
        line(True, "data root", f"{params.data_root} is writable")
    except Exception as err:
        line(False, "params/data root", str(err))
    print("optional:")
    dvc = PROJECT_ROOT / ".venv-dvc" / "bin" / "dvc"
    found = str(dvc) if dvc.exists() else shutil.which("dvc")
    line(bool(found), "DVC environment", found or "missing: `make dvc-env` for `dvc repro` (docs/dvc.md)", optional=True)
    try:
        from dd_assets import dvc_pipeline

        stale = dvc_pipeline.check(_load(args.profile)) if _load(args.profile).profile == "default" else None
        line(stale is None, "dvc.yaml", stale or "matches the asset graph", optional=True)
    except Exception as err:  # doctor reports, it does not crash
        line(False, "dvc.yaml", f"{type(err).__name__}: {err}", optional=True)
    if problems:
        print(f"{problems} problem(s)" + (f", {warnings} optional part(s) missing" if warnings else ""))
        return 1
    print("all required parts ok" + (f"; {warnings} optional part(s) missing" if warnings else ""))
    return 0


def cmd_init_data(args: argparse.Namespace) -> int:
    """Inspect an ImageFolder, print the report, its warnings and a profile; ``--write`` adds
    the profile to the params file (``--params``, else $DD_ASSETS_PARAMS / the repo's)."""
    from pathlib import Path

    from dd_assets import init_data
    from dd_assets.config import PROJECT_ROOT, ParamsError, params_path

    params_file = Path(args.params) if args.params else params_path()
    name = args.name or init_data.default_name(args.path)
    if args.max_per_class is not None and args.max_per_class < 0:
        print("init-data: --max-per-class must be >= 0 (0: decode every image)", file=sys.stderr)
        return 2
    try:
        report = init_data.inspect_folder(args.path, max_images_per_class=args.max_per_class or None)
        suggestion = init_data.suggest_profile(report, name, PROJECT_ROOT, base=init_data.demo_budget(params_file))
    except (OSError, ValueError) as err:
        print(f"init-data: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"\nwarnings ({len(suggestion.warnings)}):" if suggestion.warnings else "\nwarnings: none")
    for w in suggestion.warnings:
        print(f"  - {w}")
    print(f"\nprofile (under profiles: in {params_file}):")
    print(init_data.render_profile(suggestion), end="")
    if not args.write:
        print(f"\nnot written: add --write to add it to {params_file}")
        return 0
    try:
        init_data.write_profile(params_file, suggestion, force=args.force)
    except ParamsError:  # the schema refused it: one line from main, exit 2
        raise
    except (OSError, ValueError) as err:  # ProfileExistsError included
        print(f"init-data: {err}", file=sys.stderr)
        return 2
    print(f"\nadded profile {name!r} to {params_file}; run it with DD_ASSETS_PROFILE={name} dd-assets materialize")
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    """Write dvc.yaml from the asset graph (one stage per method family); --check only compares."""
    from dd_assets import dvc_pipeline

    params = _load(args.profile)
    if args.check:
        why = dvc_pipeline.check(params)
        print(why or f"{dvc_pipeline.dvc_yaml_path()} matches the asset graph of profile {params.profile}")
        return 1 if why else 0
    stages = dvc_pipeline.build_stages(params)
    path = dvc_pipeline.write(params)
    print(f"wrote {path}: {len(stages)} stages ({', '.join(s.name for s in stages)}); "
          "`dvc repro` re-runs the stages whose params, code or inputs changed")
    return 0


PROFILE_HELP = "params.yaml profile (default: 'profile:' in params.yaml or $DD_ASSETS_PROFILE)"

# name: (one-line help in `dd-assets --help`, description in `dd-assets NAME --help`)
COMMANDS = {
    "methods": ("list registered methods by stage",
                "List the methods params.yaml's 'methods:' block may use (with their defaults) and the "
                "registered implementations of each stage (score, select, compose, label)."),
    "materialize": ("materialize assets (all by default) in dependency order",
                    "Materialize assets of the active profile in dependency order, one Dagster run per "
                    "partition; finished partitions are kept when a later one fails."),
    "stale": ("list stale or missing assets per partition against params.yaml",
              "List every asset partition whose code version, parameters or upstream data changed since it "
              "was materialized, or that was never materialized; `materialize --stale` runs exactly these."),
    "report": ("print the results table",
               "Print the stored results table (reports/results.md under the data root) written by the "
               "'report' asset."),
    "results": ("publish the report's results record: docs/results/<name>.csv + the table generated from it "
                "in docs/results.md",
                "Copy the report's results record into docs/results/<name>.csv (and the budget curve into "
                "docs/img/) and regenerate its table in docs/results.md."),
    "ui": ("serve the Dagster UI (dagster dev) for this profile on loopback",
           "Serve the Dagster UI for this profile (dagster dev with the repo's workspace and the profile's "
           "Dagster home); the Checks tab shows the asset checks of dd_assets/defs/checks.py."),
    "doctor": ("check the install (versions, torch device, data root, DVC env)",
               "Check the install: required packages, torch device, params and a writable data root "
               "(exit 1 when one is missing); the optional DVC environment is only a warning."),
    "audit": ("lineage of one distilled image as JSON, plus a PNG of its sources and boxes",
              "Print the lineage of one distilled image as JSON (source files, crop boxes, scores, "
              "versions) and write a labelled PNG of it next to its sources with their boxes."),
    "easy-hard": ("Comp-DD easy / hard class subsets from comp_dd_complexity (EDF Sec. 3)",
                  "Rank classes by Comp-DD complexity from the stored comp_dd_complexity tables and write "
                  "the k easiest / hardest as pasteable data.classes lists (EDF Sec. 3)."),
    "init-data": ("inspect your own ImageFolder and print (or --write) a params.yaml profile for it",
                  "Inspect an ImageFolder (train/<class>/* [+ test/<class>/*] or <class>/*): classes, counts, "
                  "image sizes, aspect ratios, modes, mean/std, unreadable files; print warnings and a profile "
                  "with image_size, mean/std and scaled budgets. Without one, data.source: folder inherits the "
                  "MNIST defaults (image_size 28, MNIST mean/std). --write adds it under profiles: of the params "
                  "file, keeping its comments."),
    "mlflow-ui": ("serve the MLflow UI over this profile's tracking store (where run links point)",
                  "Serve the MLflow UI (mlflow ui) over the profile's sqlite tracking store on loopback. Run links "
                  "in asset metadata and student tables point at $DD_ASSETS_MLFLOW_UI (default "
                  "http://127.0.0.1:5000), the address this command serves by default."),
    "dvc-yaml": ("write dvc.yaml from the asset graph (one stage per method family); --check compares",
                 "Generate dvc.yaml from the asset graph of the profile (normally the default one): stages data, "
                 "shared, one per method family and report, each listing exactly the params keys, code and "
                 "upstream outputs its assets read, so a change to one method re-runs only its chain. "
                 "--check exits 1 when the committed file is stale."),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dd-assets", description="Region-focused dataset distillation as Dagster assets.")
    ap.add_argument("--profile", help=PROFILE_HELP)
    # --profile after the subcommand too (`dd-assets report --profile tiny`); SUPPRESS keeps the
    # value given before the subcommand when none is given after it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", default=argparse.SUPPRESS, help=PROFILE_HELP)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str) -> argparse.ArgumentParser:
        short, long = COMMANDS[name]
        return sub.add_parser(name, help=short, description=long, parents=[common])

    add("methods").set_defaults(fn=cmd_methods)
    m = add("materialize")
    m.add_argument("--select", nargs="*", help="asset name patterns (fnmatch), e.g. 'rded_*' teacher")
    m.add_argument("--group", nargs="*", help="only assets of these groups (data, models, scoring, selection, "
                   "composition, labels, students, reports)")
    m.add_argument("--ipc", nargs="*", help="only these IPC partitions")
    m.add_argument("--device", help="torch device: auto (default), cpu, cuda, cuda:N")
    m.add_argument("--batch-size", type=int, help="inference batch size (scoring, features, labels)")
    m.add_argument("--workers", type=int, help="image decoding workers per run")
    m.add_argument("--progress", action="store_true", help="progress bars on training and scoring loops")
    m.add_argument("--jobs", type=int, default=1,
                   help="run the partitions of a wave (e.g. classes) as N parallel runs (processes)")
    m.add_argument("--log-level", default="INFO", help="Dagster console log level (DEBUG shows every event)")
    m.add_argument("--stale", action="store_true", help="only what `dd-assets stale` lists (within --select)")
    m.set_defaults(fn=cmd_materialize)
    add("stale").set_defaults(fn=cmd_stale)
    add("report").set_defaults(fn=cmd_report)
    r = add("results")
    r.add_argument("--name", help="record name (default: the profile, e.g. cifar10)")
    r.add_argument("--csv", help="CSV path (default: docs/results/<name>.csv)")
    r.add_argument("--doc", help="markdown file embedding the table (default: docs/results.md)")
    r.set_defaults(fn=cmd_results)
    u = add("ui")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=3000)
    u.set_defaults(fn=cmd_ui)
    add("doctor").set_defaults(fn=cmd_doctor)
    a = add("audit")
    a.add_argument("--method", required=True)
    a.add_argument("--ipc", type=int, required=True)
    a.add_argument("--index", type=int, required=True, help="distilled image index (0 .. classes*IPC-1)")
    a.add_argument("--out", help="PNG path (default: <data root>/reports/audit/...)")
    a.set_defaults(fn=cmd_audit)
    e = add("easy-hard")
    e.add_argument("--k", type=int, help="classes per subset (default: 10, or half the classes when fewer than 20)")
    e.add_argument("--threshold", type=float, help="split by complexity >= threshold instead of by rank")
    e.set_defaults(fn=cmd_easy_hard)
    i = add("init-data")
    i.add_argument("path", help="the ImageFolder to inspect")
    i.add_argument("--name", help="profile name (default: the folder's name); its data root is data/<name>/")
    i.add_argument("--write", action="store_true", help="add the profile under profiles: of the params file")
    i.add_argument("--force", action="store_true", help="with --write: replace a profile of that name")
    i.add_argument("--params", help="params file to write (default: $DD_ASSETS_PARAMS, else the repo's params.yaml)")
    i.add_argument("--max-per-class", type=int, default=500, metavar="N",
                   help="decode a seeded sample of at most N images per class and split for the statistics "
                        "(default 500; 0: all). Not data.max_per_class")
    i.set_defaults(fn=cmd_init_data)
    mu = add("mlflow-ui")
    mu.add_argument("--host", default="127.0.0.1")
    mu.add_argument("--port", type=int, default=5000)
    mu.set_defaults(fn=cmd_mlflow_ui)
    d = add("dvc-yaml")
    d.add_argument("--check", action="store_true", help="only say whether dvc.yaml is current (exit 1 if not)")
    d.set_defaults(fn=cmd_dvc_yaml)
    return ap


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: the reader went away (`dd-assets ... | head`), and the
    interpreter's final flush must not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dd_assets.config import ParamsError

    try:
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return rc
    except BrokenPipeError:  # `dd-assets stale | head`: the reader has what it wanted
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a tool killed by the broken pipe would report
    except ParamsError as err:  # one line naming the file and the parameter, no traceback
        print(f"{args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished partitions are kept, re-run to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
