"""RDED scoring throughput vs the bare batched forward pass of the same model.

Both sides see the same number of 32x32 inputs (images x num_crop) in batches of the same
size, in one process, alternating, repeated; medians and their ratio are printed
(``ratio = scoring throughput / bare forward throughput``; the target is >= 0.8).

    .venv/bin/python benchmarks/scoring_throughput.py [--images 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dd_assets.core.imaging import to_model_input
from dd_assets.methods.rded.crops import score_class
from dd_assets.models import create_model

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="pool size (RDED's mipc)")
    ap.add_argument("--num-crop", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = create_model("convnet_d3", 10, image_size=args.size).eval()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (args.images, 3, args.size, args.size), dtype=np.uint8))
    labels = np.zeros(args.images, np.int64)
    ids = np.arange(args.images, dtype=np.int64)
    n_inputs = args.images * args.num_crop
    bare_inputs = to_model_input(images.repeat(args.num_crop, 1, 1, 1), MEAN, STD)

    def bare() -> None:
        with torch.no_grad():
            for i in range(0, n_inputs, args.batch):
                model(bare_inputs[i : i + args.batch])

    def scoring() -> None:
        score_class(model, images, labels, ids, num_crop=args.num_crop, out_size=args.size, factor=1,
                    mean=MEAN, std=STD, seed=0, class_index=0, batch_size=args.batch)

    bare()
    scoring()  # warm-up
    t_bare, t_score = [], []
    for _ in range(args.repeats):
        for fn, out in ((bare, t_bare), (scoring, t_score)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    mb, ms = statistics.median(t_bare), statistics.median(t_score)
    print(f"inputs per pass: {n_inputs} ({args.images} images x {args.num_crop} crops), batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, repeats {args.repeats}")
    print(f"bare forward : median {mb:.3f} s  -> {n_inputs / mb:8.1f} inputs/s")
    print(f"RDED scoring : median {ms:.3f} s  -> {n_inputs / ms:8.1f} crops/s")
    print(f"throughput ratio (scoring / bare): {mb / ms:.3f}")


if __name__ == "__main__":
    main()
