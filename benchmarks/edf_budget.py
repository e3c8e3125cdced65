"""CPU cost of EDF's two expensive parts, to size the budgets of a params.yaml profile.

1. **One expert epoch** (``experts`` block: ConvNet-3 instance norm, batch 256, DSA, SGD) on
   the train split of a profile's manifest: ``--batches`` batches are decoded (streamed from
   the manifest exactly as the ``expert_trajectories`` asset does) and trained on; the time
   per batch is extrapolated to the whole split.
2. **One distillation iteration** of EDF (CPD + DAE with a Grad-CAM refresh every iteration;
   App. B Table 8 ``syn_steps`` / ``batch_syn`` for each IPC unless ``--syn-steps`` /
   ``--batch-syn`` override them) at the profile's resolution, on 10 classes, with a
   batch-norm ConvNet-3 as the Grad-CAM model (the teacher); the first iteration is a warm-up.

Run on one thread (the budgets in params.yaml assume one core per job)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edf_budget.py --profile cifar10

Only speed is measured; the trajectories are random (the cost does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from dd_assets.config import load_params
from dd_assets.data.loading import iter_batches
from dd_assets.defs.io import read_manifest_pl
from dd_assets.defs.partitions import build_partitions
from dd_assets.core.dsa import DSAConfig, diff_augment
from dd_assets.core.imaging import to_model_input
from dd_assets.methods.edf.config import edf_config
from dd_assets.methods.edf.distill import edf_distill
from dd_assets.methods.edf.experts import ExpertTrajectories
from dd_assets.methods.edf.student import flatten_params
from dd_assets.models import create_model
from dd_assets.storage import DataRoot


def expert_epoch(params, batches: int) -> None:
    data, ex = params.block("data"), params.block("experts")
    parts = build_partitions(params)
    train = read_manifest_pl(DataRoot(params.data_root), parts, ("train",))
    size, bs = int(data["image_size"]), int(ex["batch_size"])
    per_epoch = -(-len(train) // bs)
    torch.manual_seed(0)
    model = create_model(ex["arch"], len(parts.classes), image_size=size, **ex["arch_kwargs"])
    opt = torch.optim.SGD(model.parameters(), lr=float(ex["lr"]))
    gen = torch.Generator().manual_seed(0)
    decode, step = [], []
    it = iter(iter_batches(train, data, bs, shuffle_seed=0))
    for _ in range(batches):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        xin = diff_augment(to_model_input(x, data["mean"], data["std"], "cpu"), DSAConfig(), gen)
        loss = F.cross_entropy(model(xin), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decode.append(t1 - t0)
        step.append(time.perf_counter() - t1)
    d, s = statistics.median(decode[1:]), statistics.median(step[1:])
    print(f"expert epoch: {len(train)} train images, {per_epoch} batches of {bs} at {size} px "
          f"({batches} measured): decode {d:.3f} s + train {s:.3f} s per batch "
          f"-> {per_epoch * (d + s):.0f} s per epoch ({per_epoch * s:.0f} s training, {per_epoch * d:.0f} s decoding)")


def distill_iteration(params, ipc: int, iterations: int, **overrides) -> None:
    data, ex = params.block("data"), params.block("experts")
    size, classes = int(data["image_size"]), 10
    torch.manual_seed(0)
    net = create_model(ex["arch"], classes, image_size=size, **ex["arch_kwargs"])
    flat, names, shapes = flatten_params(net)
    epochs = 4
    traj = ExpertTrajectories(
        params=(flat.numpy()[None, None] + 0.01 * np.random.default_rng(0).standard_normal((1, epochs + 1, flat.numel()))).astype(np.float32),
        names=names, shapes=shapes, arch=ex["arch"], arch_kwargs=dict(ex["arch_kwargs"]), num_classes=classes,
        in_channels=3, image_size=size, expert_lr=0.01, seeds=[0])
    cam = create_model("convnet_d3", classes, image_size=size, norm="batch").eval()
    labels = np.repeat(np.arange(classes), ipc)
    images = np.random.default_rng(1).integers(0, 256, (len(labels), 3, size, size), dtype=np.uint8)
    cfg = edf_config(ipc, iterations=iterations, max_start_epoch=2, initial_max_start_epoch=1, expert_epochs=2,
                     cam_every=1, max_loss=None, **{k: v for k, v in overrides.items() if v is not None})
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(_t: int, _m: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    names_ = [str(c) for c in range(classes)]
    edf_distill(images, labels, traj, cam, cfg, data["mean"], data["std"], "cpu", names_, names_, on_step)
    m = statistics.median(times[1:])
    print(f"distillation IPC {ipc}: {len(labels)} images at {size} px, syn_steps {cfg.match.syn_steps}, "
          f"batch_syn {min(cfg.match.batch_syn, len(labels))}, CPD alpha {cfg.alpha}, DAE: "
          f"median {m:.2f} s per iteration ({len(times) - 1} measured) -> {600 / m:.0f} iterations in 10 min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cifar10")
    ap.add_argument("--batches", type=int, default=12, help="expert batches to time")
    ap.add_argument("--iterations", type=int, default=4, help="distillation iterations to time per IPC")
    ap.add_argument("--ipcs", type=int, nargs="*", default=[1, 10])
    ap.add_argument("--skip-experts", action="store_true")
    ap.add_argument("--syn-steps", type=int, help="override Table 8's syn_steps (N)")
    ap.add_argument("--batch-syn", type=int, help="override Table 8's batch_syn")
    args = ap.parse_args()
    params = load_params(profile=args.profile)
    print(f"profile {args.profile}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if not args.skip_experts:
        expert_epoch(params, args.batches)
    for ipc in args.ipcs:
        distill_iteration(params, ipc, args.iterations, syn_steps=args.syn_steps, batch_syn=args.batch_syn)


if __name__ == "__main__":
    main()
