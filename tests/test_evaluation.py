"""The evaluation protocol and the DD-Ranking metrics on constructed cases with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from dd_assets.config import load_params
from dd_assets.evaluation import metrics, protocol, publish
from dd_assets.evaluation.results import COLUMNS, markdown_table, read_csv, results_rows, to_csv
from dd_assets.core.soft_labels import sample_views


# ----------------------------------------------------------------------------- protocol

@pytest.mark.parametrize("size, want", [(28, (1.0, 1.0)), (32, (1.0, 1.0)), (64, (1.0, 1.0)), (128, (0.5, 1.0)),
                                        (224, (0.5, 1.0))])
def test_crop_scale_follows_rded_factor_by_resolution(size, want):
    assert protocol.resolve_crop_scale("auto", size) == want
    assert protocol.resolve_crop_scale(None, size) == want


def test_explicit_crop_scale_wins_and_bad_values_name_the_parameter():
    assert protocol.resolve_crop_scale([0.08, 1.0], 32) == (0.08, 1.0)
    with pytest.raises(ValueError, match="labels.crop_scale"):
        protocol.resolve_crop_scale([0.0, 1.0], 32)
    with pytest.raises(ValueError, match="labels.crop_scale"):
        protocol.resolve_crop_scale("big", 32)


def test_a_32px_factor1_set_gets_whole_image_views():
    """cifar10 profile: scale (1, 1) -> every stored view crops the whole image (flip and CutMix only)."""
    proto = protocol.resolve(load_params(profile="cifar10").raw)
    assert proto.crop_scale == (1.0, 1.0)
    assert proto.epochs == 300 and proto.budgets == (300,) and proto.views == 300
    assert proto.hard_for("rded") and proto.hard_for("random") and not proto.hard_for("random_d1")
    v = sample_views(20, 30, 32, seed=0, scale=proto.crop_scale)
    assert (v.crop == np.array([0, 0, 32, 32], np.int16)).all()
    zoom = sample_views(20, 30, 32, seed=0, scale=(0.08, 1.0))      # the old recipe zooms
    assert (zoom.crop != np.array([0, 0, 32, 32], np.int16)).any()
    assert v.mix_box.any(), "CutMix stays on"


def test_budgets_and_views_cover_the_longest_run():
    raw = load_params(profile="tiny").raw
    raw = {**raw, "student": {**raw["student"], "epochs": 5}, "eval": {**raw["eval"], "budgets": [2, 9]}}
    proto = protocol.resolve(raw)
    assert proto.budgets == (2, 5, 9) and proto.views == 9
    with pytest.raises(ValueError, match="eval.budgets"):
        protocol.resolve({**raw, "eval": {"budgets": [0]}})
    assert "crop1-1" in proto.recipe and "cutmix" in proto.recipe
    assert proto.hard_for("anything")                         # tiny: hard_labels true -> every entry
    assert not protocol.resolve({**raw, "eval": {"hard_labels": False}}).hard_for("rded")


# ----------------------------------------------------------------------------- metrics

def test_lrs_ior_hlr_on_constructed_numbers():
    assert metrics.ior(0.52, 0.48) == pytest.approx(0.04)
    assert metrics.hlr(0.80, 0.30) == pytest.approx(0.50)
    lo, hi = math.exp(-1), math.e
    assert metrics.lrs(0.0, 0.0) == pytest.approx((1 - lo) / (hi - lo))      # 0.2689
    assert metrics.lrs(1.0, -1.0) == pytest.approx(1.0)
    assert metrics.lrs(-1.0, 1.0) == pytest.approx(0.0)
    # a = 0.5 * 0.04 - 0.5 * 0.5 = -0.23
    assert metrics.lrs(0.04, 0.5) == pytest.approx((math.exp(-0.23) - lo) / (hi - lo))
    assert metrics.lrs(0.04, 0.5, w=1.0) == pytest.approx((math.exp(0.04) - lo) / (hi - lo))
    with pytest.raises(ValueError, match="fractions"):
        metrics.lrs(4.0, 50.0)          # percent is refused, not silently saturated
    with pytest.raises(ValueError, match="fractions"):
        metrics.ior(52.0, 48.0)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 8, 30, 31, 60, 200):
        assert metrics.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)


def test_paired_difference_on_constructed_data():
    # diffs 1, 2, 3 (random mean per seed subtracted): mean 2, sd 1, half = t(2) / sqrt(3)
    m = {0: 5.0 / 100, 1: 7.0 / 100, 2: 9.0 / 100}
    r = {0: [0.03, 0.05], 1: [0.05, 0.05], 2: [0.06, 0.06]}
    d = metrics.paired_difference(m, r)
    half = 4.303 / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(0.02)
    assert (d.lo, d.hi) == (pytest.approx(0.02 - half / 100), pytest.approx(0.02 + half / 100))
    assert not d.excludes_zero
    const = metrics.paired_difference({0: 0.5, 1: 0.6, 2: 0.7}, {0: [0.4], 1: [0.5], 2: [0.6]})
    assert const.excludes_zero and const.lo == pytest.approx(0.1)
    # pairing matters: the same numbers unpaired would not exclude 0
    shifted = metrics.paired_difference({0: 0.41, 1: 0.51, 2: 0.61}, {0: [0.40], 1: [0.50], 2: [0.60]})
    assert shifted.excludes_zero and shifted.mean == pytest.approx(0.01)
    one = metrics.paired_difference({0: 0.5}, {0: [0.4], 1: [0.3]})
    assert one.n == 1 and math.isnan(one.lo) and not one.excludes_zero


# ----------------------------------------------------------------------------- results record

def _students():
    rows = []
    rnd = {("random", 0): [0.40, 0.42, 0.44], ("random_d1", 1): [0.38, 0.40, 0.42], ("random_d2", 2): [0.42, 0.44, 0.46]}
    for (entry, _draw), accs in rnd.items():
        for seed, a in enumerate(accs):
            rows.append((entry, 10, seed, "convnet_d3", 300, "fkd", a, 4000))
            rows.append((entry, 10, seed, "convnet_d3", 300, "hard", a - 0.20, 0))
    for seed, a in enumerate([0.45, 0.47, 0.49]):       # rded: +0.05 over the per-seed random mean, every seed
        rows.append(("rded", 10, seed, "convnet_d3", 300, "fkd", a, 4000))
        rows.append(("rded", 10, seed, "convnet_d3", 300, "hard", 0.30, 0))
        rows.append(("rded", 10, seed, "convnet_d3", 100, "fkd", a - 0.1, 4000))
    for seed, a in enumerate([0.40, 0.47, 0.39]):       # dbr row: own labels, compared with random's fkd
        rows.append(("nrr_dbr", 10, seed, "convnet_d3", 300, "dbr", a, 80))
    return pd.DataFrame(rows, columns=["method", "ipc", "seed", "student", "epochs", "label_mode", "test_acc",
                                       "label_bytes"])


BASES = {"random": "random", "random_d1": "random", "random_d2": "random", "rded": "rded", "nrr_dbr": "nrr"}


def test_results_rows_pool_random_draws_and_fill_dd_ranking_columns():
    out = results_rows(_students(), BASES, dataset="X", recipe="r", main_labels="fkd", full_data_acc=0.80,
                       commit="abc", params_hash={"rded": "h1"})
    assert list(out.columns) == COLUMNS
    rnd = out[(out["method"] == "random") & (out["labels"] == "fkd")].iloc[0]
    assert rnd["n"] == 9 and rnd["draws"] == 3 and rnd["test_pct_mean"] == pytest.approx(42.0)
    rded = out[(out["method"] == "rded") & (out["labels"] == "fkd") & (out["epochs"] == 300)].iloc[0]
    assert rded["vs_random_pts"] == pytest.approx(5.0) and rded["beats_random"] == "yes"
    assert rded["ior_pts"] == pytest.approx(5.0)
    assert rded["hard_pct_mean"] == pytest.approx(30.0) and rded["hlr_pts"] == pytest.approx(50.0)
    assert rded["lrs"] == pytest.approx(metrics.lrs(0.05, 0.50))
    assert rded["params_hash"] == "h1" and rded["commit"] == "abc"
    # a 100-epoch budget row has no random at 100 epochs here: no comparison, no invented number
    short = out[(out["method"] == "rded") & (out["epochs"] == 100)].iloc[0]
    assert math.isnan(short["vs_random_pts"]) and short["beats_random"] == ""
    dbr = out[out["method"] == "nrr_dbr"].iloc[0]
    assert dbr["vs_random_pts"] == pytest.approx(100 * np.mean([0.40 - 0.40, 0.47 - 0.42, 0.39 - 0.44]))
    assert dbr["beats_random"] == "no"
    assert math.isnan(dbr["hlr_pts"])               # no hard-label student for it -> HLR left empty
    rhard = out[(out["method"] == "random") & (out["labels"] == "hard")].iloc[0]
    assert math.isnan(rhard["ior_pts"])
    assert rnd["hlr_pts"] == pytest.approx(80.0 - 22.0)


def test_extra_training_rows_are_compared_only_with_random_given_the_same_extra_training():
    """``focusdc+dft`` (extra epochs on fresh real images) is paired with ``random+dft`` draws
    (pooled like random's) under the +dft recipe, never with plain random."""
    rows = [("random", 10, s, "convnet_d3", 300, "fkd", a, 0) for s, a in enumerate([0.40, 0.42, 0.44])]
    rows += [(e, 10, s, "convnet_d3", 300, "online", a, 0)
             for e, accs in (("random+dft", [0.50, 0.52, 0.54]), ("random_d1+dft", [0.50, 0.52, 0.54]),
                             ("focusdc+dft", [0.51, 0.53, 0.55]))
             for s, a in enumerate(accs)]
    df = pd.DataFrame(rows, columns=["method", "ipc", "seed", "student", "epochs", "label_mode", "test_acc",
                                     "label_bytes"])
    dft = {"random+dft": "r+dft5", "random_d1+dft": "r+dft5", "focusdc+dft": "r+dft5"}
    out = results_rows(df, {"random": "random", "random_d1": "random", "focusdc": "focusdc"}, dataset="X",
                       recipe="r", main_labels="fkd", recipes=dft)
    rdft = out[(out["method"] == "random") & (out["recipe"] == "r+dft5")].iloc[0]
    assert rdft["n"] == 6 and rdft["draws"] == 2 and rdft["test_pct_mean"] == pytest.approx(52.0)
    fd = out[out["method"] == "focusdc+dft"].iloc[0]
    assert fd["vs_random_pts"] == pytest.approx(1.0)     # vs random+dft (52 %), not plain random (42 %)
    assert fd["ior_pts"] == pytest.approx(1.0)
    # without random+dft draws the row is not compared at all
    alone = results_rows(df[~df["method"].str.startswith("random+") & ~df["method"].str.startswith("random_d1+")],
                         {"random": "random", "focusdc": "focusdc"}, dataset="X", recipe="r", main_labels="fkd",
                         recipes=dft)
    assert math.isnan(alone[alone["method"] == "focusdc+dft"].iloc[0]["vs_random_pts"])


def test_results_csv_roundtrip_and_embedded_docs_table(tmp_path):
    out = results_rows(_students(), BASES, dataset="X", recipe="r", main_labels="fkd", full_data_acc=0.80)
    path = tmp_path / "x.csv"
    path.write_text(to_csv(out))
    back = read_csv(path)
    assert len(back) == len(out)
    table = markdown_table(back)
    assert "| rded | 10 | 300 | fkd | 47.00 ± 2.00 | 3 | +5.00 [+5.00, +5.00] | yes |" in table
    doc = publish.embed("# Results\n\nprose\n", "x", table)
    assert publish.embedded(doc, "x") == table
    again = publish.embed(doc.replace("47.00", "99.00"), "x", table)
    assert publish.embedded(again, "x") == table and again.count("<!-- results:x") == 1


def test_cifar10_profile_uses_the_shared_checkpoints_and_names_them_when_absent(monkeypatch, tmp_path):
    """The benchmark profile loads ../shared/models; a clone without ../shared is refused at
    load, naming the parameter and what to do (never a silent retrain)."""
    from dd_assets import config

    p = load_params(profile="cifar10")
    real = p.path
    assert p.block("teacher.weights") == "../shared/models/teacher_convnet3bn_cifar10.pt"
    assert p.block("vit_scorer.weights") == "../shared/models/vit_tiny_patch4_cifar10.pt"
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path / "clone")     # no ../shared beside it
    with pytest.raises(config.ParamsError, match=r"teacher\.weights = '\.\./shared/models/.*no such checkpoint.*weights: null"):
        load_params(real, profile="cifar10")


def test_hard_seeds_limit_hard_label_students_and_version_only_those_entries(tmp_path):
    """eval.hard_seeds: hard-label students for these seeds only; the code version of entries
    without hard-label students does not depend on it."""
    from dd_assets.defs.student_assets import student_blocks
    from dd_assets.defs.common import code_version
    from dd_assets.methods import registry
    from tests.conftest import write_params

    p = load_params(profile="cifar10")
    proto = protocol.resolve(p.raw)
    assert proto.hard_seeds == (0,)
    assert "eval.hard_seeds" in student_blocks("rded", registry.get("rded"), p)
    assert "eval.hard_seeds" not in student_blocks("random_d1", registry.get("random"), p)
    other = load_params(write_params(tmp_path, "cifar10", {"eval.hard_seeds": [0, 1]}))
    for entry, base, same in (("random_d1", "random", True), ("rded", "rded", False)):
        a = code_version(p, "students", student_blocks(entry, registry.get(base), p))
        b = code_version(other, "students", student_blocks(entry, registry.get(base), other))
        assert (a == b) is same, entry


def test_student_runs_per_entry_and_seed():
    raw = load_params(profile="cifar10").raw
    proto = protocol.resolve({**raw, "eval": {**raw["eval"], "budgets": [100]}})
    assert protocol.student_runs(proto, "rded", "fkd", [0, 1]) == [(0, 100, "fkd"), (0, 300, "fkd"), (0, 300, "hard"),
                                                                  (1, 100, "fkd"), (1, 300, "fkd")]
    assert protocol.student_runs(proto, "random_d1", "fkd", [0]) == [(0, 100, "fkd"), (0, 300, "fkd")]
    assert protocol.student_runs(proto, "rded", "hard", [0]) == [(0, 100, "hard"), (0, 300, "hard")]
    every = protocol.resolve({**raw, "eval": {**raw["eval"], "hard_labels": True, "hard_seeds": None}})
    assert [m for _, _, m in protocol.student_runs(every, "x", "dbr", [0, 1])] == ["dbr", "hard", "dbr", "hard"]
