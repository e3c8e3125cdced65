"""``dd-assets ui``, ``mlflow-ui``, ``doctor`` and ``dvc-yaml``: the UIs, the install check and
the DVC pipeline file."""

from __future__ import annotations

import argparse
import os
import sys

from dd_assets.commands.common import _load


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


def cmd_cluster_config(args: argparse.Namespace) -> int:
    """Write the instance's dagster.yaml for a cluster (and, for k8s, show the step executor's
    config derived from the asset graph); docs/scale.md "Many machines"."""
    from pathlib import Path

    import yaml

    from dd_assets import cluster_config as cc

    image = args.image or os.environ.get(cc.K8S_IMAGE_ENV)
    try:
        inst = cc.instance_config(args.kind, max_concurrent_runs=args.max_runs, gpu_slots=args.gpu_slots,
                                  image=image, namespace=args.namespace)
    except ValueError as err:
        print(f"cluster-config: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dagster.yaml").write_text(yaml.safe_dump(inst, sort_keys=False))
    print(f"wrote {out / 'dagster.yaml'} ({args.kind}): set ${cc.PG_URL_ENV} and DAGSTER_HOME={out}")
    if args.kind == "k8s":
        from dd_assets.definitions import build_assets

        params = _load(args.profile)
        cfg = cc.k8s_executor_config(build_assets(params), gpus_per_step=args.gpus_per_step)
        (out / "k8s_executor.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"wrote {out / 'k8s_executor.yaml'}: what DD_ASSETS_EXECUTOR=k8s applies "
              f"({len(cfg['per_step_k8s_config'])} GPU steps request {args.gpus_per_step} {cc.GPU_RESOURCE})")
    else:
        print("start `dask scheduler` and one `dask worker <scheduler> --nthreads 1 --resources GPU=1` per GPU; "
              f"run with DD_ASSETS_EXECUTOR=dask {'DD_ASSETS_DASK_SCHEDULER'}=tcp://<scheduler>:8786")
    return 0
