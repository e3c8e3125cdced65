"""dvc.yaml generated from the asset graph (dd_assets/dvc_pipeline.py; issue 17 item 9).

That every stage writes only inside its outputs and produces all of them is checked where the
graph runs: tests/test_e2e.py materializes the tiny profile stage by stage."""

from __future__ import annotations

import pytest
import yaml

from dd_assets import dvc_pipeline
from dd_assets.config import PROJECT_ROOT, load_params
from tests.conftest import write_params


@pytest.fixture(scope="module")
def default_stages():
    params = load_params(PROJECT_ROOT / "params.yaml", "default")
    return params, dvc_pipeline.build_stages(params)


@pytest.fixture(scope="module")
def all_stages():
    """Every methods entry (the demo's profile builds a subset): profile default_all, which extends it."""
    params = load_params(PROJECT_ROOT / "params.yaml", "default_all")
    return params, dvc_pipeline.build_stages(params)


def test_committed_dvc_yaml_is_what_the_graph_generates(monkeypatch):
    monkeypatch.delenv("DD_ASSETS_PROFILE", raising=False)
    params = load_params(PROJECT_ROOT / "params.yaml", "default")
    assert dvc_pipeline.check(params) is None, "dvc.yaml is stale: run `dd-assets dvc-yaml`"


def test_one_stage_per_method_family_and_a_method_param_reaches_only_its_stage(all_stages):
    params, stages = all_stages
    names = [s.name for s in stages]
    fams = dict.fromkeys(dvc_pipeline.families(params).values())
    assert names == ["data", "shared", *(f"method-{f}" for f in fams), "report"]
    by = {s.name: s for s in stages}
    # every entry's parameters are tracked by its family's stage and by no other
    for entry, fam in dvc_pipeline.families(params).items():
        holders = [s.name for s in stages if any(k == f"methods.{entry}" or k.endswith(f".methods.{entry}")
                                                 for k in s.params)]
        assert holders == [f"method-{fam}"], (entry, holders)
    # variants ride with their base method; a family's own models and scores are in its stage
    assert {"nrr_dbr_students", "cam_maps", "cidd_scores"} <= set(by["method-nrr"].assets)
    assert {"vit_scorer", "focusdc_attention", "focusdc_dft_students"} <= set(by["method-focusdc"].assets)
    assert {"diffusion_model", "dift_features", "ddps_clusters"} <= set(by["method-ddps"].assets)
    assert "expert_trajectories" in by["method-edf"].assets
    assert "diffusion" in by["method-ddps"].params and not any("diffusion" in k for k in by["method-rded"].params)
    # what several families read is shared
    assert {"teacher", "teacher_features"} <= set(by["shared"].assets)
    assert "${D}/models/teacher" in by["method-rded"].deps and "${D}/models/teacher" in by["shared"].outs
    # an added IPC is new partitions for every method stage
    assert all("ipcs" in s.params for s in stages if s.name.startswith("method-"))


def test_outputs_are_disjoint_folders_and_inputs_come_from_earlier_stages(default_stages):
    _, stages = default_stages
    owner: dict[str, str] = {}
    for s in stages:
        for o in s.outs:
            for other, st in owner.items():
                assert not (o == other or o.startswith(other + "/") or other.startswith(o + "/")), (o, st, s.name)
            owner[o] = s.name
    seen: set[str] = set()
    for s in stages:
        for d in s.deps:
            if d.startswith("${D}/"):
                assert d in seen, f"stage {s.name} reads {d} before a stage writes it"
        seen |= set(s.outs)


def test_params_keys_exist_in_the_file_and_profile_overrides_are_tracked(tmp_path):
    """Every params key is a real key of params.yaml (DVC fails on a missing one); a profile's
    override of a method is listed under profiles.<name> in that method's stage only."""
    path = write_params(tmp_path, "tiny")
    params = load_params(path, "tiny")
    doc = yaml.safe_load(path.read_text())
    for s in dvc_pipeline.build_stages(params):
        for key in s.params:
            node = doc
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{s.name}: {key} not in {path}"
                node = node[part]
    by = {s.name: s for s in dvc_pipeline.build_stages(params)}
    assert "profiles.tiny.methods.rded" in by["method-rded"].params
    assert not any("methods.rded" in k for n, s in by.items() if n != "method-rded" for k in s.params)


def test_a_profile_that_extends_another_tracks_the_overrides_of_both(all_stages):
    """default_all extends default: a stage lists the keys of each profile of the chain that
    overrides what it reads (DVC re-runs it when either changes), and each key exists."""
    _, stages = all_stages
    doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    by = {s.name: s for s in stages}
    assert {"methods.nrr", "profiles.default.methods.nrr", "methods.nrr_dbr",
            "profiles.default_all.methods.nrr_dbr"} <= set(by["method-nrr"].params)
    assert {"profiles.default.teacher", "teacher"} <= set(by["shared"].params)
    assert "profiles.default_all.experts" in by["method-edf"].params
    for s in stages:
        for key in s.params:
            node = doc
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{s.name}: {key} not in params.yaml"
                node = node[part]


def test_a_changed_method_parameter_changes_only_its_stage(tmp_path):
    """Two params files differing in methods.rded.num_crop: only method-rded's tracked values differ."""
    def values(num_crop):
        path = write_params(tmp_path / str(num_crop), "tiny", overrides={"methods.rded.num_crop": num_crop})
        params = load_params(path, "tiny")
        doc = yaml.safe_load(path.read_text())

        def get(key):
            node = doc
            for part in key.split("."):
                node = node[part]
            return node
        return {s.name: [get(k) for k in s.params] for s in dvc_pipeline.build_stages(params)}

    (tmp_path / "3").mkdir()
    (tmp_path / "4").mkdir()
    a, b = values(3), values(4)
    assert [n for n in a if a[n] != b[n]] == ["method-rded"]


def test_an_asset_without_an_output_rule_is_refused():
    with pytest.raises(ValueError, match="no output folders known for asset 'mystery'"):
        dvc_pipeline.asset_outs("mystery", {"rded": "rded"}, load_params(PROJECT_ROOT / "params.yaml", "default"))


def test_every_methods_module_is_a_dependency_of_some_stage(all_stages):
    _, stages = all_stages
    deps = {d for s in stages for d in s.deps}
    for mod in sorted((PROJECT_ROOT / "dd_assets" / "methods").glob("*.py")):
        rel = str(mod.relative_to(PROJECT_ROOT))
        if mod.name in ("__init__.py", "builtin.py"):
            continue
        assert rel in deps, f"{rel} is no stage's dependency: add it to dvc_pipeline.FAMILY_CODE or COMMON_CODE"


def test_cli_check_says_stale_and_exits_1(tmp_path, monkeypatch, capsys):
    """`dd-assets dvc-yaml --check` against a dvc.yaml that is not the generated one."""
    from dd_assets import cli

    stale = tmp_path / "dvc.yaml"
    stale.write_text("stages: {}\n")
    monkeypatch.setattr(dvc_pipeline, "dvc_yaml_path", lambda: stale)
    # `--profile` sets DD_ASSETS_PROFILE for the process (commands.common._load): registered here so that it is
    # removed again after the test (a delenv of an absent variable would not be undone)
    monkeypatch.setenv("DD_ASSETS_PROFILE", "default")
    monkeypatch.setenv("DD_ASSETS_PARAMS", str(PROJECT_ROOT / "params.yaml"))
    assert cli.main(["dvc-yaml", "--check", "--profile", "default"]) == 1
    assert "is stale" in capsys.readouterr().out
    assert cli.main(["dvc-yaml", "--profile", "default"]) == 0
    assert cli.main(["dvc-yaml", "--check", "--profile", "default"]) == 0
    assert stale.read_text() == (PROJECT_ROOT / "dvc.yaml").read_text()


def test_committed_dvc_lock_records_every_stage_of_dvc_yaml():
    """dvc.lock comes from a `dvc repro` of the current dvc.yaml: same stages, commands, inputs and
    outputs (its hashes are that run's; after changing a stage, `dvc repro <stage>` and commit)."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    lock = yaml.safe_load((PROJECT_ROOT / "dvc.lock").read_text())["stages"]
    d = stages["vars"][0]["D"]
    cli = stages["vars"][1]["CLI"]
    assert set(lock) == set(stages["stages"])
    for name, st in stages["stages"].items():
        sub = lambda x: x.replace("${D}", d).replace("${CLI}", cli)   # noqa: E731
        assert lock[name]["cmd"] == sub(st["cmd"]), name
        assert {o["path"] for o in lock[name]["outs"]} == {sub(o) for o in st["outs"]}, name
        assert {dep["path"] for dep in lock[name]["deps"]} == {sub(x) for x in st["deps"]}, name
        assert all(o.get("md5") for o in lock[name]["outs"]), name
