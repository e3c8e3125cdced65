"""How class-aware is the stored ``diffusion_model``?  A diagnostic for DDPS results.

DDPS ranks real images by R(x|c) = E[L_t(x, eps, c) - L_t(x, eps, phi)] (Eq. 6); that ranking
is only informative if the class condition changes the noise prediction.  This script reads
the diffusion model of a profile's data root and, on ``--per-class`` validation images per
class (never test), computes R(x|c) for every class c with the same (t, eps) draws for all c
(Eq. 4's diffusion classifier: predicted class = argmin_c R(x|c), since the null term is
shared).  It prints:

* the diffusion classifier's top-1 accuracy (chance = 1 / classes),
* the share of images whose own class has R < 0 (the class prompt helps denoising),
* mean R of the own class vs. the mean over the other classes.

Usage (one thread, the cifar10 profile's data root)::

    DD_ASSETS_PROFILE=cifar10 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ddps_diffusion_classifier.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=20, help="validation images per class")
    ap.add_argument("--draws", type=int, default=5, help="(t, eps) draws per image (shared by all classes)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from dd_assets.config import load_params
    from dd_assets.data.loading import load_rows
    from dd_assets.defs.methods.ddps_diffusion import load_predictor
    from dd_assets.defs.io import read_class_manifest_pl
    from dd_assets.defs.partitions import build_partitions
    from dd_assets.methods.ddps.representativeness import representativeness_maps
    from dd_assets.methods.ddps.windows import prepare_images
    from dd_assets.storage import DataRoot

    p = load_params()
    parts = build_partitions(p)
    root = DataRoot(p.data_root)
    predictor = load_predictor(root, p, parts, torch.device("cpu"))
    t_range = tuple(p.block("methods").get("ddps", {}).get("t_range", (0.1, 0.7)))
    k = len(parts.classes)
    rs, ys = [], []
    t0 = time.perf_counter()
    for y in range(k):
        rows = read_class_manifest_pl(root, y, ("val",)).sort("source_id", maintain_order=True).head(args.per_class)
        x, _ = prepare_images(torch.from_numpy(load_rows(rows, p.block("data"))), None)
        per_c = []
        for c in range(k):  # same generator state for every c: identical (t, eps) draws
            gen = torch.Generator().manual_seed(args.seed * 1000 + y)
            d = representativeness_maps(predictor, x, c, args.draws, t_range, gen, batch_size=32)
            per_c.append(d.flatten(1).mean(1).numpy())
        rs.append(np.stack(per_c, 1))
        ys.append(np.full(len(x), y))
    r, y = np.concatenate(rs), np.concatenate(ys)
    own = r[np.arange(len(y)), y]
    others = (r.sum(1) - own) / (k - 1)
    acc = float((r.argmin(1) == y).mean())
    print(f"profile {p.profile}: {len(y)} val images, {args.draws} draws, t in {t_range}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"diffusion classifier top-1 (argmin_c R): {acc:.3f} (chance {1 / k:.3f})")
    print(f"own class R < 0: {float((own < 0).mean()):.3f}")
    print(f"mean R own class {own.mean():.5f} vs other classes {others.mean():.5f}")


if __name__ == "__main__":
    main()
