"""How far EDF's pixel step moves the synthetic images, per lr_pixel (train side only).

Runs ``--iterations`` EDF iterations (the profile's ``methods.edf`` entry at ``--ipc``, with
only ``lr_img`` changed) from the random baseline's images, against the stored
``expert_trajectories`` and ``teacher`` of the profile's data root, and prints per lr_pixel:
the matching losses, the mean absolute pixel change (uint8 units), the share of pixels at 0
or 255, and how many images the teacher still classifies as their label.  No student is
trained and no test image is read.  Used to choose ``lr_img`` at IPC 1 (docs/edf.md,
"Deviations in the graph", 6)::

    DD_ASSETS_PROFILE=cifar10 DD_ASSETS_DATA_ROOT=data/cifar10 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/edf_pixel_lr.py --ipc 1 --iterations 6 --lr 10000 1000 100

Needs ``expert_trajectories``, ``teacher``, ``manifest`` and ``random_selection`` materialized.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from dd_assets.config import load_params
from dd_assets.defs.composition import compose_method
from dd_assets.defs.io import load_teacher, read_manifest_pl
from dd_assets.defs.methods.edf import initial_selection, load_experts
from dd_assets.defs.methods.edf_params import entry_config
from dd_assets.defs.partitions import build_partitions
from dd_assets.methods.edf.distill import edf_distill
from dd_assets.core.imaging import to_model_input
from dd_assets.methods.entries import method_params
from dd_assets.storage import DataRoot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ipc", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--lr", type=float, nargs="+", default=[10000.0, 1000.0, 100.0])
    ap.add_argument("--entry", default="edf", help="methods entry whose settings are used")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    p = load_params()
    root = DataRoot(os.environ.get("DD_ASSETS_DATA_ROOT", p.data_root))
    parts, data = build_partitions(p), p.block("data")
    mp = method_params(args.entry, p.block("methods")[args.entry])
    sel = initial_selection(args.ipc, root, parts.classes, int(data["image_size"]), int(mp["seed"]))
    init, labels, _ = compose_method(sel, read_manifest_pl(root, parts), data, 1)
    traj = load_experts(root, parts)
    teacher, meta = load_teacher(root, "cpu")
    teacher.eval()

    def agree(imgs: np.ndarray) -> int:
        with torch.no_grad():
            pred = teacher(to_model_input(imgs, data["mean"], data["std"])).argmax(1).numpy()
        return int((pred == labels).sum())

    def saturated(imgs: np.ndarray) -> float:
        return float(((imgs == 0) | (imgs == 255)).mean())

    print(f"{args.entry} IPC {args.ipc}: {len(init)} images, teacher agrees {agree(init)}, "
          f"saturated {saturated(init):.3f}")
    for lr in args.lr:
        cfg = entry_config(args.entry, mp, args.ipc)
        cfg.match.iterations, cfg.match.lr_img = args.iterations, lr
        t0 = time.perf_counter()
        res = edf_distill(init, labels, traj, teacher if cfg.use_dae else None, cfg, data["mean"],
                          data["std"], "cpu", parts.classes, meta["class_names"])
        change = np.abs(res.images.astype(np.int16) - init.astype(np.int16)).mean()
        print(f"lr_img {lr:g}: loss {np.round(res.loss, 3).tolist()} mean|dpixel| {change:.1f} "
              f"saturated {saturated(res.images):.3f} teacher agrees {agree(res.images)}/{len(init)} "
              f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
