"""The asset graph itself: keys, groups, partitions and code versions."""

from __future__ import annotations

import pytest

from dd_assets.config import load_params
from dd_assets.definitions import build_definitions
from tests.conftest import write_params

from dd_assets.methods import registry
from dd_assets.methods.entries import plugin_of

# the default profile's methods entries; a synthesize plugin's entry has no selection asset
_BLOCK = load_params(profile="default_all").block("methods")
METHODS = list(_BLOCK)
SYNTH = {m for m in METHODS if plugin_of(m, _BLOCK[m]).kind == "synthesize"}
EXPECTED = {
    "raw_images": ("data", None),
    "manifest": ("data", "class"),
    "teacher": ("models", None),
    "full_data_student": ("models", None),   # DD-Ranking's HLR reference (eval.hard_labels)
    "teacher_features": ("scoring", "class"),
    "rded_scores": ("scoring", "class"),
    "vit_scorer": ("models", None),
    "focusdc_attention": ("scoring", "class"),
    "cam_maps": ("scoring", "class"),
    "cidd_scores": ("scoring", "class"),
    "diffusion_model": ("models", None),
    "ddps_scores": ("scoring", "class"),
    "dift_features": ("scoring", "class"),
    "ddps_clusters": ("scoring", "class"),
    "expert_trajectories": ("models", None),
    "comp_dd_complexity": ("scoring", "class"),
    "report": ("reports", None),
    "utilization": ("reports", "ipc"),
    # nrr_dbr differs from nrr only in its labels: it trains on nrr's images (no chain of its own)
    **{f"{m}_selection": ("selection", "ipc") for m in METHODS if m != "nrr_dbr" and m not in SYNTH},
    **{f"{m}_distilled": ("composition", "ipc") for m in METHODS if m != "nrr_dbr"},
    **{f"{m}_soft_labels": ("labels", "ipc") for m in METHODS},
    **{f"{m}_students": ("students", "ipc") for m in METHODS},
    # DFT (FocusDC App. 6.2.1) for FocusDC and, as its fair reference, for every random draw
    **{f"{m}_dft_students": ("students", "ipc") for m in METHODS
       if plugin_of(m, _BLOCK[m]).name in ("focusdc", registry.BASELINE)},
}


def _graph(tmp_path, profile="default_all", overrides=None):
    params = load_params(write_params(tmp_path, profile, overrides))
    defs = build_definitions(params)
    return params, defs, defs.resolve_asset_graph()


def test_asset_graph_snapshot(tmp_path):
    params, _, graph = _graph(tmp_path)
    keys = {k.to_user_string(): k for k in graph.get_all_asset_keys()}
    assert sorted(keys) == sorted(EXPECTED)
    ipc_keys = [str(i) for i in params.ipcs]
    for name, (group, part) in EXPECTED.items():
        node = graph.get(keys[name])
        assert node.group_name == group, name
        pdef = node.partitions_def
        if part is None:
            assert pdef is None, name
        elif part == "ipc":
            assert pdef.get_partition_keys() == ipc_keys, name
        else:
            assert pdef.get_partition_keys() == [str(d) for d in range(10)], name
        assert node.code_version, name


def _ancestors(graph, key):
    seen, stack = set(), [key]
    while stack:
        for parent in graph.get(stack.pop()).parent_keys:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def test_scores_and_features_never_depend_on_ipc(tmp_path):
    params, _, graph = _graph(tmp_path)
    ipc_part = [str(i) for i in params.ipcs]
    is_ipc = {k for k in graph.get_all_asset_keys()
              if graph.get(k).partitions_def is not None and graph.get(k).partitions_def.get_partition_keys() == ipc_part}
    assert len(is_ipc) == 4 * len(METHODS) + 4 - 2 - len(SYNTH) + 1  # + 4 DFT assets + utilization
    by_name = {k.to_user_string(): k for k in graph.get_all_asset_keys()}
    for name in ("teacher", "teacher_features", "rded_scores", "manifest", "vit_scorer", "focusdc_attention", "cam_maps",
                 "cidd_scores", "diffusion_model", "ddps_scores", "dift_features", "ddps_clusters",
                 "expert_trajectories", "comp_dd_complexity"):
        key = by_name[name]
        assert key not in is_ipc and not (_ancestors(graph, key) & is_ipc), name
    assert _ancestors(graph, by_name["rded_students"]) >= {by_name["rded_scores"], by_name["teacher"]}


def test_code_version_changes_only_for_the_block_that_changed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, _, g1 = _graph(tmp_path / "a")
    _, _, g2 = _graph(tmp_path / "b", overrides={"methods.rded.num_crop": 3})
    v1 = {k.to_user_string(): g1.get(k).code_version for k in g1.get_all_asset_keys()}
    v2 = {k.to_user_string(): g2.get(k).code_version for k in g2.get_all_asset_keys()}
    changed = sorted(k for k in v1 if v1[k] != v2[k])
    assert changed == ["rded_distilled", "rded_scores", "rded_selection"]


def test_focusdc_alpha_and_eta_reuse_attention_maps(tmp_path):
    """Changing alpha or eta re-versions FocusDC's selection onward, never the ViT or its maps."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, _, g1 = _graph(tmp_path / "a")
    _, _, g2 = _graph(tmp_path / "b", overrides={"methods.focusdc.alpha": 0.6, "methods.focusdc.eta": 10})
    v1 = {k.to_user_string(): g1.get(k).code_version for k in g1.get_all_asset_keys()}
    v2 = {k.to_user_string(): g2.get(k).code_version for k in g2.get_all_asset_keys()}
    assert sorted(k for k in v1 if v1[k] != v2[k]) == ["focusdc_distilled", "focusdc_selection"]


def _versions(graph):
    return {k.to_user_string(): graph.get(k).code_version for k in graph.get_all_asset_keys()}


def test_label_only_variant_trains_on_the_images_of_its_base_entry(tmp_path):
    """nrr_dbr = nrr + DBR labels: its labels and students read nrr's distilled images, so
    the (expensive) refinement runs once; a label parameter re-versions only its labels onward."""
    for d in "abc":
        (tmp_path / d).mkdir()
    _, _, g1 = _graph(tmp_path / "a")
    by = {k.to_user_string(): k for k in g1.get_all_asset_keys()}
    assert {p.to_user_string() for p in g1.get(by["nrr_dbr_soft_labels"]).parent_keys} == {"nrr_distilled", "teacher"}
    assert "nrr_distilled" in {p.to_user_string() for p in g1.get(by["nrr_dbr_students"]).parent_keys}
    _, _, g2 = _graph(tmp_path / "b", overrides={"methods.nrr_dbr.alpha_dbr": 0.5})
    v1, v2 = _versions(g1), _versions(g2)
    assert sorted(k for k in v1 if v1[k] != v2[k]) == ["nrr_dbr_soft_labels", "nrr_dbr_students"]
    # an image parameter makes it a chain of its own, still sharing the CIDD scores
    _, _, g3 = _graph(tmp_path / "c", overrides={"methods.nrr_dbr.iterations": 7})
    v3 = _versions(g3)
    assert sorted(set(v3) - set(v1)) == ["nrr_dbr_distilled", "nrr_dbr_selection"]
    by3 = {k.to_user_string(): k for k in g3.get_all_asset_keys()}
    assert {p.to_user_string() for p in g3.get(by3["nrr_dbr_selection"]).parent_keys} == {"cidd_scores"}
    assert {p.to_user_string() for p in g3.get(by3["nrr_dbr_soft_labels"]).parent_keys} == {"nrr_dbr_distilled", "teacher"}


DDPS_INDEPENDENT = {"diffusion_model", "ddps_scores", "dift_features", "ddps_clusters"}


def _changed(tmp_path, overrides):
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "b").mkdir(exist_ok=True)
    _, _, g1 = _graph(tmp_path / "a")
    _, _, g2 = _graph(tmp_path / "b", overrides=overrides)
    v1, v2 = _versions(g1), _versions(g2)
    assert set(v1) == set(v2)
    return sorted(k for k in v1 if v1[k] != v2[k])


@pytest.mark.parametrize("key,value", [("top_clusters", 5), ("cluster", False), ("tiles", 9), ("grouping", "interleave"),
                                       ("concat_max_ipc", 1)])
def test_ddps_selection_param_reversions_only_selection_onward(tmp_path, key, value):
    """A selection-only DDPS parameter never touches the diffusion model, R, DIFT or clusters."""
    changed = _changed(tmp_path, {f"methods.ddps.{key}": value})
    assert changed == ["ddps_distilled", "ddps_selection"]
    assert not set(changed) & DDPS_INDEPENDENT


def test_ddps_levels_version_on_the_params_they_read(tmp_path):
    for d, overrides, expected in [
        ("p", {"methods.ddps.prefer": "high"}, ["ddps_clusters", "ddps_distilled", "ddps_selection", "dift_features"]),
        ("k", {"methods.ddps.n_clusters": 16}, ["ddps_clusters", "ddps_distilled", "ddps_selection"]),
        ("n", {"methods.ddps.n_draws": 3}, ["ddps_clusters", "ddps_distilled", "ddps_scores", "ddps_selection", "dift_features"]),
        ("d", {"diffusion.steps": 7}, ["diffusion_model"]),  # downstream goes stale through its data version
    ]:
        (tmp_path / d).mkdir()
        assert _changed(tmp_path / d, overrides) == expected, overrides


def test_ddps_variants_share_the_levels_they_agree_on(tmp_path):
    """cifar10's ablations: w/o Cluster reads ddps_clusters; the opposite sign re-picks the
    windows and clusters but reuses ddps_scores (R does not depend on the sign)."""
    budget = {"method": "ddps", "mipc": 100, "n_draws": 5}  # variants repeat the profile's ddps budget
    _, _, g = _graph(tmp_path, overrides={"methods.ddps_nocluster": {**budget, "cluster": False},
                                          "methods.ddps_flip": {**budget, "prefer": "high"}})
    by = {k.to_user_string(): k for k in g.get_all_asset_keys()}

    def parents(name):
        return {p.to_user_string() for p in g.get(by[name]).parent_keys}

    assert parents("ddps_nocluster_selection") == parents("ddps_selection") == {"ddps_clusters"}
    assert parents("ddps_flip_selection") == {"ddps_flip_ddps_clusters"}
    assert parents("ddps_flip_ddps_clusters") == {"ddps_flip_dift_features", "manifest"}
    assert parents("ddps_flip_dift_features") == {"ddps_scores", "diffusion_model", "manifest"}
    assert sorted(n for n in by if n.endswith(("ddps_scores", "dift_features", "ddps_clusters"))) == [
        "ddps_clusters", "ddps_flip_ddps_clusters", "ddps_flip_dift_features", "ddps_scores", "dift_features"]


def test_plugin_defaults_and_method_version_feed_code_versions(tmp_path, monkeypatch):
    """``methods.<entry>`` is hashed resolved (plugin config defaults + the user's block): a changed
    paper default re-versions that entry's chain; ``MethodPlugin.version`` re-versions one method's
    assets and nothing else."""
    import dataclasses
    import importlib

    from dd_assets.methods import registry

    def versions():
        _, _, graph = _graph(tmp_path)
        return {k.to_user_string(): graph.get(k).code_version for k in graph.get_all_asset_keys()}

    def swap(name, plugin):
        monkeypatch.setattr(importlib.import_module(registry.PLUGINS[name]), "PLUGIN", plugin)

    before = versions()
    ddps = registry.get("ddps")          # `ddps: {}` in params.yaml: every value is a plugin default
    swap("ddps", ddps.with_defaults(top_clusters=7))
    after_default = versions()
    assert after_default["ddps_selection"] != before["ddps_selection"]
    assert after_default["rded_selection"] == before["rded_selection"]
    swap("ddps", ddps)
    swap("rded", dataclasses.replace(registry.get("rded"), version="2"))
    after_version = versions()
    changed = {k for k in before if after_version[k] != before[k]}
    assert {"rded_selection", "rded_distilled"} <= changed
    assert not {k for k in changed if not k.startswith("rded_")}, changed


def test_nrr_distilled_declares_the_teacher_it_reads(tmp_path):
    """NRR-DD's refinement loads the teacher; lineage (and `dd-assets audit`) must show it."""
    _, _, graph = _graph(tmp_path)
    parents = {k.to_user_string() for k in graph.get(dg_key("nrr_distilled")).parent_keys}
    assert "teacher" in parents and "nrr_selection" in parents
    assert "teacher" not in {k.to_user_string() for k in graph.get(dg_key("rded_distilled")).parent_keys}


def dg_key(name):
    import dagster as dg

    return dg.AssetKey(name)


def test_a_profile_without_rded_loads_and_has_no_rded_assets(tmp_path):
    """Removing an entry from `methods:` removes its assets instead of crashing the load."""
    import yaml

    from dd_assets.config import PROJECT_ROOT

    doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    doc["profile"] = "tiny"
    doc["methods"] = {k: v for k, v in doc["methods"].items() if k in ("random", "herding")}
    for prof in doc["profiles"].values():
        prof.pop("methods", None)
        prof.pop("method_set", None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    graph = build_definitions(load_params(path)).resolve_asset_graph()
    names = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert "random_students" in names and "herding_students" in names
    assert not {n for n in names if n.startswith("rded")}


def test_the_ui_runs_steps_in_the_run_process_unless_told_otherwise(monkeypatch):
    """UI runs use the in_process executor (no second process per step); DD_ASSETS_EXECUTOR
    switches back, and a wrong value is refused naming the variable."""
    import pytest

    from dd_assets import definitions

    monkeypatch.delenv(definitions.EXECUTOR_ENV, raising=False)
    assert definitions.ui_executor() == "in_process"
    assert definitions.defs.executor.name == "in_process"
    monkeypatch.setenv(definitions.EXECUTOR_ENV, "multiprocess")
    assert definitions.ui_executor() == "multiprocess"
    monkeypatch.setenv(definitions.EXECUTOR_ENV, "celery")
    with pytest.raises(ValueError, match="DD_ASSETS_EXECUTOR='celery'"):
        definitions.ui_executor()


def test_one_methods_chain_is_one_tag_away():
    """Every asset one method family owns carries tag method=<family> (UI: `tag:method=nrr`,
    with `+` for its shared upstream); shared, data and report assets carry none."""
    import os

    import dagster as dg

    from dd_assets.config import PROJECT_ROOT, load_params
    from dd_assets.definitions import build_definitions

    os.environ.pop("DD_ASSETS_PROFILE", None)
    defs = build_definitions(load_params(PROJECT_ROOT / "params.yaml", "default_all"))
    graph = defs.resolve_asset_graph()

    def chain(fam):
        return {k.to_user_string() for k in dg.AssetSelection.tag("method", fam).resolve(graph)}

    assert chain("rded") == {"rded_scores", "rded_selection", "rded_distilled", "rded_soft_labels", "rded_students"}
    assert {"cam_maps", "cidd_scores", "nrr_selection", "nrr_distilled", "nrr_dbr_soft_labels",
            "nrr_dbr_students"} <= chain("nrr")
    assert {"vit_scorer", "focusdc_attention", "focusdc_dft_students"} <= chain("focusdc")
    assert "random_d2_students" in chain("random") and "diffusion_model" in chain("ddps")
    tagged = set().union(*(chain(f) for f in ("random", "rded", "herding", "kmeans", "focusdc", "nrr", "ddps", "edf", "udd")))
    assert not {"teacher", "teacher_features", "manifest", "raw_images", "report", "utilization"} & tagged


def test_an_asset_refuses_to_run_when_params_yaml_changed_since_load(tiny_env):
    """The kit (dd_assets/defs/kit.py) reloads params.yaml before the body runs: when a block
    the asset hashes changed since the definitions were loaded, the run fails asking for a
    reload instead of writing an output under the old code version."""
    import dagster as dg
    import yaml

    from dd_assets import local_backfill
    from dd_assets.orchestrate import RunFailures

    defs = build_definitions(load_params(), executor="in_process")
    path = tiny_env / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["profiles"]["tiny"].setdefault("data", {})["split_seed"] = 7   # raw_images hashes `data`
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(RunFailures, match=r"params.yaml changed since the Dagster definitions were loaded "
                                          r"\(raw_images: data\)"):
        local_backfill.materialize(defs, [dg.AssetKey("raw_images")], tiny_env / "run_home")
    assert not (tiny_env / "raw").exists()   # the body did not run (no export of the sample)
