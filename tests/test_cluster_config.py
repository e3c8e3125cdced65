"""The cluster configuration dd_assets generates (issue 20): validated against Dagster's and
dagster-k8s's own schemas, GPU requests exactly on the GPU-pool steps."""

from __future__ import annotations

import pytest
import yaml

from dd_assets import cluster_config as cc
from dd_assets.cli import main


def _validate(config_type, value):
    from dagster._config import process_config, resolve_to_config_type

    res = process_config(resolve_to_config_type(config_type), value)
    assert res.success, [e.message for e in res.errors]
    return res.value


def test_k8s_instance_yaml_validates_and_loads(tmp_path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    assert main(["cluster-config", "k8s", "--out", str(tmp_path), "--image", "registry/dd-assets:1",
                 "--gpu-slots", "4", "--max-runs", "6", "--profile", "tiny"]) == 0
    doc = yaml.safe_load((tmp_path / "dagster.yaml").read_text())
    monkeypatch.setenv(cc.PG_URL_ENV, "postgresql://u:p@127.0.0.1:5432/dagster")
    config, _ = dagster_instance_config(str(tmp_path))   # Dagster's own instance schema
    assert config["concurrency"] == {"runs": {"max_concurrent_runs": 6}, "pools": {"default_limit": 4}}
    assert config["storage"]["postgres"]["postgres_url"] == {"env": cc.PG_URL_ENV}
    launcher = doc["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    value = _validate(K8sRunLauncher.config_type(), launcher["config"])   # dagster-k8s's schema
    assert value["job_image"] == "registry/dd-assets:1"
    assert "DD_ASSETS_EXECUTOR=k8s" in value["env_vars"]   # run pods launch their steps as Jobs


def test_k8s_step_config_requests_gpus_exactly_on_gpu_steps(tiny_env, tmp_path):
    from dagster_k8s import k8s_job_executor

    from dd_assets.config import load_params
    from dd_assets.definitions import build_assets, build_definitions

    assets = build_assets(load_params())
    cfg = cc.k8s_executor_config(assets, gpus_per_step=2)
    _validate(k8s_job_executor.config_schema.config_type, cfg)
    per_step = cfg["per_step_k8s_config"]
    for step in ("teacher", "rded_scores", "random_soft_labels", "random_students", "vit_scorer"):
        assert per_step[step]["container_config"]["resources"]["limits"] == {cc.GPU_RESOURCE: 2}, step
    for step in ("raw_images", "manifest", "rded_selection", "random_selection"):
        assert step not in per_step, step   # table-only steps take no GPU
    assert cc.GPU_RESOURCE not in str(cfg["step_k8s_config"])
    defs = build_definitions(load_params(), executor="k8s")
    assert defs.executor.name == "k8s"
    with pytest.raises(ValueError, match="at least one GPU"):
        cc.k8s_executor_config(assets, gpus_per_step=0)


def test_dask_instance_and_refusals(tmp_path, monkeypatch, capsys):
    from dagster._core.instance.config import dagster_instance_config

    assert main(["cluster-config", "dask", "--out", str(tmp_path)]) == 0
    monkeypatch.setenv(cc.PG_URL_ENV, "postgresql://u:p@127.0.0.1:5432/dagster")
    config, _ = dagster_instance_config(str(tmp_path))
    assert "run_launcher" not in config and "pools" not in config["concurrency"]
    assert "DD_ASSETS_EXECUTOR=dask" in capsys.readouterr().out
    monkeypatch.delenv(cc.K8S_IMAGE_ENV, raising=False)
    assert main(["cluster-config", "k8s", "--out", str(tmp_path / "k")]) == 2
    assert "--image" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'k8s' or 'dask'"):
        cc.instance_config("slurm")
