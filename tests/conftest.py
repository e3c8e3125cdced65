from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dd_assets.config import PROJECT_ROOT


def write_params(tmp: Path, profile: str = "tiny", overrides: dict | None = None, raw_root: Path | None = None) -> Path:
    """A copy of the repo's params.yaml with the given profile active, data under ``tmp``."""
    doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    doc["profile"] = profile
    prof = doc["profiles"].setdefault(profile, {}) or {}
    doc["profiles"][profile] = prof
    if raw_root is not None:
        prof.setdefault("data", {})["root"] = str(raw_root)
    for key, value in (overrides or {}).items():
        node = prof
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def tiny_env(tmp_path, monkeypatch):
    """Environment for a tiny end-to-end run fully inside ``tmp_path``."""
    raw = tmp_path / "raw"
    params = write_params(tmp_path, "tiny", raw_root=raw)
    monkeypatch.setenv("DD_ASSETS_PARAMS", str(params))
    monkeypatch.delenv("DD_ASSETS_PROFILE", raising=False)
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
