"""The method plugin contract, tested over the registry (every method, not a hand-kept list),
and the layering rules of the code base (pure maths never imports Dagster; no import circles;
no method names branched on in the Dagster layer; small files)."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dd_assets.methods import registry
from dd_assets.methods.plugin import ROW_COLUMNS, ClassCandidates, full_boxes

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dd_assets"
NAMES = registry.names()
SELECT = [n for n in NAMES if registry.get(n).kind == "select"]
SIZE, N, CLASSES = 32, 60, 4


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_and_metadata(name):
    plugin = registry.get(name)
    assert plugin.name == name and plugin.kind in ("select", "synthesize")
    defaults = plugin.defaults
    cfg = plugin.make_config(defaults)
    # the typed config holds exactly the defaults, and JSON (what is hashed) round-trips them
    assert {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} == defaults
    assert json.loads(json.dumps(defaults)) == json.loads(json.dumps(dataclasses.asdict(cfg)))
    if defaults:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, next(iter(defaults)), 1)
    with pytest.raises(TypeError):
        plugin.make_config({**defaults, "no_such_parameter": 1})   # unknown keys never pass silently
    for key in defaults:
        meta = plugin.field_meta(key)
        assert set(meta) >= {"min", "choices"}, (name, key)
        if meta["choices"]:
            assert defaults[key] in meta["choices"], (name, key)
        if meta["min"] is not None and isinstance(defaults[key], int):
            assert defaults[key] >= meta["min"], (name, key)
    assert set(plugin.label_keys) <= set(defaults) and set(plugin.compat) <= set(defaults)


def test_mutable_defaults_are_not_shared():
    rded = registry.get("rded")
    a, b = rded.make_config(rded.defaults), rded.make_config(rded.defaults)
    a.scale.append(9)
    assert b.scale == [0.08, 1.0] and rded.defaults["scale"] == [0.08, 1.0]


def test_with_defaults_changes_only_what_it_names():
    rded = registry.get("rded")
    other = rded.with_defaults(factor=2, drop=("seed",))
    assert other.defaults == {k: (2 if k == "factor" else v) for k, v in rded.defaults.items() if k != "seed"}
    assert other.field_meta("factor")["min"] == 1 and rded.defaults["factor"] == 1


def test_registry_refuses_unknown_names_listing_the_known():
    with pytest.raises(KeyError, match="registered: random, rded"):
        registry.get("nope")


# -- selection on a constructed fixture ---------------------------------------------------------


def _fixture(asset: str, cidx: int, rng: np.random.Generator) -> ClassCandidates:
    ids = np.arange(cidx * 1000, cidx * 1000 + N, dtype=np.int64)
    if asset in ("manifest", "teacher_features"):
        arrays = {"features": rng.normal(size=(N, 8)).astype(np.float32)} if asset == "teacher_features" else {}
        return ClassCandidates(cidx, f"c{cidx}", ids, full_boxes(N, SIZE), np.full(N, np.nan, np.float32), arrays=arrays)
    if asset in ("rded_scores", "cidd_scores"):
        lo = rng.integers(0, SIZE // 2, size=(N, 2))
        boxes = np.concatenate([lo, lo + rng.integers(4, SIZE // 2, size=(N, 2))], axis=1).astype(np.int32)
        return ClassCandidates(cidx, f"c{cidx}", ids, boxes, rng.random(N).astype(np.float32))
    if asset == "focusdc_attention":
        att = rng.random((N, 8, 8)).astype(np.float32)
        att /= att.sum(axis=(1, 2), keepdims=True)
        arrays = {"attention": att, "logits": rng.normal(size=(N, CLASSES)).astype(np.float32),
                  "patch_size": np.array([4, 4])}
        return ClassCandidates(cidx, f"c{cidx}", ids, arrays=arrays)
    if asset == "ddps_clusters":
        lo = rng.integers(0, SIZE // 2, size=(N, 2))
        table = pd.DataFrame({"patch_id": np.arange(N), "source_id": ids, "x0": lo[:, 0], "y0": lo[:, 1],
                              "x1": lo[:, 0] + 12, "y1": lo[:, 1] + 12, "r": rng.normal(size=N),
                              "cluster": rng.integers(0, 6, N), "distance": rng.random(N),
                              "cluster_rank": rng.permutation(N) % 6})
        return ClassCandidates(cidx, f"c{cidx}", ids, table=table)
    raise AssertionError(f"no test fixture for candidate asset {asset!r}: add one for the new method")


@pytest.mark.parametrize("ipc", [1, 3])
@pytest.mark.parametrize("name", SELECT)
def test_selection_schema_and_tiles(name, ipc):
    """Every select plugin returns the common schema: IPC images of exactly tiles^2 distinct
    tiles each, crops of the class's own candidates inside the working image."""
    plugin = registry.get(name)
    cfg = plugin.make_config(plugin.defaults)
    side = plugin.tiles(cfg, ipc, SIZE)
    for cidx in range(2):
        cands = _fixture(plugin.candidates, cidx, np.random.default_rng(cidx))
        df = plugin.select(cfg, cands, ipc, SIZE)
        assert list(df.columns) == ROW_COLUMNS, name
        assert len(df) == ipc * side * side, name
        assert sorted(df["image_index"].unique()) == list(range(ipc))
        for _, g in df.groupby("image_index"):
            assert sorted(g["tile"]) == list(range(side * side))
        assert set(df["source_id"]) <= set(cands.source_id.tolist())
        assert (df[["x0", "y0"]].to_numpy() >= 0).all() and (df[["x1", "y1"]].to_numpy() <= SIZE).all()
        assert ((df["x1"] > df["x0"]) & (df["y1"] > df["y0"])).all()
        assert df["source_id"].dtype == np.int64 and df["x0"].dtype == np.int32 and df["score"].dtype == np.float32
        again = plugin.select(cfg, _fixture(plugin.candidates, cidx, np.random.default_rng(cidx)), ipc, SIZE)
        pd.testing.assert_frame_equal(df, again)   # same inputs, same rows


@pytest.mark.parametrize("name", SELECT)
def test_selection_refuses_an_ipc_the_class_cannot_fill(name):
    plugin = registry.get(name)
    cfg = plugin.make_config(plugin.defaults)
    with pytest.raises(ValueError, match="'c0'"):
        plugin.select(cfg, _fixture(plugin.candidates, 0, np.random.default_rng(0)), N + 1, SIZE)


def test_rded_selection_is_the_lowest_scores_interleaved():
    """The known answer: RDED keeps the IPC * factor^2 lowest-CE crops, tile t of image i = rank t*IPC+i."""
    plugin = registry.get("rded")
    cfg = plugin.make_config({**plugin.defaults, "factor": 2})
    cands = _fixture("rded_scores", 0, np.random.default_rng(3))
    df = plugin.select(cfg, cands, 2, SIZE)
    ranked = cands.source_id[np.argsort(cands.score, kind="stable")][:8]
    assert df.sort_values(["tile", "image_index"])["source_id"].tolist() == ranked.tolist()


# -- the graph with each method alone -----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_graph_builds_with_each_method_alone(tmp_path, name):
    import yaml

    from dd_assets.config import load_params
    from dd_assets.definitions import build_definitions
    from tests.conftest import write_params

    path = write_params(tmp_path, "tiny")
    doc = yaml.safe_load(path.read_text())
    tiny = doc["profiles"]["tiny"]
    doc["methods"] = {name: doc["methods"].get(name) or {}}          # profiles deep-merge over the base
    tiny["methods"] = {name: (tiny.get("methods") or {}).get(name) or {}}
    doc["profiles"] = {"tiny": tiny}   # other profiles name entries this file no longer has
    path.write_text(yaml.safe_dump(doc))
    graph = build_definitions(load_params(path)).resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {f"{name}_distilled", f"{name}_soft_labels", f"{name}_students", "report"} <= keys
    assert (f"{name}_selection" in keys) == (registry.get(name).kind == "select")
    others = set(NAMES) - {name, registry.BASELINE}
    assert not {k for k in keys if k.split("_")[0] in others}, keys


# -- layering ---------------------------------------------------------------------------------


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_pure_layers_never_import_dagster_or_the_dagster_layer():
    for mod, path in _modules():
        if mod.startswith(("dd_assets.methods", "dd_assets.core")):
            bad = {i for i in _imports(path, top_level_only=False)
                   if i.split(".")[0] == "dagster" or i.startswith(("dd_assets.defs", "dd_assets.definitions"))}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_import_circles():
    """Module-level imports between dd_assets modules form no cycle."""
    mods = dict(_modules())
    edges = {}
    for mod, path in mods.items():
        targets = set()
        for i in _imports(path, top_level_only=True):
            while i and i not in mods:
                i = i.rpartition(".")[0]
            if i and i != mod and i.startswith("dd_assets"):
                targets.add(i)
        edges[mod] = targets
    state: dict[str, int] = {}

    def visit(m, trail):
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(t):] + [t]))
            if t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])


def test_no_method_names_branched_on_in_the_dagster_layer():
    """``== "rded"`` / ``in ("focusdc", "random")`` in dd_assets/defs/ would mean a method's
    behaviour lives outside its plugin and piece."""
    names = set(NAMES)
    for path in sorted((PKG / "defs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators]
                          for c in ([c] if not isinstance(c, (ast.Tuple, ast.List, ast.Set)) else c.elts)]
                hit = {c.value for c in consts if isinstance(c, ast.Constant) and c.value in names}
                assert not hit, f"{path.relative_to(ROOT)}:{node.lineno} compares with method name(s) {hit}"


def test_source_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not big, f"split these by concern: {big}"


# -- adding a method: a package with a plugin, one registry line, a params entry --------------

TOY_PLUGIN = '''
from dataclasses import dataclass

import numpy as np

from dd_assets.methods.plugin import MethodPlugin, interleaved, param


@dataclass(frozen=True)
class LargestParams:
    power: int = param(2, min=1, doc="feature norm order")


def select(cfg, cands, ipc, size):
    cands.need(len(cands.source_id), ipc, "train images with features")
    norms = np.linalg.norm(cands.arrays["features"], ord=cfg.power, axis=1)
    return interleaved(cands, np.argsort(-norms, kind="stable")[:ipc], ipc)


PLUGIN = MethodPlugin(name="largest", config=LargestParams, kind="select", candidates="teacher_features",
                      select=select, description="the images with the largest teacher features")
'''


def test_a_new_method_is_a_plugin_one_registry_line_and_a_params_entry(tmp_path, monkeypatch):
    import sys

    import yaml

    from dd_assets.config import ParamsError, load_params
    from dd_assets.definitions import build_definitions
    from tests.conftest import write_params

    (tmp_path / "toy_largest").mkdir()
    (tmp_path / "toy_largest" / "__init__.py").write_text("")
    (tmp_path / "toy_largest" / "plugin.py").write_text(TOY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.PLUGINS, "largest", "toy_largest.plugin")   # the one registry line

    path = write_params(tmp_path, "tiny")
    doc = yaml.safe_load(path.read_text())
    doc["methods"]["largest"] = {"power": 1}                                  # the params entry
    path.write_text(yaml.safe_dump(doc))
    graph = build_definitions(load_params(path)).resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"largest_selection", "largest_distilled", "largest_soft_labels", "largest_students"} <= keys
    parents = {k.to_user_string() for k in graph.get(next(k for k in graph.get_all_asset_keys()
                                                          if k.to_user_string() == "largest_selection")).parent_keys}
    assert parents == {"teacher_features"}
    # its parameters are checked like every method's
    doc["methods"]["largest"] = {"power": 0}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ParamsError, match=r"methods\.largest\.power = 0: must be an integer >= 1"):
        load_params(path)
    # and the selection is what the plugin says: the largest L1 norms, in order
    plugin = registry.get("largest")
    cands = _fixture("teacher_features", 0, np.random.default_rng(5))
    df = plugin.select(plugin.make_config({"power": 1}), cands, 3, SIZE)
    expected = cands.source_id[np.argsort(-np.abs(cands.arrays["features"]).sum(1))[:3]]
    assert df["source_id"].tolist() == expected.tolist()
    sys.modules.pop("toy_largest.plugin", None)
    sys.modules.pop("toy_largest", None)
