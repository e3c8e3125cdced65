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


def _select_keys(defs, patterns: list[str] | None):
    import dagster as dg

    keys = sorted(defs.resolve_asset_graph().get_all_asset_keys(), key=lambda k: k.to_user_string())
    if not patterns:
        return keys
    chosen = [k for k in keys if any(fnmatch.fnmatch(k.to_user_string(), p) for p in patterns)]
    if not chosen:
        names = ", ".join(k.to_user_string() for k in keys)
        raise SystemExit(f"--select {patterns} matches no asset; assets: {names}")
    return [dg.AssetKey(k.path) for k in chosen]


def cmd_materialize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    params = _load(args.profile)
    import dagster as dg

    from dd_assets.definitions import build_definitions
    from dd_assets.orchestrate import ensure_dagster_home, execute, plan

    ensure_dagster_home()
    defs = build_definitions(params)
    keys = _select_keys(defs, args.select)
    graph = defs.resolve_asset_graph()
    restrict: dict[str, list[str]] = {}
    for k in keys:
        pdef = graph.get(k).partitions_def
        if pdef is None:
            continue
        allp = pdef.get_partition_keys()
        if args.ipc and set(args.ipc) & set(allp) == set(args.ipc) and all(p.isdigit() for p in allp):
            restrict[k.to_user_string()] = [p for p in allp if p in args.ipc]
        elif args.ipc and all(p.isdigit() for p in allp):
            raise SystemExit(f"--ipc {args.ipc}: not in params.yaml ipcs {allp}; add it to 'ipcs:' first")
    the_plan = plan(defs, keys, restrict or None)
    instance = dg.DagsterInstance.get()
    print(f"profile {params.profile}: {len(keys)} assets, {len(the_plan)} runs (data root {params.data_root})")
    bar = tqdm(total=len(the_plan), unit="run", disable=not sys.stderr.isatty() and not args.progress)

    def on_step(i, step):
        names = ",".join(k.to_user_string() for k in step.keys)
        bar.set_description(f"{names[:60]}[{step.partition or '-'}]")
        if i:
            bar.update(1)
        if not bar.disable:
            return
        print(f"[{i + 1}/{len(the_plan)}] {names} [{step.partition or '-'}]", flush=True)

    execute(defs, the_plan, instance, on_step)
    bar.update(1)
    bar.close()
    print("done")
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dd-assets", description="Region-focused dataset distillation as Dagster assets.")
    ap.add_argument("--profile", help="params.yaml profile (default: 'profile:' in params.yaml or $DD_ASSETS_PROFILE)")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list registered methods by stage").set_defaults(fn=cmd_methods)
    m = sub.add_parser("materialize", help="materialize assets (all by default) in dependency order")
    m.add_argument("--select", nargs="*", help="asset name patterns (fnmatch), e.g. 'rded_*' teacher")
    m.add_argument("--ipc", nargs="*", help="only these IPC partitions")
    m.add_argument("--progress", action="store_true", help="progress bar even when not on a terminal")
    m.set_defaults(fn=cmd_materialize)
    sub.add_parser("report", help="print the results table").set_defaults(fn=cmd_report)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished partitions are kept, re-run to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
