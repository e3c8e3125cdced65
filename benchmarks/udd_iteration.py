"""UDD per-step wall time: per-class loop vs vectorized matching (and the CPU budgets).

One *training step* of :func:`dd_assets.methods.udd.distill.udd_distill` = one matching step of every
class (region search, Eq. 9 gradient matching, CFC) + one pixel update.  It is timed as an
outer iteration with ``inner_steps=1`` (a fresh ConvNet-3, width 128, instance norm; the CFC
centre initialization; the matching step; no network step), read from the loop's own
``loss_curve[...]["seconds"]`` (the final mUE is not counted).  Real images are random uint8
pixels held in memory.

``--compare`` (default) alternates ``vectorized=False`` (the per-class reference loop) and
``vectorized=True`` (all classes in one forward, :mod:`dd_assets.methods.udd.class_gradients`) in
one process, ``--repeats`` times each, and prints the medians and their ratio; both must give
the same images up to float rounding (the largest difference is printed).  Only torch, numpy
and dd_assets.methods / dd_assets.models are imported (no Dagster), so the same command runs
on a GPU machine with ``--device cuda``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/udd_iteration.py                 # CIFAR-10 IPC 1 and 10
    .venv/bin/python benchmarks/udd_iteration.py --device cuda --threads 16 --repeats 10
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/udd_iteration.py --no-compare --variants udd_dc udd --inner 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np
import torch

from dd_assets.methods.udd.config import UDDConfig
from dd_assets.methods.udd.distill import udd_distill

VARIANTS = {  # the cifar10 profile's ablation rows
    "udd_dc": {"policy": "none", "cfc": False},
    "udd_response": {"policy": "response", "cfc": False},
    "udd_jitter": {"policy": "jitter", "cfc": False},
    "udd": {"policy": "jitter", "cfc": True},
}


def _value(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--variants", nargs="+", default=["udd"], choices=list(VARIANTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (after one warm-up on cuda)")
    ap.add_argument("--inner", type=int, default=1, help="inner_steps per timed outer iteration")
    ap.add_argument("--no-compare", dest="compare", action="store_false",
                    help="time only the default path (vectorized=None: loop on CPU, batched on CUDA)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="other UDDConfig fields, e.g. batch_real=16 top_p=4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    real = {c: rng.integers(0, 256, (256, 3, args.size, args.size), dtype=np.uint8) for c in range(args.classes)}
    extra = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s), "
          f"{args.classes} classes, {args.size} px, ConvNet-3 width 128 (instance norm), {extra or 'App. A defaults'}")
    sides: list[bool | None] = [False, True] if args.compare else [None]
    for ipc in args.ipcs:
        init = np.concatenate([real[c][:ipc] for c in range(args.classes)])
        labels = np.repeat(np.arange(args.classes), ipc)
        for name in args.variants:
            cfg = dataclasses.replace(UDDConfig(iterations=1, inner_steps=args.inner), **VARIANTS[name], **extra)
            n_syn = ipc * (1 + cfg.top_p) if cfg.policy != "none" else ipc
            times: dict[bool | None, list[float]] = {s: [] for s in sides}
            images: dict[bool | None, torch.Tensor] = {}
            rounds = args.repeats + (1 if args.device.startswith("cuda") else 0)
            for r in range(rounds):
                for vec in sides:
                    res = udd_distill(real, init, labels, cfg, args.device, vectorized=vec)
                    if r >= rounds - args.repeats:
                        times[vec].append(res.loss_curve[0]["seconds"] / args.inner)
                    images[vec] = res.images
            med = {s: statistics.median(v) for s, v in times.items()}
            line = (f"{name:12s} IPC {ipc:3d} ({min(n_syn, cfg.batch_syn_max or n_syn)} syn + {cfg.batch_real} real "
                    f"per class): ")
            if args.compare:
                diff = float((images[True] - images[False]).abs().max())
                line += (f"loop median {med[False]:8.3f} s/step {sorted(round(t, 3) for t in times[False])}, "
                         f"vectorized median {med[True]:8.3f} s/step {sorted(round(t, 3) for t in times[True])}, "
                         f"ratio loop/vectorized {med[False] / med[True]:5.2f}x, max |image diff| {diff:.2e}")
            else:
                line += f"default path median {med[None]:8.3f} s per training step {sorted(round(t, 3) for t in times[None])}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
