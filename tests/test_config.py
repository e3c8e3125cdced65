from __future__ import annotations

import pytest
import yaml

from dd_assets.config import ParamsError, block_hash, load_params
from tests.conftest import write_params


def test_profile_deep_merges_over_blocks(tmp_path):
    p = load_params(write_params(tmp_path, "tiny"))
    assert p.profile == "tiny"
    assert p.block("teacher")["epochs"] == 1  # from the profile
    assert p.block("teacher")["arch"] == "convnet_d3"  # from the base block
    assert p.block("methods.rded")["mipc"] == 8                           # from the profile
    assert p.block("methods.random_d1") == {"method": "random", "seed": 1}  # from the base block
    assert p.ipcs == [1, 2]


def test_env_selects_profile(tmp_path, monkeypatch):
    path = write_params(tmp_path, "default")
    monkeypatch.setenv("DD_ASSETS_PROFILE", "cifar10")
    assert load_params(path).profile == "cifar10"
    monkeypatch.setenv("DD_ASSETS_PROFILE", "nope")
    with pytest.raises(ParamsError, match="unknown profile 'nope'"):
        load_params(path)


@pytest.mark.parametrize("ipcs, msg", [([0], "integer >= 1"), ([-3], "integer >= 1"), ([], "non-empty"), ([1, 1], "duplicates")])
def test_bad_ipc_is_rejected_with_the_parameter_named(tmp_path, ipcs, msg):
    with pytest.raises(ParamsError, match=msg):
        load_params(write_params(tmp_path, "tiny", {"ipcs": ipcs}))


def test_unknown_method_and_parameter_are_named(tmp_path):
    path = write_params(tmp_path, "tiny")
    doc = yaml.safe_load(path.read_text())
    doc["methods"]["focusdcc"] = {}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="unknown method 'focusdcc'.*known: .*rded"):
        load_params(path)
    doc["methods"].pop("focusdcc")
    doc["methods"]["rded"]["num_crops"] = 3
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"methods.rded.num_crops; did you mean 'num_crop'\? \(allowed: .*num_crop"):
        load_params(path)


def test_block_hash_is_order_independent_and_sensitive():
    assert block_hash({"a": 1, "b": [1, 2]}) == block_hash({"b": [1, 2], "a": 1})
    assert block_hash({"a": 1}) != block_hash({"a": 2})


def test_method_variants_are_data(tmp_path):
    path = write_params(tmp_path, "tiny")
    doc = yaml.safe_load(path.read_text())
    doc["methods"]["rded_k3"] = {"method": "rded", "num_crop": 3}
    path.write_text(yaml.safe_dump(doc))
    from dd_assets.methods.entries import base_method, method_params

    p = load_params(path)
    assert base_method("rded_k3", p.block("methods")["rded_k3"]) == "rded"
    assert method_params("rded_k3", p.block("methods")["rded_k3"]) == {**method_params("rded", {}), "num_crop": 3}
    doc["methods"]["bad"] = {"method": "nope"}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*methods.bad.method"):
        load_params(path)


def test_missing_weights_path_is_named_before_anything_runs(tmp_path):
    from dd_assets.config import ParamsError

    path = write_params(tmp_path, "tiny", {"teacher.weights": str(tmp_path / "nope" / "teacher.pt")})
    with pytest.raises(ParamsError, match=r"teacher\.weights = .*no such checkpoint file.*weights: null"):
        load_params(path)
    path = write_params(tmp_path, "tiny", {"vit_scorer.weights": "checkpoints/vit.pth"})
    with pytest.raises(ParamsError, match=r"vit_scorer\.weights"):
        load_params(path)
    # a timm model name is not a path: accepted here (weights are resolved when the model loads)
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"x")
    load_params(write_params(tmp_path, "tiny", {"vit_scorer.weights": "deit_small_patch16_224", "teacher.weights": str(ckpt)}))


def _doc_with(tmp_path, profiles: dict, active: str):
    doc = yaml.safe_load(write_params(tmp_path, "tiny").read_text())
    doc["profiles"].update(profiles)
    doc["profile"] = active
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_method_set_keeps_only_the_named_entries_in_file_order(tmp_path):
    path = _doc_with(tmp_path, {"small": {"extends": "tiny", "method_set": ["rded", "random"]}}, "small")
    p = load_params(path)
    assert p.methods == ["random", "rded"]                      # the methods block's order, not the set's
    assert p.block("methods.rded")["mipc"] == 8                 # tiny's override, through extends
    assert "method_set" not in p.raw and "extends" not in p.raw
    assert load_params(path, "tiny").methods[:4] == ["random", "random_d1", "random_d2", "rded"]   # no set: all


def test_extends_chains_profiles_and_the_child_wins(tmp_path):
    path = _doc_with(tmp_path, {"a": {"extends": "tiny", "teacher": {"epochs": 4}},
                                "b": {"extends": "a", "teacher": {"lr": 0.2}, "method_set": None}}, "b")
    p = load_params(path)
    assert p.block("teacher")["epochs"] == 4 and p.block("teacher")["lr"] == 0.2
    assert p.block("vit_scorer")["epochs"] == 1                 # from tiny, two links up
    assert [name for name, _ in p.layers] == ["tiny", "a", "b"]
    assert p.ipcs == [1, 2]


@pytest.mark.parametrize("profiles, msg", [
    ({"x": {"extends": "nope"}}, r"profiles.x.extends = 'nope': no such profile"),
    ({"x": {"extends": "y"}, "y": {"extends": "x"}}, r"circle \(x -> y -> x\)"),
    ({"x": {"method_set": ["rded", "rdde"]}}, r"profiles.x.method_set names 'rdde', not a 'methods' entry"),
    ({"x": {"method_set": []}}, r"profiles.x.method_set must be null .* or a non-empty list"),
])
def test_bad_extends_or_method_set_is_named(tmp_path, profiles, msg):
    with pytest.raises(ParamsError, match=msg):
        load_params(_doc_with(tmp_path, profiles, "x"))


def test_an_entry_the_profile_defines_but_its_method_set_leaves_out_is_refused(tmp_path):
    path = _doc_with(tmp_path, {"x": {"extends": "tiny", "method_set": ["random", "rded"],
                                      "methods": {"rded_f2": {"method": "rded", "factor": 2}}}}, "x")
    with pytest.raises(ParamsError, match=r"profiles.x.methods defines 'rded_f2', which profiles.x.method_set leaves out"):
        load_params(path)


def test_entries_tuned_by_an_extended_profile_may_be_left_out(tmp_path):
    path = _doc_with(tmp_path, {"x": {"extends": "tiny", "method_set": ["random", "rded"]}}, "x")
    assert load_params(path).methods == ["random", "rded"]     # tiny tunes kmeans, nrr, ...: inherited, not refused
