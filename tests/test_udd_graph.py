"""UDD in the Dagster graph: catalog defaults = UDDConfig (App. A), variants re-version only
their own chains, one entry materialized on a constructed dataset (shapes, labels, lineage,
same seed -> same bytes), and the ``utilization`` (mUE) asset + report column on constructed
sets whose answer is known."""

from __future__ import annotations

import dataclasses
import math
import os

import dagster as dg
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dd_assets.config import PROJECT_ROOT, load_params
from dd_assets.data.sampling import ClassSampler
from dd_assets.definitions import build_definitions
from dd_assets.defs.methods.udd import udd_config
from dd_assets.methods import registry
from dd_assets.methods.udd.config import UDDConfig
from dd_assets.methods.udd.gradient_matching import RealPool
from dd_assets.methods.entries import images_source
from dd_assets import local_backfill
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group, write_group
from dd_assets.storage.tables import read_table
from tests.conftest import write_params

torch.set_num_threads(1)

VARIANTS = {  # the cifar10 profile's ablation rows
    "udd_dc": {"method": "udd", "policy": "none", "cfc": False},
    "udd_response": {"method": "udd", "policy": "response", "cfc": False},
    "udd_jitter": {"method": "udd", "policy": "jitter", "cfc": False},
}


# ============================================================================ catalog and validation


def test_catalog_defaults_are_the_udd_config_defaults():
    """Every UDDConfig field that changes the images is a methods parameter with the paper's
    default (App. A / IDC); only ``mue_intervals`` (a reported number) is not."""
    spec = registry.get("udd")
    assert spec.kind == "synthesize" and spec.select is None and spec.candidates == "manifest"
    fields = {f.name for f in dataclasses.fields(UDDConfig)}
    assert set(spec.defaults) == fields - {"mue_intervals"}
    assert udd_config("udd", dict(spec.defaults)) == UDDConfig()
    assert (UDDConfig().iterations, UDDConfig().lr_img, UDDConfig().top_p, UDDConfig().jitter_copies) == (2000, 0.005, 8, 2)


@pytest.mark.parametrize("key,value,message", [
    ("policy", "sideways", r"methods\.udd\.policy must be one of"),
    ("cfc", "yes", r"methods\.udd\.cfc must be true or false"),
    ("iterations", 2.5, r"methods\.udd\.iterations must be an integer"),
    ("top_p", 13, r"methods\.udd\.top_p must be in \[0, N = 4"),
    ("window_fractions", 0.5, r"methods\.udd\.window_fractions must be a list"),
])
def test_bad_udd_value_is_refused_at_load_naming_the_parameter(tmp_path, key, value, message):
    params = load_params(write_params(tmp_path, "tiny", {f"methods.udd.{key}": value}))
    with pytest.raises(ValueError, match=message):
        build_definitions(params)


# ============================================================================ the graph


def _graph(tmp_path, profile="default_all", overrides=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = load_params(write_params(tmp_path, profile, overrides))
    graph = build_definitions(params).resolve_asset_graph()
    by = {k.to_user_string(): k for k in graph.get_all_asset_keys()}
    versions = {n: graph.get(k).code_version for n, k in by.items()}
    return graph, by, versions


def test_udd_chain_shape_and_variants_version_only_their_own_chains(tmp_path):
    g0, _, v0 = _graph(tmp_path / "a")
    overrides = {f"methods.{n}": b for n, b in VARIANTS.items()}
    graph, by, v1 = _graph(tmp_path / "b", overrides=overrides)

    def parents(name):
        return {p.to_user_string() for p in graph.get(by[name]).parent_keys}

    for entry in ("udd", *VARIANTS):
        assert f"{entry}_selection" not in by  # pixel-optimizing: no selection asset
        assert graph.get(by[f"{entry}_distilled"]).group_name == "composition"
        assert graph.get(by[f"{entry}_distilled"]).partitions_def.get_partition_keys() == ["1", "10"]
        assert parents(f"{entry}_distilled") == {"manifest"}
        assert parents(f"{entry}_soft_labels") == {f"{entry}_distilled", "teacher"}
        assert f"{entry}_distilled" in parents(f"{entry}_students")
        assert f"{entry}_distilled" in parents("utilization")
    # mUE covers every distilled set of the profile (a label-only variant: its source's set)
    mblock = load_params(tmp_path / "b" / "params.yaml").block("methods")
    assert parents("utilization") == {"teacher", *(f"{images_source(mblock, m)}_distilled" for m in mblock)}
    assert parents("utilization") >= {f"{m}_distilled" for m in ("random", "rded", "nrr", "ddps", "udd", *VARIANTS)}
    assert "nrr_dbr_distilled" not in parents("utilization")
    assert graph.get(by["utilization"]).group_name == "reports"
    assert "utilization" in parents("report")
    # adding the variants re-versions nothing that existed, and each has its own version
    assert all(v1[k] == v for k, v in v0.items())
    assert len({v1[f"{e}_distilled"] for e in ("udd", *VARIANTS)}) == 4

    # a policy change re-versions only that entry's distilled images (labels/students follow by data version)
    _, _, v2 = _graph(tmp_path / "c", overrides={**overrides, "methods.udd.policy": "response"})
    assert sorted(k for k in v1 if v1[k] != v2[k]) == ["udd_distilled"]
    _, _, v3 = _graph(tmp_path / "d", overrides={"methods.udd.top_p": 4})
    assert sorted(k for k in v0 if v0[k] != v3[k]) == ["udd_distilled"]
    # a variant that becomes identical to another one trains on that one's images (computed once)
    g4, by4, _ = _graph(tmp_path / "e", overrides={**overrides, "methods.udd_jitter": {**VARIANTS["udd_jitter"],
                                                                                        "policy": "response"}})
    assert "udd_jitter_distilled" not in by4
    assert {p.to_user_string() for p in g4.get(by4["udd_jitter_soft_labels"]).parent_keys} == {
        "udd_response_distilled", "teacher"}


def test_cifar10_profile_has_the_ablation_rows():
    p = load_params(PROJECT_ROOT / "params.yaml", profile="cifar10")
    mblock = p.block("methods")
    rows = {n: udd_config(n, {**registry.get("udd").defaults, **{k: v for k, v in mblock[n].items() if k != "method"}})
            for n in ("udd_dc", "udd_response", "udd_jitter", "udd")}
    assert {n: (c.policy, c.cfc) for n, c in rows.items()} == {
        "udd_dc": ("none", False), "udd_response": ("response", False), "udd_jitter": ("jitter", False),
        "udd": ("jitter", True)}
    budgets = {(c.iterations, c.inner_steps) for c in rows.values()}
    assert len(budgets) == 1  # one budget for every row: the ablation compares like with like
    base = load_params(PROJECT_ROOT / "params.yaml", profile="default_all")
    assert base.raw["methods"]["udd"] is not None


# ============================================================================ real batches from disk


def _write_dataset(root, classes=3, per_class=10, size=16, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            # class-dependent mean brightness + texture, so the classes are learnable
            img = np.clip(rng.normal(60 + 70 * c, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.png")


def test_class_sampler_draws_like_an_in_memory_pool(tmp_path):
    """Decoded on demand, one batch at a time, the same draws as RealPool over the same images."""
    import polars as pl

    from dd_assets.data.loading import load_rows

    _write_dataset(tmp_path, classes=2, per_class=7, size=8)
    data = {"root": str(tmp_path), "image_size": 8}
    rows = {c: pl.DataFrame({"path": [f"train/c{c}/{i:03d}.png" for i in range(7)][::-1],
                             "source_id": (c << 32) + np.arange(7)[::-1]}) for c in range(2)}
    sampler = ClassSampler(rows, data)
    pool = {c: load_rows(r.sort("source_id"), data) for c, r in rows.items()}
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for c, n in [(0, 4), (1, 9), (0, 7), (1, 1)]:
        got = RealPool(sampler).sample(c, n, ga)
        want = RealPool(pool).sample(c, n, gb)
        assert torch.equal(got, want) and got.shape[0] == min(n, 7)
    assert sampler.decoded == 4 + 7 + 7 + 1  # only the drawn images were decoded
    with pytest.raises(ValueError, match="no real images of class 5"):
        sampler(5, 2, ga)


# ============================================================================ materialized on a constructed dataset


SIZE = 16
UDD_BUDGET = {"iterations": 3, "inner_steps": 2, "batch_real": 4, "net_batch_size": 8, "top_p": 4}


def _profile(tmp_path, raw):
    doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    doc["profile"] = "udd_test"  # every method stays in the graph; only random and udd are materialized
    doc["profiles"]["udd_test"] = {
        "data": {"source": "folder", "root": str(raw), "image_size": SIZE, "val_fraction": 0.2, "test_fraction": 0.2,
                 "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "teacher": {"epochs": 1}, "ipcs": [1], "labels": {"topk": 3},
        "student": {"epochs": 2, "eval_every": 1, "seeds": [0]},
        "methods": {"udd": UDD_BUDGET},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(names, partitions=None):
    """One backfill carried out here (``dd-assets materialize``), on the instance of ``$DAGSTER_HOME``."""
    defs = build_definitions(load_params(), executor="in_process")
    runs = local_backfill.materialize(defs, [dg.AssetKey(n) for n in names], os.environ["DAGSTER_HOME"], partitions).runs
    assert runs and all(r.is_success for r in runs)


def _identity_convnet(classes: int) -> torch.nn.Module:
    """ConvNet-3 (no norm) whose every feature channel is avgpool^3 of input channel 0: conv1
    copies channel 0 (centre tap 1), conv2/3 average the identical channels (centre tap 1/128),
    no bias -- so for pixels in [0, 1] (mean 0, std 1) the activation map is known exactly."""
    from dd_assets.models import create_model

    net = create_model("convnet_d3", classes, in_channels=3, image_size=SIZE, norm="none")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            conv.weight.zero_()
            conv.bias.zero_()
            if i == 0:
                conv.weight[:, 0, 1, 1] = 1.0
            else:
                conv.weight[:, :, 1, 1] = 1.0 / conv.weight.shape[1]
    return net


def _expected_mue(values: np.ndarray) -> float:
    """Eq. 11-12 as read in docs/udd.md, from the map's values: normalized entropy over d
    intervals of [0, max], mean over d = 5..10."""
    u = values / values.max()
    ue = []
    for d in range(5, 11):
        p = np.bincount(np.minimum((u * d).astype(int), d - 1), minlength=d) / u.size
        p = p[p > 0]
        ue.append(float(-(p * np.log(p)).sum() / math.log(d)))
    return float(np.mean(ue))


def test_udd_entry_materializes_deterministically_and_mue_is_reported(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    _write_dataset(raw)
    monkeypatch.setenv("DD_ASSETS_PARAMS", str(_profile(tmp_path, raw)))
    monkeypatch.delenv("DD_ASSETS_PROFILE", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    roots = []
    for name in ("a", "b"):
        monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(tmp_path / name))
        _run(["raw_images", "manifest", "udd_distilled", "random_selection"])
        roots.append(DataRoot(str(tmp_path / name)))
    root = roots[0]

    arrays, attrs = read_group(root, layout.distilled("udd", 1))
    images, labels = arrays["images"], arrays["labels"]
    assert images.shape == (3, 3, SIZE, SIZE) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2]
    # same seed -> byte-identical images (second data root, second run)
    again, _ = read_group(roots[1], layout.distilled("udd", 1))
    assert again["images"].tobytes() == images.tobytes()
    # the images moved away from their real initial images, which are the random baseline's picks
    lin = read_table(root, layout.lineage("udd", 1))
    sel = read_table(root, layout.selection("random", 1))
    assert lin.sort_values("image_index")["source_id"].tolist() == sel.sort_values("class_index")["source_id"].tolist()
    assert (lin["role"] == "init").all() and (lin["pixel_change"] > 0).all()
    assert attrs["iterations"] == 3 and len(attrs["loss_curve"]["loss"]) == 3 and attrs["policy"] == "jitter"
    assert sum(attrs["region_counts"]) == 3 * 2 * 3 * 4  # iterations x inner steps x images x top_p
    assert root.read_bytes(layout.grid("udd", 1))[:4] == b"\x89PNG"
    assert root.read_bytes(layout.curve("udd", "ipc=1"))[:4] == b"\x89PNG"

    # the rest of the chain (shared code) and the report, first with the trained teacher
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(tmp_path / "a"))
    _run(["teacher", "random_distilled", "random_soft_labels", "random_students", "udd_soft_labels",
          "udd_students", "utilization", "report"])
    table = read_table(root, layout.utilization(1)).set_index("method")
    assert set(table.index) == {"random", "udd"} and table["mue"].between(0, 1).all()

    # known answers: a teacher whose activation map is avgpool^3 of channel 0; random := constant
    # images (one activation level: mUE 0), udd := top half black, bottom half white (2x2 map
    # [[0, 0], [1, 1]], bilinearly upsampled to 16 px: 4 rows 0, rows (2i - 7)/16 for i = 4..11, 4 rows 1)
    from dd_assets.models import save_checkpoint

    save_checkpoint(root.local(layout.TEACHER_CHECKPOINT), _identity_convnet(3), "convnet_d3",
                    {"in_channels": 3, "image_size": SIZE, "norm": "none"}, ["c0", "c1", "c2"])
    constant = np.full((3, 3, SIZE, SIZE), 128, np.uint8)
    halves = np.zeros((3, 3, SIZE, SIZE), np.uint8)
    halves[:, :, SIZE // 2:] = 255
    for entry, imgs in (("random", constant), ("udd", halves)):
        write_group(root, layout.distilled(entry, 1), {"images": imgs, "labels": np.arange(3)})
    _run(["utilization", "report"])
    rows = np.concatenate([np.zeros(4), (2 * np.arange(4, 12) - 7) / 16, np.ones(4)])
    expected = _expected_mue(np.repeat(rows, SIZE))
    table = read_table(root, layout.utilization(1)).set_index("method")
    assert table.at["random", "mue"] == 0.0 and table.at["random", "mue_std"] == 0.0
    assert table.at["udd", "mue"] == pytest.approx(expected, abs=1e-12) and 0.3 < expected < 0.9
    summary = read_table(root, layout.REPORT_TABLE).set_index("method")
    assert summary.at["udd", "mue"] == pytest.approx(expected, abs=1e-12) and summary.at["random", "mue"] == 0.0
    md = root.read_bytes(layout.REPORT_MD).decode()
    assert "| chain wall (s) | mUE |" in md
    assert any(line.startswith("| udd | 1 |") and line.endswith(f"| {expected:.3f} |") for line in md.splitlines())
    assert any(line.startswith("| random | 1 |") and line.endswith("| 0.000 |") for line in md.splitlines())
