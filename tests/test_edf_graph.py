"""EDF in the Dagster graph: the catalog entry reproduces App. B Table 8 per IPC, the expert
trajectories are shared by every EDF entry and IPC (code version and materializations), the
ablation variants re-version only their own chains, a tiny end-to-end materialization
(shapes, labels, lineage, determinism, reuse), Comp-DD complexity and ``dd-assets easy-hard``."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dd_assets.cli import main
from dd_assets.config import load_params
from dd_assets.definitions import build_definitions
from dd_assets.defs.methods.edf import COMP_DD, EXPERTS, load_experts
from dd_assets.defs.methods.edf_params import IPC_KEYS, entry_config
from dd_assets.defs.partitions import build_partitions
from dd_assets.methods import registry
from dd_assets.core.cam import grad_cam
from dd_assets.core.complexity import image_complexity
from dd_assets.methods.edf.config import PUBLIC_COMMON, edf_config
from dd_assets.core.imaging import to_model_input
from dd_assets.methods.entries import method_params
from dd_assets.methods.random.select import select_random
from dd_assets import local_backfill
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group
from dd_assets.storage.tables import read_table, write_table
from tests.conftest import write_params

torch.set_num_threads(1)

ABLATIONS = {"mtt": {"method": "edf", "use_cpd": False, "use_dae": False},
             "edf_cpd": {"method": "edf", "use_dae": False},
             "edf_dae": {"method": "edf", "use_cpd": False}}
EDF_FAMILY = ["edf_cpd_distilled", "edf_dae_distilled", "edf_distilled", "mtt_distilled"]


# ----------------------------------------------------------------------------- parameters


def test_catalog_defaults_are_table8_per_ipc():
    """Null entry parameters = Table 8 / public config of each IPC; the fixed ones are the
    public configs' values (PUBLIC_COMMON), so `edf: {}` is exactly edf_config(ipc)."""
    d = registry.get("edf").defaults
    assert sorted(k for k, v in d.items() if v is None and k in IPC_KEYS) == sorted(IPC_KEYS)
    assert {k: d[k] for k in PUBLIC_COMMON} == PUBLIC_COMMON
    for ipc in (1, 10, 50):
        assert entry_config("edf", method_params("edf", {}), ipc) == edf_config(ipc), ipc
    subset = entry_config("edf", method_params("edf", {"table8_subset": "ImageWoof"}), 10)
    assert subset.beta == 2.0  # Table 8's ImageWoof cell


def test_ipc_mappings_and_ablation_switches():
    mp = method_params("edf", {"iterations": {1: 7}, "syn_steps": 5, "max_loss": None, "augment": "none"})
    one, ten = entry_config("edf", mp, 1), entry_config("edf", mp, 10)
    assert (one.match.iterations, ten.match.iterations) == (7, 10000)  # an IPC missing from the map: Table 8
    assert one.match.syn_steps == ten.match.syn_steps == 5
    assert one.match.max_loss is None and one.match.augment is None  # explicit null is kept (no loss cap)
    for name, block in ABLATIONS.items():
        cfg = entry_config(name, method_params(name, block), 10)
        assert (cfg.use_cpd, cfg.use_dae) == {"mtt": (False, False), "edf_cpd": (True, False),
                                              "edf_dae": (False, True)}[name]


@pytest.mark.parametrize("profile", ["default_all", "cifar10"])
def test_profiles_lower_lr_pixel_at_ipc1_only_and_share_one_budget(profile):
    """docs/edf.md deviation 6: on non-ZCA 28/32-px pixels lr_pixel is 1000 at IPC 1 (Table 8:
    10000), Table 8's 1000 at IPC 10; every EDF variant of a profile runs the same budget, so
    the ablation differs only in CPD / DAE."""
    methods = load_params(profile=profile).block("methods")
    names = [n for n in methods if n == "edf" or methods[n].get("method") == "edf"]
    assert "edf" in names
    for ipc in (1, 10):
        cfgs = {n: entry_config(n, method_params(n, methods[n]), ipc) for n in names}
        assert {c.match.lr_img for c in cfgs.values()} == {1000.0}, (profile, ipc)
        key = [(c.match, c.alpha, c.beta, c.cam_every) for c in cfgs.values()]
        assert all(k == key[0] for k in key), (profile, ipc)
    assert edf_config(1).match.lr_img == 10000.0  # the paper default itself is unchanged


@pytest.mark.parametrize("overrides,match", [
    ({"methods.edf.max_start_epoch": 9}, r"methods\.edf at IPC 1: max_start_epoch=9 .*experts\.epochs = 2"),
    ({"experts.num_experts": 0}, r"experts\.num_experts must be an integer >= 1"),
    ({"methods.edf.use_dae": "yes"}, r"methods\.edf\.use_dae must be true or false"),
    ({"methods.edf.augment": "strong"}, r"methods\.edf\.augment = 'strong': must be one of dsa, none"),   # at load
    ({"methods.edf.alpha": 1.5}, r"methods\.edf at IPC 1: alpha \(CPD dropout ratio\) must be in \[0, 1\)"),
])
def test_bad_values_are_refused_at_load_naming_the_parameter(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):   # at load (the schema) or when the graph is built
        build_definitions(load_params(write_params(tmp_path, "default_all", overrides)))


def test_expert_accuracy_is_each_experts_last_checkpoint():
    from dd_assets.methods.edf.experts import ExpertConfig, expert_accuracy, expert_logits, train_experts

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 6)
    imgs = rng.integers(0, 120, (18, 3, 8, 8)).astype(np.int64)
    imgs[np.arange(18), labels] += 120  # class c: brighter channel c
    imgs = imgs.astype(np.uint8)
    cfg = ExpertConfig(arch_kwargs={"norm": "instance", "width": 4}, lr=0.05, batch_size=6, seed=1)
    traj = train_experts((imgs, labels), 3, num_experts=2, epochs=2, cfg=cfg, mean=(0.5,) * 3, std=(0.25,) * 3)
    batches = [(imgs[:10], labels[:10]), (imgs[10:], labels[10:])]
    got = expert_accuracy(traj, batches, (0.5,) * 3, (0.25,) * 3)
    x = to_model_input(imgs, (0.5,) * 3, (0.25,) * 3, "cpu")
    want = [float((expert_logits(traj, x, k).argmax(1).numpy() == labels).mean()) for k in range(2)]
    assert got == pytest.approx(want)


# ----------------------------------------------------------------------------- graph


def _versions(tmp_path, name, overrides=None):
    (tmp_path / name).mkdir()
    budget = load_params(write_params(tmp_path / name, "default_all")).block("methods")["edf"]  # variants repeat it
    params = load_params(write_params(tmp_path / name, "default_all", {
        **{f"methods.{k}": {**budget, **v} for k, v in ABLATIONS.items()}, **(overrides or {})}))
    graph = build_definitions(params).resolve_asset_graph()
    return graph, {k.to_user_string(): graph.get(k).code_version for k in graph.get_all_asset_keys()}


def _changed(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b)
    return sorted(k for k in a if a[k] != b[k])


def test_graph_experts_shared_and_variants_isolated(tmp_path):
    graph, base = _versions(tmp_path, "base")
    by = {k.to_user_string(): k for k in graph.get_all_asset_keys()}
    experts = graph.get(by[EXPERTS])
    assert experts.group_name == "models" and experts.partitions_def is None
    assert graph.get(by[COMP_DD]).group_name == "scoring"
    assert graph.get(by[COMP_DD]).partitions_def.get_partition_keys() == [str(c) for c in range(10)]
    for entry in ("edf", *ABLATIONS):
        assert f"{entry}_selection" not in by
        node = graph.get(by[f"{entry}_distilled"])
        assert node.group_name == "composition" and node.partitions_def.get_partition_keys() == ["1", "10"]
        assert {p.to_user_string() for p in node.parent_keys} == {EXPERTS, "teacher", "manifest"}
        assert {p.to_user_string() for p in graph.get(by[f"{entry}_soft_labels"]).parent_keys} == {f"{entry}_distilled", "teacher"}
    # one variant's parameter re-versions only its own images (labels/students follow by data version)
    assert _changed(base, _versions(tmp_path, "mtt", {"methods.mtt.iterations": 3})[1]) == ["mtt_distilled"]
    assert _changed(base, _versions(tmp_path, "beta", {"methods.edf.beta": 2.0})[1]) == ["edf_distilled"]
    # the experts read neither IPC nor any methods block
    assert _changed(base, _versions(tmp_path, "ipcs", {"ipcs": [1, 10, 50]})[1]) == []
    _, no_edf = _versions(tmp_path, "other", {"methods.edf.seed": 1, "methods.rded.num_crop": 3})
    assert no_edf[EXPERTS] == base[EXPERTS] and no_edf[COMP_DD] == base[COMP_DD]
    # the experts block re-versions the experts and every EDF-family chain's images
    assert _changed(base, _versions(tmp_path, "experts", {"experts.epochs": 3})[1]) == sorted([EXPERTS, *EDF_FAMILY])


# ----------------------------------------------------------------------------- materialization


def _run(home, names, partitions=None):
    """Materialize ``names`` as one backfill carried out here (what ``dd-assets materialize`` does);
    raises RunFailures when a run failed."""
    defs = build_definitions(load_params(), executor="in_process")
    out = local_backfill.materialize(defs, [dg.AssetKey(n) for n in names], home, partitions)
    assert out.runs and all(r.is_success for r in out.runs)


def _count(home, name, partition=None) -> int:
    flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[partition] if partition else None)
    return len(local_backfill.local_instance(home).fetch_materializations(flt, limit=1000).records)


@pytest.mark.slow
def test_tiny_experts_distilled_reuse_determinism_and_comp_dd(tiny_env, capsys):
    home = tiny_env / "run_home"
    _run(home, ["raw_images", "manifest", "teacher", EXPERTS, "edf_distilled", "edf_soft_labels"],
         {"edf_distilled": ["1"], "edf_soft_labels": ["1"]})
    params = load_params()
    root, parts = DataRoot(params.data_root), build_partitions(params)
    ex = params.block("experts")

    traj = load_experts(root, parts)
    assert traj.params.shape[:2] == (ex["num_experts"], ex["epochs"] + 1) and traj.num_classes == 10
    assert not np.array_equal(traj.params[0, 0], traj.params[0, -1]) and not np.array_equal(traj.params[0], traj.params[1])

    arrays, attrs = read_group(root, layout.distilled("edf", 1))
    images, labels = arrays["images"], arrays["labels"]
    size = int(params.block("data")["image_size"])
    assert images.dtype == np.uint8 and images.shape == (10, 3, size, size)
    assert labels.tolist() == list(range(10)) and arrays["loss"].shape == (3,)
    assert arrays["learned_logits"].shape == (10, 10)  # DATM soft labels (kept, not used by the students)
    lineage = read_table(root, layout.lineage("edf", 1))
    assert lineage["scorer_asset"].unique().tolist() == [EXPERTS] and len(lineage) == 10
    for c in range(10):  # initialized from the random baseline's images at the same seed
        man = read_table(root, layout.manifest(c))
        ids = man.loc[man["split"] == "train", "source_id"].to_numpy(np.int64)
        assert lineage.loc[lineage["class_index"] == c, "source_id"].tolist() == select_random(ids, 1, 0, c).tolist()
    assert read_group(root, layout.soft_labels("edf", 1))[0]["values"].shape[0] == 10
    for rel in (layout.grid("edf", 1), layout.curve("edf", "ipc=1")):
        assert root.read_bytes(rel)[:4] == b"\x89PNG"

    _run(home, ["edf_distilled"], {"edf_distilled": ["1"]})  # same seed -> byte-identical images
    again, _ = read_group(root, layout.distilled("edf", 1))
    assert again["images"].tobytes() == images.tobytes() and np.array_equal(again["loss"], arrays["loss"])

    _run(home, ["edf_distilled"], {"edf_distilled": ["2"]})  # a second IPC trains no expert
    assert _count(home, EXPERTS) == 1 and _count(home, "edf_distilled", "2") == 1
    assert read_group(root, layout.distilled("edf", 2))[0]["images"].shape == (20, 3, size, size)

    # Comp-DD: per image 1 - share(Grad-CAM >= 0.5) of the teacher, CAM of the image's own class
    _run(home, [COMP_DD], {COMP_DD: [str(c) for c in range(6)]})  # 6 classes: enough for k = 3
    table = read_table(root, layout.comp_dd(3))
    from dd_assets.data.loading import load_rows
    from dd_assets.defs.io import load_teacher

    teacher, _ = load_teacher(root, torch.device("cpu"))
    man = read_table(root, layout.manifest(3))
    rows = man[man["split"] == "train"].sort_values("source_id")
    x = to_model_input(load_rows(rows, params.block("data")), params.block("data")["mean"], params.block("data")["std"], "cpu")
    expected = image_complexity(grad_cam(teacher, x, np.full(len(rows), 3)), 0.5)
    assert table["source_id"].tolist() == rows["source_id"].tolist()
    np.testing.assert_allclose(table["complexity"].to_numpy(), expected, atol=1e-12)
    assert main(["easy-hard", "--k", "3"]) == 0
    doc = yaml.safe_load(root.read_bytes(layout.EASY_HARD))
    assert len(doc["easy"]["data"]["classes"]) == len(doc["hard"]["data"]["classes"]) == 3
    out = capsys.readouterr()
    assert "wrote" in out.out and "classes [6, 7, 8, 9] have no Comp-DD table yet" in out.err


# ----------------------------------------------------------------------------- easy-hard CLI


def test_easy_hard_cli_on_constructed_tables(tiny_env, capsys):
    """Known class means -> the exact easy / hard lists (dataset order), the YAML a profile can
    take as data.classes, and clear messages for no tables or a too large k."""
    assert main(["easy-hard"]) == 1
    assert "materialize --select comp_dd_complexity" in capsys.readouterr().err
    root = DataRoot(load_params().data_root)
    means = {"cat": 0.9, "dog": 0.7, "frog": 0.2, "ship": 0.5, "truck": 0.1, "bird": 0.8}
    for c, (name, mean) in enumerate(means.items()):
        comp = np.array([mean - 0.05, mean + 0.05])  # class mean = mean
        write_table(root, layout.comp_dd(c), pd.DataFrame({"source_id": [c << 32, (c << 32) + 1], "class_index": c,
                                                           "class_name": name, "complexity": comp,
                                                           "high_activation_share": 1 - comp}))
    assert main(["easy-hard", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.index("cat") < out.index("bird") < out.index("dog") < out.index("ship") < out.index("frog") < out.index("truck")
    doc = yaml.safe_load(root.read_bytes(layout.EASY_HARD))
    assert doc["hard"]["data"]["classes"] == ["cat", "bird"]  # the 2 most complex, in dataset order
    assert doc["easy"]["data"]["classes"] == ["frog", "truck"]
    assert doc["comp_dd"]["complexity"]["cat"] == pytest.approx(0.9)
    assert main(["easy-hard"]) == 0  # default k: half the classes when fewer than 20
    assert len(yaml.safe_load(root.read_bytes(layout.EASY_HARD))["hard"]["data"]["classes"]) == 3
    capsys.readouterr()
    assert main(["easy-hard", "--threshold", "0.6"]) == 0
    assert yaml.safe_load(root.read_bytes(layout.EASY_HARD))["hard"]["data"]["classes"] == ["cat", "dog", "bird"]
    assert main(["easy-hard", "--k", "4"]) == 2
    assert "need 2k=8 classes" in capsys.readouterr().err
