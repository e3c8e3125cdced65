"""Run links are clickable URLs of the MLflow UI (issue 21 item 4)."""

from __future__ import annotations

from types import SimpleNamespace

from dd_assets import cli
from dd_assets.commands import tools
from dd_assets.tracking import MLFLOW_UI_ENV, clickable, run_link

RUN = SimpleNamespace(info=SimpleNamespace(experiment_id="3", run_id="abc"))


def test_links_point_at_the_configured_mlflow_ui(monkeypatch):
    monkeypatch.delenv(MLFLOW_UI_ENV, raising=False)
    assert run_link(RUN) == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    monkeypatch.setenv(MLFLOW_UI_ENV, "https://mlflow.lab.example/")
    assert run_link(RUN) == "https://mlflow.lab.example/#/experiments/3/runs/abc"
    # links stored before the base was configurable become URLs of the current UI
    assert clickable("mlflow:/#/experiments/3/runs/abc") == "https://mlflow.lab.example/#/experiments/3/runs/abc"
    assert clickable("http://x/#/experiments/1/runs/z") == "http://x/#/experiments/1/runs/z"


def test_mlflow_ui_command_serves_the_profile_store(tiny_env, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(tools.os, "execv", lambda exe, cmd: seen.update(exe=exe, cmd=cmd))
    monkeypatch.delenv(MLFLOW_UI_ENV, raising=False)
    assert cli.main(["mlflow-ui", "--port", "5001"]) == 0
    cmd = seen["cmd"]
    assert cmd[1] == "ui" and cmd[cmd.index("--port") + 1] == "5001"
    store = cmd[cmd.index("--backend-store-uri") + 1]
    assert store.startswith("sqlite:///") and store.endswith("mlflow.db") and str(tiny_env) in store
    # serving elsewhere than the links point: say how to make them match
    assert f"{MLFLOW_UI_ENV}=http://127.0.0.1:5001" in capsys.readouterr().out
