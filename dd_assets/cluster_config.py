"""Configuration for running dd_assets on many machines (issue 20; docs/scale.md "Many machines").

Two production shapes, both Dagster's own machinery:

* **Kubernetes** (``dd-assets cluster-config k8s``): the instance launches each run as a pod
  (``dagster_k8s.K8sRunLauncher``), the run's executor launches each *step* as a Kubernetes Job
  (``DD_ASSETS_EXECUTOR=k8s``: ``dagster_k8s.k8s_job_executor``), and every step of the ``gpu``
  pool requests GPUs (``per_step_k8s_config``: ``resources.limits["nvidia.com/gpu"]``) so the
  cluster scheduler places it on a GPU node; CPU-only steps (manifest, selection, clusters)
  request CPU only. Storage is Postgres (``dagster-postgres``), the data root an object store.
* **dask** (``dd-assets cluster-config dask``): runs are launched on a head node (default run
  launcher, the run queue), their steps go to a dask.distributed cluster
  (``DD_ASSETS_EXECUTOR=dask``, dd_assets/dask_executor.py; ``dask worker --resources GPU=1``
  per GPU). The instance is Postgres so workers on other hosts reach it.

``instance_config`` writes the instance's ``dagster.yaml``; ``k8s_executor_config`` is the
executor's config, derived from the asset graph (which steps need a GPU), applied when
``DD_ASSETS_EXECUTOR=k8s`` builds the definitions.
"""

from __future__ import annotations

import copy
import os
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
PG_URL_ENV = "DAGSTER_PG_URL"           # postgresql://user:password@host:5432/dagster (a secret)
K8S_IMAGE_ENV = "DD_ASSETS_K8S_IMAGE"   # the image holding dd_assets + its params.yaml
K8S_NAMESPACE_ENV = "DD_ASSETS_K8S_NAMESPACE"
K8S_GPUS_ENV = "DD_ASSETS_K8S_GPUS_PER_STEP"
INSTANCE_CONFIG_MAP = "dd-assets-instance"   # kubectl create configmap dd-assets-instance --from-file=dagster.yaml
# what every run and step pod needs from the launching environment (not secrets)
FORWARDED_ENV = ["DD_ASSETS_PROFILE", "DD_ASSETS_DATA_ROOT", "DD_ASSETS_EXECUTOR", "DD_ASSETS_MLFLOW_UI"]


def gpu_steps(assets) -> list[str]:
    """Op names (= step keys) of the assets in the ``gpu`` pool (dd_assets/defs/resources.py)."""
    from dd_assets.defs.resources import GPU_POOL

    return sorted(a.node_def.name for a in assets if getattr(a.node_def, "pool", None) == GPU_POOL)


def k8s_executor_config(assets, gpus_per_step: int = 1, cpu: str = "2", memory: str = "8Gi",
                        gpu_memory: str = "32Gi", max_concurrent: int | None = None) -> dict[str, Any]:
    """``k8s_job_executor`` config: every step a Job requesting ``cpu``/``memory``; each step of
    the ``gpu`` pool additionally limits ``gpus_per_step`` GPUs (and ``gpu_memory`` of RAM)."""
    if gpus_per_step < 1:
        raise ValueError(f"{K8S_GPUS_ENV}={gpus_per_step}: a GPU step needs at least one GPU")
    base = {"container_config": {"resources": {"requests": {"cpu": cpu, "memory": memory}}}}
    gpu = {"container_config": {"resources": {"requests": {"cpu": cpu, "memory": gpu_memory},
                                               "limits": {GPU_RESOURCE: gpus_per_step}}}}
    cfg: dict[str, Any] = {"env_vars": list(FORWARDED_ENV), "step_k8s_config": base,
                           "per_step_k8s_config": {name: copy.deepcopy(gpu) for name in gpu_steps(assets)}}
    if max_concurrent:
        cfg["max_concurrent"] = int(max_concurrent)
    return cfg


def k8s_executor(assets):
    """``dagster_k8s.k8s_job_executor`` configured for these assets (``DD_ASSETS_EXECUTOR=k8s``)."""
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as err:
        raise ValueError("DD_ASSETS_EXECUTOR=k8s needs dagster-k8s: pip install -e '.[k8s]'") from err
    gpus = int(os.environ.get(K8S_GPUS_ENV, "1"))
    return k8s_job_executor.configured(k8s_executor_config(assets, gpus_per_step=gpus), name="k8s")


def instance_config(kind: str, max_concurrent_runs: int = 8, gpu_slots: int | None = None,
                    image: str | None = None, namespace: str = "dagster") -> dict[str, Any]:
    """The instance's ``dagster.yaml`` for ``kind`` (``k8s`` or ``dask``): Postgres storage from
    ``$DAGSTER_PG_URL``, the run queue, the ``gpu`` pool limited to ``gpu_slots`` (the number
    of GPUs that may run steps at once across the cluster; None: no limit)."""
    if kind not in ("k8s", "dask"):
        raise ValueError(f"cluster kind {kind!r}: use 'k8s' or 'dask'")
    cfg: dict[str, Any] = {
        "storage": {"postgres": {"postgres_url": {"env": PG_URL_ENV}}},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"},
        "concurrency": {"runs": {"max_concurrent_runs": int(max_concurrent_runs)}},
        "telemetry": {"enabled": False},
    }
    if gpu_slots is not None:
        cfg["concurrency"]["pools"] = {"default_limit": int(gpu_slots)}
    if kind == "k8s":
        if not image:
            raise ValueError(f"cluster-config k8s needs the image of dd_assets (--image or ${K8S_IMAGE_ENV})")
        cfg["run_launcher"] = {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": {
            "job_image": image, "job_namespace": namespace, "image_pull_policy": "IfNotPresent",
            "instance_config_map": INSTANCE_CONFIG_MAP,   # this dagster.yaml, mounted into run pods
            "load_incluster_config": True,
            "env_vars": [*(e for e in FORWARDED_ENV if e != "DD_ASSETS_EXECUTOR"), "DD_ASSETS_EXECUTOR=k8s"],
            "env_secrets": ["dd-assets-secrets"],   # DAGSTER_PG_URL, object-store credentials
            "run_k8s_config": {"container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}}}},
        }}
    return cfg
