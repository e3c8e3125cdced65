"""``dd-assets``: the command line (argparse is built in ``main``, never at import).

This module holds the help texts, the parser and the dispatch; the subcommands are implemented
in :mod:`dd_assets.commands`, one module per concern."""

from __future__ import annotations

import argparse
import os
import sys

from dd_assets.commands.data import cmd_init_data
from dd_assets.commands.inspection import cmd_audit, cmd_easy_hard, cmd_methods, cmd_report, cmd_results
from dd_assets.commands.running import cmd_materialize, cmd_stale
from dd_assets.commands.tools import cmd_cluster_config, cmd_doctor, cmd_dvc_yaml, cmd_mlflow_ui, cmd_ui


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
    "cluster-config": ("write the instance dagster.yaml (and step config) for a Kubernetes or dask cluster",
                       "Write dagster.yaml for running on many machines: Postgres storage ($DAGSTER_PG_URL), the run "
                       "queue, the gpu pool's limit, and for k8s the K8sRunLauncher plus k8s_executor.yaml (each "
                       "GPU-pool step requests GPUs). See docs/scale.md, 'Many machines'."),
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
    m.add_argument("--student-batch", type=int,
                   help="students of one row trained at once (vmapped; 1 = one at a time, the default; "
                        "equal up to float rounding, faster on a GPU)")
    m.add_argument("--progress", action="store_true", help="progress bars on training and scoring loops")
    m.add_argument("--backfill", action="store_true",
                   help="launch the selection as one Dagster asset backfill (as the UI does): the daemon's run "
                        "queue runs one run per partition, run_queue.max_concurrent_runs at once (dagster.yaml), "
                        "each with the executor DD_ASSETS_EXECUTOR names (in_process, multiprocess, dask); a "
                        "dagster-daemon is started for the wait when none serves the instance")
    m.add_argument("--jobs", type=int, default=None, help=argparse.SUPPRESS)   # removed: a clear message (running.py)
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
    cc = add("cluster-config")
    cc.add_argument("kind", choices=["k8s", "dask"])
    cc.add_argument("--out", required=True, help="folder for dagster.yaml (the cluster's DAGSTER_HOME)")
    cc.add_argument("--image", help="k8s: the image with dd_assets (default: $DD_ASSETS_K8S_IMAGE)")
    cc.add_argument("--namespace", default="dagster", help="k8s: namespace of run and step jobs")
    cc.add_argument("--max-runs", type=int, default=8, help="runs at once (the run queue)")
    cc.add_argument("--gpu-slots", type=int, help="GPU steps at once across the cluster (the gpu pool's limit)")
    cc.add_argument("--gpus-per-step", type=int, default=1, help="k8s: GPUs each GPU-pool step requests")
    cc.set_defaults(fn=cmd_cluster_config)
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
