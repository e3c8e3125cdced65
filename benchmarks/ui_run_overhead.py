"""Wall time of one UI-style run of a sub-second asset partition, per executor (issue 21 item 4).

The Dagster UI launches each (asset, partition) as its own run. With the multiprocess executor
the step runs in a second process that imports torch and rebuilds the definitions again; the
in_process executor (the UI's default, ``DD_ASSETS_EXECUTOR``) runs it in the run's process.
This script times `dagster asset materialize -m dd_assets.definitions --select manifest
--partition 0` (tiny profile, raw_images materialized first) alternating the executors, and
prints medians and their ratio from the same run (machines are noisy).

    .venv/bin/python benchmarks/ui_run_overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from tests.conftest import write_params

    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "DD_ASSETS_PARAMS": str(write_params(tmp, "tiny", raw_root=tmp / "raw")),
               "DD_ASSETS_DATA_ROOT": str(tmp / "root"), "DAGSTER_HOME": str(tmp / "dh")}
        env.pop("DD_ASSETS_PROFILE", None)
        (tmp / "dh").mkdir()
        subprocess.run([str(bin_dir / "dd-assets"), "materialize", "--select", "raw_images"], env=env, check=True,
                       cwd=ROOT, capture_output=True)
        times: dict[str, list[float]] = {"in_process": [], "multiprocess": []}
        for _ in range(args.repeats):
            for name in times:
                t0 = time.perf_counter()
                subprocess.run([str(bin_dir / "dagster"), "asset", "materialize", "-m", "dd_assets.definitions",
                                "--select", "manifest", "--partition", "0"], env={**env, "DD_ASSETS_EXECUTOR": name},
                               cwd=ROOT, check=True, capture_output=True)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:13s} median {med[k]:6.1f} s  runs {', '.join(f'{x:.1f}' for x in v)}")
    print(f"multiprocess / in_process: {med['multiprocess'] / med['in_process']:.2f}x")


if __name__ == "__main__":
    main()
