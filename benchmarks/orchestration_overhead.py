"""Orchestration overhead per Dagster run and per asset materialization vs class partitions (issue 19 item 4).

For N class partitions (default 10, 100, 1000) the script generates an ImageFolder of N classes x
``--images`` tiny PNGs (8 x 8 px) under a temporary folder in /tmp, a copy of params.yaml whose
``tiny`` profile reads it (``data.source: folder``), a data root and a DAGSTER_HOME there (the
repo's dagster.yaml copied in, as the CLI does); nothing of the user's is touched. The
definitions are the real ones (``dd_assets.definitions.build_definitions``, ~66 assets + checks);
the no-op assets timed next to them are stand-ins built with the same ``@dd_asset`` kit and the
same class / IPC partitions (``noop_kit_*``), or plain ``@dg.asset`` (``noop_bare*``: Dagster
alone). Every class's manifest is written and reported to the instance before timing (setup, not
timed), so the instance holds N manifest materializations.

Measured, the sides of every comparison alternating within one process (repeats x N x variant):

(a) definitions: ``build_definitions`` + ``get_repository_def`` (+ the repository snapshot a code
    server sends the UI) in-process, and a cold process (``import dd_assets.definitions``, each heavy
    library timed as it is first imported: what every ``dagster`` CLI run, run worker and code server pays);
(b) seconds per run of one partition: ``local_backfill.materialize`` of ``manifest[<class>]`` (the
    ``dd-assets materialize`` path: one asset backfill carried out in this process), a kit no-op,
    a kit no-op inside all the assets (the job over ~66 assets rebuilt per run), a bare Dagster
    no-op; and ``--cli-repeats`` UI-style ``dagster asset materialize`` processes;
(c) seconds per asset materialization: the median time between consecutive step starts in one run
    of ``--steps`` no-op assets (and, noisier, (that run - a run of one) / (steps - 1)), kit and bare,
    plus the fan-in ``noop_kit_fanin[<ipc>]`` (an IPC asset that records the data versions of every
    class's manifest, as ``<entry>_selection``, ``teacher``, ``expert_trajectories`` and the DDPS
    diffusion model do) and the real ``random_selection[1]``.

``before`` / ``after`` swap in the pre-fix code (one ``fetch_materializations`` query per
upstream partition; params.yaml parsed on every ``load_params``) next to the current one,
alternating, so the fix is measured in the same process. ``--profile`` (default on) runs
cProfile over one manifest run and one fan-in run at the largest N and prints where the time goes.

    .venv/bin/python benchmarks/orchestration_overhead.py [--partitions 10,100,1000] [--repeats 3]
        [--cli-repeats 1] [--cold-repeats 2] [--no-profile] [--json out.json] [--keep]

About 8 minutes on 2 shared CPU cores at the defaults (setup of N = 1000: ~1 min).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IPC = "1"


# -- the pre-fix code, swapped in for the "before" side ---------------------------------------

def legacy_upstream_versions(context, keys):
    """``dd_assets.defs.common.upstream_versions`` before issue 19 item 4: one query per key."""
    import dagster as dg

    out = {}
    for name, part in keys:
        flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[part] if part else None)
        recs = context.instance.fetch_materializations(flt, limit=1).records
        if recs:
            mat = recs[0].asset_materialization
            out[f"{name}[{part}]" if part else name] = (mat.tags or {}).get("dagster/data_version", "?")
    return out


def legacy_read_doc(p: Path):
    """``load_params`` before issue 19 item 4: params.yaml parsed on every call."""
    import yaml

    with open(p, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


class Code:
    """Switch the kit between the pre-fix ("before") and the current ("after") code."""

    def __init__(self):
        from dd_assets import config
        from dd_assets.defs import kit

        self.config, self.kit = config, kit
        self.current = {"upstream": kit.upstream_versions, "read_doc": config._read_doc}

    side = "after"

    def use(self, side: str) -> None:
        Code.side = side
        before = side == "before"
        self.kit.upstream_versions = legacy_upstream_versions if before else self.current["upstream"]
        self.config._read_doc = legacy_read_doc if before else self.current["read_doc"]


# -- setup ------------------------------------------------------------------------------------

class Setup:
    """N classes: raw folder, params.yaml, data root and DAGSTER_HOME under ``base``."""

    def __init__(self, base: Path, n: int, images: int):
        self.n, self.dir = n, base / f"n{n}"
        self.raw, self.home, self.root = self.dir / "raw", self.dir / "dagster_home", self.dir / "root"
        self.classes = [f"c{i:04d}" for i in range(n)]
        self.images = images

    def env(self) -> dict[str, str]:
        return {"DD_ASSETS_PARAMS": str(self.dir / "params.yaml"), "DD_ASSETS_DATA_ROOT": str(self.root),
                "DAGSTER_HOME": str(self.home)}

    def activate(self) -> None:
        os.environ.update(self.env())
        for k in ("DD_ASSETS_PROFILE", "DD_ASSETS_EXECUTOR", "MLFLOW_TRACKING_URI"):
            os.environ.pop(k, None)

    def write_files(self) -> None:
        import numpy as np
        from PIL import Image

        from tests.conftest import write_params

        for i, c in enumerate(self.classes):
            d = self.raw / c
            d.mkdir(parents=True)
            for j in range(self.images):
                Image.fromarray(np.full((8, 8, 3), (i * self.images + j) % 256, np.uint8)).save(d / f"{j}.png")
        write_params(self.dir, "tiny", overrides={"data.source": "folder", "data.image_size": 8}, raw_root=self.raw)
        self.home.mkdir(parents=True)
        shutil.copy(ROOT / "dagster.yaml", self.home / "dagster.yaml")   # as orchestrate.ensure_dagster_home

    def seed_manifests(self, instance) -> None:
        """Every class's manifest table written and reported (data version = its content hash),
        as N ``manifest`` runs would leave them, without N runs."""
        import dagster as dg

        from dd_assets.config import load_params
        from dd_assets.data.manifest import build_class_manifest
        from dd_assets.storage import DataRoot, layout
        from dd_assets.storage.tables import write_table

        params = load_params()
        root, data = DataRoot(params.data_root), params.block("data")
        for i, c in enumerate(self.classes):
            digest = write_table(root, layout.manifest(i), build_class_manifest(data, c, i).frame)
            instance.report_runless_asset_event(
                dg.AssetMaterialization("manifest", partition=c, tags={"dagster/data_version": digest}))


def stand_ins(params, steps: int):
    """No-op assets: ``noop_kit_<j>`` (the kit, class partitions), ``noop_kit_fanin`` (the kit,
    IPC partitions, records every class's manifest version), ``noop_bare_<j>`` (Dagster alone)."""
    import dagster as dg

    from dd_assets.config import block_hash
    from dd_assets.defs.kit import dd_asset
    from dd_assets.defs.partitions import build_partitions

    parts = build_partitions(params)
    kit = []
    for j in range(steps):
        @dd_asset(params, name=f"noop_kit_{j}", family="manifest", blocks=["data"], partitions_def=parts.class_def)
        def noop(run):
            return "noop", {}
        kit.append(noop)

    @dd_asset(params, name="noop_kit_fanin", family="manifest", blocks=["data"], partitions_def=parts.ipc_def,
              deps=[dg.AssetDep("manifest", partition_mapping=dg.AllPartitionMapping())])
    def fanin(run):
        ups = run.upstream([("manifest", c) for c in parts.classes])
        return block_hash(ups), {"upstream": len(ups)}

    bare = []
    for j in range(steps):
        @dg.asset(name=f"noop_bare_{j}", partitions_def=parts.class_def)
        def noop_bare():
            return dg.MaterializeResult(data_version=dg.DataVersion("noop"))
        bare.append(noop_bare)
    return kit, fanin, bare


# -- measurements -----------------------------------------------------------------------------

COLD = r"""
import importlib, json, time
out, t_all = {}, time.perf_counter()
# the heavy libraries `import dd_assets.definitions` pulls in, each timed as it is first imported
for name in ("dagster", "torch", "torchvision.transforms", "sklearn.cluster", "diffusers", "dd_assets.definitions"):
    t0 = time.perf_counter()
    mod = importlib.import_module(name)
    out["import " + name] = time.perf_counter() - t0
t0 = time.perf_counter()
mod.defs.get_repository_def()
out["get_repository_def"] = time.perf_counter() - t0
out["in_process_total"] = time.perf_counter() - t_all
print(json.dumps(out))
"""


def cold_load(setup: Setup) -> dict[str, float]:
    env = {**os.environ, **setup.env()}
    env.pop("DD_ASSETS_PROFILE", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", COLD], env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process"] = time.perf_counter() - t0
    res["interpreter start + exit"] = res["process"] - res["in_process_total"]   # exit: module teardown
    return res


def cli_run(setup: Setup, partition: str) -> float:
    env = {**os.environ, **setup.env()}
    for k in ("DD_ASSETS_PROFILE", "DD_ASSETS_EXECUTOR"):
        env.pop(k, None)
    dagster_bin = Path(sys.executable).parent / "dagster"
    t0 = time.perf_counter()
    subprocess.run([str(dagster_bin), "asset", "materialize", "-m", "dd_assets.definitions", "--select", "manifest",
                    "--partition", partition], env=env, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


class Bench:
    """The in-process state of one N: definitions, stand-ins, instance."""

    def __init__(self, setup: Setup, steps: int):
        import dagster as dg

        from dd_assets.config import load_params
        from dd_assets.definitions import build_definitions
        from dd_assets.orchestrate import _run_config

        setup.activate()
        self.setup = setup
        self.params = load_params()
        self.defs = build_definitions(self.params, executor="in_process")
        self.kit, self.fanin, self.bare = stand_ins(self.params, steps)
        self.instance = dg.DagsterInstance.from_config(str(setup.home))
        self.all_assets = [*self.defs.assets, *self.defs.asset_checks]
        self.resources = self.defs.resources
        self.run_config = _run_config(None, "INFO")   # as `dd-assets materialize` (log level INFO)
        self.next_class = 0
        self.gaps: dict[str, list[float]] = {}   # per run: median seconds between step starts

    def partition(self) -> str:
        """A class not yet materialized by a timed run (wraps around at N)."""
        c = self.setup.classes[self.next_class % self.setup.n]
        self.next_class += 1
        return c

    def materialize(self, assets, partition, selection=None, bare: bool = False) -> float:
        import dagster as dg

        self.setup.activate()
        t0 = time.perf_counter()
        res = dg.materialize(assets, selection=selection, partition_key=partition, instance=self.instance,
                             resources=None if bare else self.resources, run_config=self.run_config,
                             raise_on_error=False)
        dt = time.perf_counter() - t0
        if not res.success:
            raise RuntimeError(f"run of {selection or [a.key for a in assets]}[{partition}] failed")
        self.last_run_id = res.run_id
        return dt

    def step_gaps(self) -> list[float]:
        """Seconds between consecutive STEP_START events of the last run: one asset
        materialization each (its events, provenance, kit and body), the run's fixed costs excluded."""
        import dagster as dg

        starts = sorted(e.timestamp for e in self.instance.all_logs(self.last_run_id,
                                                                    of_type=dg.DagsterEventType.STEP_START))
        return [b - a for a, b in zip(starts, starts[1:])]

    def execute(self, asset: str, partition: str) -> float:
        """One (asset, partition) through ``local_backfill.materialize`` (the CLI's path: one asset
        backfill carried out in this process)."""
        import dagster as dg

        from dd_assets import local_backfill

        self.setup.activate()
        t0 = time.perf_counter()
        local_backfill.materialize(self.defs, [dg.AssetKey(asset)], self.setup.home, {asset: [partition]},
                                   log_level="INFO")
        return time.perf_counter() - t0

    def multi(self, assets, bare: bool) -> float:
        dt = self.materialize(assets, self.partition(), bare=bare)
        key = f"{'bare' if bare else 'kit'} [{Code.side}]"
        self.gaps.setdefault(key, []).append(statistics.median(self.step_gaps()))
        return dt

    def variants(self) -> dict:
        kit, fanin, bare = self.kit, self.fanin, self.bare
        return {
            "execute manifest": lambda: self.execute("manifest", self.partition()),
            "kit noop": lambda: self.materialize([kit[0]], self.partition()),
            "kit noop in all assets": lambda: self.materialize([*self.all_assets, kit[0]], self.partition(),
                                                               selection=[kit[0].key]),
            "bare noop": lambda: self.materialize([bare[0]], self.partition(), bare=True),
            "kit noop x steps": lambda: self.multi(kit, False),
            "bare noop x steps": lambda: self.multi(bare, True),
            "fan-in": lambda: self.materialize([fanin], IPC),
        }


def timed_build(setup: Setup) -> dict[str, float]:
    from dd_assets.config import load_params
    from dd_assets.definitions import build_definitions

    setup.activate()
    t0 = time.perf_counter()
    params = load_params()
    t1 = time.perf_counter()
    defs = build_definitions(params, executor="in_process")
    t2 = time.perf_counter()
    repo = defs.get_repository_def()
    t3 = time.perf_counter()
    out = {"load_params": t1 - t0, "build_definitions": t2 - t1, "repository": t3 - t2, "total": t3 - t0}
    try:   # what a code server sends the UI (private API: skipped if it moves)
        from dagster._core.remote_representation.external_data import RepositorySnap
        from dagster._serdes import serialize_value

        t4 = time.perf_counter()
        out["snapshot_bytes"] = len(serialize_value(RepositorySnap.from_def(repo)))
        out["snapshot"] = time.perf_counter() - t4
    except (ImportError, AttributeError):
        pass
    return out


PROFILE_ROWS = [   # (label, path suffix, function): cumulative seconds, overlapping
    ("whole run (dg.materialize)", "dagster/_core/definitions/materialize.py", "materialize"),
    ("  build the job over the asset list", "dagster/_core/definitions/definitions_class.py", "resolve_all_job_defs"),
    ("  create the run (snapshots, planned events)", "dagster/_core/instance/runs/run_domain.py", "create_run_for_job"),
    ("  event writes (handle_new_event)", "dagster/_core/instance/methods/event_methods.py", "handle_new_event"),
    ("    new per-run sqlite file (_initdb, alembic)", "dagster/_core/storage/event_log/sqlite/sqlite_event_log.py",
     "_initdb"),
    ("  input data versions (Dagster provenance)", "dagster/_core/execution/context/data_version_cache.py",
     "fetch_external_input_asset_version_info"),
    ("  the kit's _asset (body + kit)", "dd_assets/defs/kit.py", "_asset"),
    ("    load_params (kit check + DDResource.root)", "dd_assets/config.py", "load_params"),
    ("      yaml.safe_load", "yaml/__init__.py", "safe_load"),
    ("    upstream_versions (current)", "dd_assets/defs/common.py", "upstream_versions"),
    ("    upstream_versions (pre-fix)", "benchmarks/orchestration_overhead.py", "legacy_upstream_versions"),
    ("    fetch_materializations", "dagster/_core/instance/instance.py", "fetch_materializations"),
    ("    manifest body (build_class_manifest)", "dd_assets/data/manifest.py", "build_class_manifest"),
    ("    timing file write (DataRoot.write_bytes)", "dd_assets/storage/root.py", "write_bytes"),
]


def profile_summary(prof: cProfile.Profile, runs: int) -> list[tuple[str, float, int]]:
    stats = pstats.Stats(prof).stats
    rows = []
    for label, suffix, func in PROFILE_ROWS:
        ct, n = 0.0, 0
        for (path, _line, name), (_cc, nc, _tt, cum, _callers) in stats.items():
            if name == func and path.replace("\\", "/").endswith(suffix):
                ct, n = ct + cum, n + nc
        rows.append((label, ct / runs, n // max(1, runs)))
    return rows


def top_functions(prof: cProfile.Profile, limit: int = 12) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(limit)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return "\n".join(ln.replace(str(Path(sys.executable).parents[1]), ".venv") for ln in lines[start:])


# -- main -------------------------------------------------------------------------------------

def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt(xs, digits=2):
    return f"{med(xs):.{digits}f} ({', '.join(f'{x:.{digits}f}' for x in xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partitions", default="10,100,1000", help="comma-separated numbers of class partitions")
    ap.add_argument("--repeats", type=int, default=3, help="in-process repeats of every variant")
    ap.add_argument("--cold-repeats", type=int, default=2, help="cold `import dd_assets.definitions` processes per N")
    ap.add_argument("--cli-repeats", type=int, default=1, help="`dagster asset materialize` processes per N")
    ap.add_argument("--real-repeats", type=int, default=2, help="random_selection[1] runs per N and side")
    ap.add_argument("--steps", type=int, default=10, help="no-op assets in the multi-asset run")
    ap.add_argument("--images", type=int, default=6, help="images per class")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    ns = [int(x) for x in args.partitions.split(",")]
    base = Path(tempfile.mkdtemp(prefix="dd_orchestration_", dir="/tmp"))
    print(f"setup: real Definitions (build_definitions, tiny profile, data.source folder) for N classes x "
          f"{args.images} 8x8 PNGs; no-op stand-ins built with the same @dd_asset kit and partitions; "
          f"temporary DAGSTER_HOME / data root under {base}", flush=True)
    out: dict = {"partitions": ns, "args": vars(args), "by_n": {}}
    try:
        setups = {n: Setup(base, n, args.images) for n in ns}
        t0 = time.perf_counter()
        for s in setups.values():
            s.write_files()
        print(f"files written: {time.perf_counter() - t0:.1f} s", flush=True)

        # (a) cold processes, before this process imports anything heavy
        cold = {n: [] for n in ns}
        for _ in range(args.cold_repeats):
            for n in ns:
                cold[n].append(cold_load(setups[n]))
        for n in ns if args.cold_repeats else ():
            print(f"N={n:5d} cold import+build: " + fmt([c["process"] for c in cold[n]], 1) + " s; parts (median): "
                  + ", ".join(f"{k} {med([c[k] for c in cold[n]]):.2f}" for k in cold[n][0]), flush=True)

        setups[ns[0]].activate()
        import dagster as dg  # noqa: F401
        import dd_assets.definitions  # noqa: F401  (builds the module-level defs once)

        code = Code()
        benches = {}
        t0 = time.perf_counter()
        for n in ns:
            b = benches[n] = Bench(setups[n], args.steps)
            setups[n].seed_manifests(b.instance)
        print(f"manifests seeded: {time.perf_counter() - t0:.1f} s", flush=True)

        build = {n: [] for n in ns}
        for _ in range(args.repeats):
            for n in ns:
                build[n].append(timed_build(setups[n]))
        for n in ns:
            snap = (f"; repository snapshot {fmt([b['snapshot'] for b in build[n]])} s, "
                    f"{build[n][0]['snapshot_bytes'] / 1e3:.0f} kB") if "snapshot" in build[n][0] else ""
            print(f"N={n:5d} in-process build: total {fmt([b['total'] for b in build[n]])} s; build_definitions "
                  f"{fmt([b['build_definitions'] for b in build[n]])}{snap}", flush=True)

        # warm-up: first run of each kind per N (lazy imports, first sqlite files)
        code.use("after")
        for n in ns:
            for name, fn in benches[n].variants().items():
                fn()
        benches[ns[0]].execute("random_selection", IPC)

        for b in benches.values():
            b.gaps.clear()
        sides = ("before", "after")
        both = {"execute manifest", "kit noop", "kit noop x steps", "fan-in"}
        runs: dict[int, dict[str, list[float]]] = {n: {} for n in ns}
        for rep in range(args.repeats):
            for n in ns:
                for name, fn in benches[n].variants().items():
                    order = (sides if rep % 2 == 0 else sides[::-1]) if name in both else ("after",)
                    for side in order:
                        code.use(side)
                        runs[n].setdefault(f"{name} [{side}]", []).append(fn())
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
        code.use("after")

        real = {n: {"before": [], "after": []} for n in ns}
        for rep in range(args.real_repeats):
            for n in ns:
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    code.use(side)
                    real[n][side].append(benches[n].execute("random_selection", IPC))
        code.use("after")

        cli = {n: [] for n in ns}
        for _ in range(args.cli_repeats):
            for n in ns:
                cli[n].append(cli_run(setups[n], benches[n].partition()))

        print("\n== per N (median (runs)), seconds ==")
        k = args.steps
        for n in ns:
            r = runs[n]
            per_kit = [(a - b) / (k - 1) for a, b in zip(r["kit noop x steps [after]"], r["kit noop [after]"])]
            per_bare = [(a - b) / (k - 1) for a, b in zip(r["bare noop x steps [after]"], r["bare noop [after]"])]
            row = {
                "cold_load": [c["process"] for c in cold[n]],
                "build": [b["total"] for b in build[n]],
                **r,
                "per_asset_kit [before]": benches[n].gaps.get("kit [before]", []),
                "per_asset_kit [after]": benches[n].gaps.get("kit [after]", []),
                "per_asset_bare": benches[n].gaps.get("bare [after]", []),
                "per_asset_kit_by_difference": per_kit, "per_asset_bare_by_difference": per_bare,
                "random_selection_before": real[n]["before"], "random_selection_after": real[n]["after"],
                "cli_run": cli[n],
            }
            out["by_n"][n] = row
            print(f"-- N = {n}")
            for key, xs in row.items():
                print(f"   {key:38s} {fmt(xs, 3)}")

        print("\n| N | defs build in-process s | cold import+build s | run: execute manifest s (before -> after) "
              "| run: kit no-op s (before -> after) | run: bare Dagster no-op s "
              "| per asset mat. kit s (before -> after) | per asset mat. bare Dagster s "
              "| fan-in over N classes s (before -> after) | random_selection[1] s (before -> after) | CLI run s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n in ns:
            row = out["by_n"][n]
            print(f"| {n} | {med(row['build']):.2f} | {med(row['cold_load']):.1f} | "
                  f"{med(row['execute manifest [before]']):.2f} -> {med(row['execute manifest [after]']):.2f} | "
                  f"{med(row['kit noop [before]']):.2f} -> {med(row['kit noop [after]']):.2f} | "
                  f"{med(row['bare noop [after]']):.2f} | "
                  f"{med(row['per_asset_kit [before]']):.3f} -> {med(row['per_asset_kit [after]']):.3f} | "
                  f"{med(row['per_asset_bare']):.3f} | "
                  f"{med(row['fan-in [before]']):.2f} -> {med(row['fan-in [after]']):.2f} | "
                  f"{med(row['random_selection_before']):.2f} -> {med(row['random_selection_after']):.2f} | "
                  f"{med(row['cli_run']):.1f} |")

        if not args.no_profile:
            n = ns[-1]
            b = benches[n]
            out["profile"] = {}
            for label, side, fn, reps in (
                ("execute manifest", "before", lambda: b.execute("manifest", b.partition()), 2),
                ("execute manifest", "after", lambda: b.execute("manifest", b.partition()), 2),
                ("fan-in", "before", lambda: b.materialize([b.fanin], IPC), 1),
                ("fan-in", "after", lambda: b.materialize([b.fanin], IPC), 1),
            ):
                code.use(side)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(reps):
                    fn()
                prof.disable()
                rows = profile_summary(prof, reps)
                out["profile"][f"{label} [{side}]"] = rows
                print(f"\n== cProfile, N = {n}: {label} [{side}], per run (cumulative s, overlapping; calls) ==")
                for name, ct, calls in rows:
                    if calls:
                        print(f"   {name:50s} {ct:7.3f}  x{calls}")
                if side == "before":
                    print("   top functions by own time:\n" + top_functions(prof))
            code.use("after")
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
