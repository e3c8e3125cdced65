"""Wall time of one UDD outer iteration on the CPU (the basis of the profiles' UDD budgets).

One outer iteration of :func:`dd_assets.methods.udd.udd_distill` = a fresh ConvNet-3
(width 128, instance norm) + ``inner_steps`` matching steps over every class + ``inner_steps - 1``
network steps on a real mini-batch.  Real images are random uint8 pixels held in memory (the
graph streams them from disk; decoding a 64-image batch of 32-px JPEGs adds a few ms).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/udd_iteration.py [--size 32] [--inner 2]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/udd_iteration.py --size 28 --variants udd --set top_p=2

Prints one line per (variant, IPC): seconds per outer iteration and per matching step.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import yaml

from dd_assets.methods.udd import UDDConfig, udd_distill

VARIANTS = {  # the cifar10 profile's ablation rows
    "udd_dc": {"policy": "none", "cfc": False},
    "udd_response": {"policy": "response", "cfc": False},
    "udd_jitter": {"policy": "jitter", "cfc": False},
    "udd": {"policy": "jitter", "cfc": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--inner", type=int, default=2, help="inner_steps of the timed outer iteration")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=1, help="outer iterations (seconds are per iteration)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="other UDDConfig fields, e.g. batch_real=16 top_p=4 (YAML values)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    real = {c: rng.integers(0, 256, (256, 3, args.size, args.size), dtype=np.uint8) for c in range(args.classes)}
    for ipc in args.ipcs:
        init = np.concatenate([real[c][:ipc] for c in range(args.classes)])
        labels = np.repeat(np.arange(args.classes), ipc)
        for name in args.variants:
            extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
            cfg = dataclasses.replace(UDDConfig(iterations=args.iterations, inner_steps=args.inner),
                                      **VARIANTS[name], **extra)
            t0 = time.perf_counter()
            res = udd_distill(real, init, labels, cfg, "cpu")
            total = time.perf_counter() - t0
            it = float(np.mean([r["seconds"] for r in res.loss_curve]))
            print(f"{name:13s} IPC {ipc:3d}: {it:7.1f} s per outer iteration (inner_steps={args.inner}), "
                  f"{it / args.inner:6.2f} s per inner step ({it / args.inner / args.classes:5.2f} s per class step); "
                  f"call {total:.1f} s incl. final mUE", flush=True)


if __name__ == "__main__":
    main()
