"""Students one at a time vs in bulk (issue 19, item 1): students per minute, side by side.

CIFAR-10 shapes: ``K`` distilled sets of ``ipc x 10`` synthetic 32 px images (a set per row,
``--seeds`` students per set), stored soft labels from a random ConvNet-3 teacher (top-10, one
view per epoch), ConvNet-3 width 128 instance-norm students, batch 50, AdamW, evaluation on
100 validation images per epoch, evaluated at the last epoch (the ruler's 5,000 every 50 epochs).  Sides, alternating ``--repeats`` times:

* ``one``: ``train_student`` per student (the assets' loop, exact per-image rendering);
* ``bulk``: one ``train_students_bulk`` over all students (``--render`` exact or batched;
  ``--precision`` fp32 / bf16 on CUDA).

Prints the median seconds per side, students per minute extrapolated to a 300-epoch student
(``epochs`` are few: the loop's cost is per epoch), and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/student_bulk.py                  # CPU, 1 set x 3 seeds
    python benchmarks/student_bulk.py --device cuda --sets 6 --epochs 20 --render batched
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dd_assets.core.bulk_students import StudentJob, train_students_bulk  # noqa: E402
from dd_assets.core.soft_labels import sample_views, teacher_soft_labels  # noqa: E402
from dd_assets.core.student_training import train_student  # noqa: E402
from dd_assets.core.training import TrainConfig, evaluate  # noqa: E402
from dd_assets.models import create_model  # noqa: E402

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sets", type=int, default=1, help="distilled sets (table rows)")
    ap.add_argument("--seeds", type=int, default=3, help="students per set")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--render", choices=("exact", "batched"), default="exact")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    rng = np.random.default_rng(0)
    n = args.ipc * 10
    torch.manual_seed(123)
    teacher = create_model("convnet_d3", 10, in_channels=3, image_size=32, norm="batch").to(dev).eval()
    views = sample_views(n, args.epochs, 32, seed=0)
    sets = []
    for _ in range(args.sets):
        imgs = torch.from_numpy(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)).to(dev)
        sets.append((imgs, np.arange(n) % 10, teacher_soft_labels(teacher, imgs, views, 10, MEAN, STD, device=dev)))
    # validation amortised as in the CIFAR ruler (5,000 images every 50 epochs = 100 per epoch)
    nv = 100 * args.epochs
    vx = torch.from_numpy(rng.integers(0, 256, (nv, 3, 32, 32), dtype=np.uint8)).to(dev)
    vy = rng.integers(0, 10, nv)

    def val(m):
        return evaluate(m, [(vx[s:s + 1000], vy[s:s + 1000]) for s in range(0, nv, 1000)], MEAN, STD, dev)

    def jobs():
        out = []
        for imgs, labels, soft in sets:
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = create_model("convnet_d3", 10, in_channels=3, image_size=32, norm="instance").to(dev)
                cfg = TrainConfig(epochs=args.epochs, lr=1e-3, weight_decay=0.01, batch_size=50, optimizer="adamw",
                                  temperature=20.0, eval_every=args.epochs, seed=seed)
                out.append(StudentJob(model, imgs, labels, cfg, soft=soft))
        return out

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def one():
        for j in jobs():
            train_student(j.model, j.images, j.hard_labels, j.soft, j.cfg, MEAN, STD, val, dev)

    def bulk():
        train_students_bulk(jobs(), MEAN, STD, val, dev, precision=args.precision, render=args.render)

    k = args.sets * args.seeds
    bulk()   # warm-up (CUDA kernels, vmap tracing)
    one()
    times: dict[str, list[float]] = {"one": [], "bulk": []}
    for _ in range(args.repeats):
        for name, fn in (("one", one), ("bulk", bulk)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    print(f"student_bulk: device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
          f"threads {torch.get_num_threads()}, {args.sets} set(s) x {args.seeds} seeds = {k} students, IPC {args.ipc} "
          f"({n} images), {args.epochs} epochs, render {args.render}, precision {args.precision}")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        per_min = k / (med[name] / args.epochs * 300) * 60
        print(f"  {name:<5} median {med[name]:8.3f} s  runs {', '.join(f'{t:.3f}' for t in ts)}  "
              f"-> {per_min:7.2f} students/min at 300 epochs")
    print(f"  bulk speed-up (one / bulk): {med['one'] / med['bulk']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
