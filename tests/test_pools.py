"""GPU concurrency pool (issue 20): every asset that computes on ``DDResource.torch_device()``
declares ``pool=GPU_POOL`` and no other asset does; the repo's dagster.yaml sets no limit, and its
commented GPU example loads as a valid instance; a pool limit of 1 keeps two runs' pooled steps
apart."""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from dd_assets.config import PROJECT_ROOT, load_params
from dd_assets.definitions import build_definitions
from dd_assets.defs.resources import GPU_POOL
from tests.conftest import write_params

DEFS_DIR = PROJECT_ROOT / "dd_assets" / "defs"
ASSET_DECORATORS = {"asset", "multi_asset", "graph_asset", "graph_multi_asset", "dd_asset"}   # dd_asset: the kit (defs/kit.py)


# --- (a) lint: pool=GPU_POOL iff the asset (or a same-module helper it calls) calls torch_device ---

def _decorator_name(node: ast.expr) -> str | None:
    func = node.func if isinstance(node, ast.Call) else node
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def _declares_gpu_pool(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and any(
        kw.arg == "pool" and isinstance(kw.value, ast.Name) and kw.value.id == "GPU_POOL"
        for kw in decorator.keywords)


def _declares_any_pool(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and any(kw.arg in ("pool", "pools") for kw in decorator.keywords)


def _functions(tree: ast.AST, into: dict | None = None) -> dict[str, list]:
    out = into if into is not None else {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.setdefault(node.name, []).append(node)
    return out


def module_assets(source: str, known: dict[str, list] | None = None) -> dict[str, tuple[bool, bool, bool]]:
    """``{asset function: (uses the torch device, declares pool=GPU_POOL, declares any pool)}``
    for every function decorated with an asset decorator in one module's source.  "Uses" means
    the function calls ``.torch_device()`` itself or calls (by name, transitively) a function
    defined in the same module -- or in ``known``, the other scanned modules -- that does."""
    tree = ast.parse(source)
    own = _functions(tree)
    functions = {k: list(v) for k, v in (known or {}).items()}
    for k, v in own.items():
        functions.setdefault(k, []).extend(f for f in v if f not in functions.get(k, []))

    def direct(fn) -> tuple[bool, set[str]]:
        device, called = False, set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                if isinstance(node.func, ast.Attribute) and node.func.attr == "torch_device":
                    device = True
                elif isinstance(node.func, ast.Name):
                    called.add(node.func.id)
        return device, called

    def uses_device(name: str, seen: frozenset[str]) -> bool:
        if name in seen or name not in functions:
            return False
        seen = seen | {name}
        for fn in functions[name]:
            device, called = direct(fn)
            if device or any(uses_device(c, seen) for c in called):
                return True
        return False

    out = {}
    for name, fns in own.items():
        for fn in fns:
            for dec in fn.decorator_list:
                if _decorator_name(dec) in ASSET_DECORATORS:
                    device, called = direct(fn)
                    uses = device or any(uses_device(c, frozenset({name})) for c in called)
                    out[f"{name}@{fn.lineno}"] = (uses, _declares_gpu_pool(dec), _declares_any_pool(dec))
    return out


def pool_lint(defs_dir: Path = DEFS_DIR) -> tuple[list[str], dict[str, bool]]:
    """(problems, {module:asset: pooled}) over ``dd_assets/defs/*.py``."""
    problems, seen = [], {}
    paths = sorted(defs_dir.rglob("*.py"))   # the chain, the kit-built assets and the method pieces
    known: dict[str, list] = {}
    for path in paths:   # helpers are called across modules (e.g. a piece calls model_assets.train_model_asset)
        _functions(ast.parse(path.read_text()), known)
    for path in paths:
        for asset, (uses, gpu_pool, any_pool) in module_assets(path.read_text(), known).items():
            where = f"{path.relative_to(defs_dir)}:{asset}"
            seen[where] = gpu_pool
            if uses and not gpu_pool:
                problems.append(f"{where} calls torch_device() but does not declare pool=GPU_POOL")
            if not uses and any_pool:
                problems.append(f"{where} declares a pool but never calls torch_device()")
    return problems, seen


def test_gpu_assets_declare_the_gpu_pool():
    problems, seen = pool_lint()
    assert not problems, "\n".join(problems)
    # the lint saw the graph: both kinds exist
    assert sum(seen.values()) >= 15, seen
    assert any(name.startswith("data_assets.py:manifest@") and not pooled for name, pooled in seen.items())


def test_lint_catches_a_missing_pool(tmp_path):
    """The lint fails on a copy of the defs with one ``pool=GPU_POOL`` removed."""
    for path in DEFS_DIR.rglob("*.py"):
        (tmp_path / path.relative_to(DEFS_DIR)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.relative_to(DEFS_DIR)).write_text(path.read_text())
    target = tmp_path / "model_assets.py"
    text = target.read_text()
    assert ", pool=GPU_POOL," in text
    target.write_text(text.replace(", pool=GPU_POOL,", ",", 1))
    problems, _ = pool_lint(tmp_path)
    assert len(problems) == 1 and "model_assets.py:teacher@" in problems[0], problems


def test_lint_catches_an_unneeded_pool():
    src = ("import dagster as dg\n"
           "def helper(dd):\n    return dd.torch_device()\n"
           "def build():\n"
           "    @dg.asset(pool=GPU_POOL)\n    def a(dd):\n        return 1\n"
           "    @dg.asset()\n    def b(dd):\n        return helper(dd)\n")
    got = module_assets(src)
    assert got == {"a@6": (False, True, True), "b@9": (True, False, False)}


# --- (b) the built definitions ---

def test_definitions_carry_the_gpu_pool(tmp_path):
    defs = build_definitions(load_params(write_params(tmp_path, "default_all")))
    graph = defs.resolve_asset_graph()
    pools = {k.to_user_string(): defs.resolve_assets_def(k).op.pool for k in graph.get_all_asset_keys()}
    assert GPU_POOL == "gpu"
    for name in ("teacher", "teacher_features", "cam_maps", "ddps_scores", "dift_features", "diffusion_model",
                 "expert_trajectories", "edf_distilled", "udd_distilled", "random_soft_labels", "random_students",
                 "rded_students", "focusdc_dft_students", "utilization", "report"):
        assert pools[name] == "gpu", name
        assert graph.get(dg.AssetKey(name)).pools == {"gpu"}, name
    for name in ("raw_images", "manifest", "ddps_clusters", "random_selection", "rded_selection"):
        assert pools[name] is None, name
    assert set(pools.values()) == {"gpu", None}
    unpooled = sorted(n for n, p in pools.items() if p is None)
    assert unpooled == sorted(["raw_images", "manifest", "ddps_clusters",
                               *(n for n in pools if n.endswith("_selection"))]), unpooled


# --- (c) dagster.yaml: no limit by default; the commented GPU example is a valid instance config ---

def _example_block(text: str) -> dict:
    """The commented ``concurrency:`` example of dagster.yaml, uncommented."""
    lines = text.splitlines()
    start = lines.index("# concurrency:")
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("#  "):
            break
        block.append(line)
    return yaml.safe_load("\n".join(line[2:] for line in block))


def test_repo_dagster_yaml_sets_no_pool_limit(tmp_path):
    (tmp_path / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.event_log_storage.supports_global_concurrency_limits
        assert instance.event_log_storage.get_pool_config().default_pool_limit is None
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).limit is None
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2


def test_dagster_yaml_gpu_example_loads(tmp_path):
    text = (PROJECT_ROOT / "dagster.yaml").read_text()
    live = yaml.safe_load(text)
    assert "concurrency" not in live
    example = _example_block(text)
    limit = example["concurrency"]["pools"]["default_limit"]
    assert isinstance(limit, int) and limit >= 1

    # as the comment says: the example replaces the run_queue block, keeping its run limit
    cfg = {k: v for k, v in live.items() if k != "run_queue"} | example
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(cfg))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.event_log_storage.get_pool_config().default_pool_limit == limit
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        assert info.limit == limit and info.using_default_limit
        assert (instance.get_concurrency_config().run_queue_config.max_concurrent_runs
                == live["run_queue"]["max_concurrent_runs"])

    # next to the run_queue block this Dagster version refuses it (why the comment says "replace")
    bad = tmp_path / "both"
    bad.mkdir()
    (bad / "dagster.yaml").write_text(yaml.safe_dump(live | example))
    with pytest.raises(dg.DagsterInvalidConfigError, match="run_queue"):
        dg.DagsterInstance.from_config(str(bad))


def test_cli_pool_limit_command(tmp_path, monkeypatch):
    """The documented ``dagster instance concurrency set gpu N`` sets the pool's own limit."""
    from click.testing import CliRunner
    from dagster._cli.instance import instance_cli

    (tmp_path / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    res = CliRunner().invoke(instance_cli, ["concurrency", "set", GPU_POOL, "2"])
    assert res.exit_code == 0, res.output
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        assert info.limit == 2 and info.slot_count == 2 and not info.using_default_limit


# --- (d) behaviour: with the limit 1, two runs never execute their pooled steps at once ---

def test_pool_limit_serializes_two_runs(tmp_path):
    spans: dict[str, tuple[float, float]] = {}
    first_started = threading.Event()

    @dg.asset(pool=GPU_POOL)
    def toy(context):
        begin = time.monotonic()
        first_started.set()
        time.sleep(2.0)
        spans[context.run_id] = (begin, time.monotonic())

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 1)
        results = []

        def run():
            results.append(dg.materialize([toy], instance=instance).success)

        a = threading.Thread(target=run)
        a.start()
        assert first_started.wait(60)
        b = threading.Thread(target=run)  # starts while the first run holds the only slot
        b.start()
        a.join(120)
        b.join(120)
        assert results == [True, True]
        assert len(spans) == 2
        (s1, e1), (s2, e2) = sorted(spans.values())
        assert s2 >= e1, f"pooled steps overlapped: {spans}"
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        assert not info.claimed_slots and not info.pending_steps
