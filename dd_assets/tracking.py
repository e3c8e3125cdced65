"""MLflow tracking: one run per teacher or student training, in a sqlite store under the
data root (or ``MLFLOW_TRACKING_URI`` when set).  No Dagster imports."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from dd_assets.storage import DataRoot
from dd_assets.storage import layout


def tracking_uri(root: DataRoot) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if not root.is_local:
        raise RuntimeError(
            f"data root {root.uri} is remote: set MLFLOW_TRACKING_URI to a tracking server or a local sqlite URI"
        )
    db = root.local(layout.MLFLOW_DB)
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


@contextlib.contextmanager
def mlflow_run(
    root: DataRoot, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any]
) -> Iterator[Any]:
    """Start an MLflow run; yields the ``mlflow`` module with the run active."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(root))
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        # artifacts beside the data (an object-store root: the same bucket, MLflow's own S3 client)
        artifacts = root.local(layout.MLFLOW_ARTIFACTS).as_uri() if root.is_local else root.url(layout.MLFLOW_ARTIFACTS)
        try:
            exp_id = mlflow.create_experiment(experiment, artifact_location=artifacts)
        except Exception:  # created concurrently by another process
            exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags):
        mlflow.log_params(_flatten(params))
        try:
            yield mlflow
        except BaseException as err:
            from dd_assets.run_guard import INTERRUPT_ERRORS

            if type(err).__name__ in INTERRUPT_ERRORS:   # Ctrl-C: KILLED, not FAILED (a crash)
                mlflow.end_run(status="KILLED")
            raise


# Where the MLflow UI serves the store (`dd-assets mlflow-ui` starts it there): run links in asset
# metadata and tables point at it. Operational, not a parameter: links are excluded from hashes.
MLFLOW_UI_ENV = "DD_ASSETS_MLFLOW_UI"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


def mlflow_ui_base() -> str:
    return (os.environ.get(MLFLOW_UI_ENV) or DEFAULT_MLFLOW_UI).rstrip("/")


def run_link(run: Any) -> str:
    """A clickable URL of an MLflow run in the MLflow UI at :func:`mlflow_ui_base`."""
    info = run.info
    return f"{mlflow_ui_base()}/#/experiments/{info.experiment_id}/runs/{info.run_id}"


def clickable(link: str) -> str:
    """A stored run link as a URL of the current MLflow UI (links stored before the UI base was
    configurable read ``mlflow:/#/experiments/...``)."""
    if link.startswith("mlflow:/"):
        return f"{mlflow_ui_base()}/{link[len('mlflow:/'):].lstrip('/')}"
    return link
