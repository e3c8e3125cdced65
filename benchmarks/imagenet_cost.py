"""ImageNet-1K, costed: what each per-image asset costs per class at 224 px (issue 20, item 5).

A real architecture from the project's factory (``create_model("resnet18", 1000, image_size=224)``:
timm ResNet-18, random weights, ``pretrained=False``, nothing downloaded) and the functions the
assets call, on synthetic 224-px inputs decoded from JPEG files written here under /tmp:

1. **Time per input** (one process; every side once per repeat, alternating; medians of
   ``--repeats``), each next to the bare batched forward pass of the same model:

   * ``decode``: ``data.loading.load_rows`` (PIL JPEG decode + resize to 224, what every
     per-class asset reads through; ``iter_batches`` decodes the same way);
   * ``features``: ``teacher_features``' body (``to_model_input`` + ``models.factory.penultimate``);
   * ``cams``: ``cam_maps``' body (``methods.nrr.cams.raw_image_cams`` + ``upsample_cams`` to 224 +
     the critical share);
   * ``rded``: ``methods.rded.crops.score_class`` (K = ``--num-crop`` random-resized crops per image,
     factor 2 at 224 px: tiles resized to 112 and zero-padded back to 224, one forward per crop);
   * ``fkd`` / ``dbr``: ``core.soft_labels.teacher_soft_labels`` (top-``--topk``) and
     ``core.dbr.teacher_dbr_labels`` on a small synthetic distilled set (per view: render + forward);
     ``render``: ``render_views`` alone, the part of a label view that stays on the CPU when the
     teacher runs on a GPU (the writers render on the images' device, the CPU in the asset).

2. **Label bytes** from the arrays those writers return (``soft_labels.label_array_bytes``: FKD
   top-k values + indices, DBR d_org + d_aug; the view parameters, stored alike by every label
   mode, are counted apart), per image per view, extrapolated to 1,000 classes at each ``--ipcs``
   with ``--views`` views per image.  Storage of the per-image assets: raw bytes per image of the
   arrays the assets write (features, CAMs), and the Parquet RDED scores table of one
   ``--mipc`` pool written with ``storage.tables.write_table``; Zarr groups are also written with
   ``storage.arrays.write_group`` to show the on-disk size.

3. **Peak memory vs number of images**: for each ``--memory-sizes`` N a fresh subprocess builds the
   model, runs one warm-up batch, then streams N JPEG files through ``iter_batches`` and the
   features pass (``stream``); the peak RSS (``VmHWM``) must not grow with N.  ``whole`` (on by
   default; ``--memory-modes stream`` leaves it out) is the contrast: ``load_rows`` of all N first (what
   ``rded_scores`` does with its bounded mipc pool), then the same features pass, which grows by
   3 x 224 x 224 bytes per image (at the largest size only, ``--whole-sizes``).  The children run
   with glibc's ``MALLOC_MMAP_THRESHOLD_=131072`` (``--malloc-mmap-threshold``): with the default
   dynamic threshold freed batches stay in the heap and the peak wanders by tens of MiB between
   runs of the same size, hiding a slope of 0.15 MB per image.

Run on one thread (the per-core numbers docs/scale.md extrapolates from)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/imagenet_cost.py [--repeats 3] [--json out.json]

Defaults take about 4-5 min on one core of a loaded machine.  Only speed, memory and bytes are
measured: the weights are random and the images synthetic, which changes no cost here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dd_assets.core.dbr import teacher_dbr_labels
from dd_assets.core.imaging import to_model_input
from dd_assets.core.soft_labels import label_array_bytes, render_views, sample_views, teacher_soft_labels
from dd_assets.data.loading import iter_batches, load_rows
from dd_assets.evaluation.protocol import resolve_crop_scale
from dd_assets.methods.nrr.cams import raw_image_cams, upsample_cams
from dd_assets.methods.rded.crops import class_generator, default_factor, sample_crop_boxes, score_class
from dd_assets.models import create_model, penultimate

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]   # ImageNet
CLASS_DIR = "train/n00000000"


# ---------------------------------------------------------------------------- inputs


def write_jpegs(root: Path, n: int, width: int, height: int, quality: int, seed: int = 0) -> float:
    """``n`` synthetic JPEGs (smooth colour field + texture noise, ImageNet-like file sizes) in
    ``root/CLASS_DIR``; returns their mean size in bytes."""
    from PIL import Image

    d = root / CLASS_DIR
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    sizes = []
    for i in range(n):
        f = rng.uniform(0.005, 0.05, (3, 2))
        ph = rng.uniform(0, 2 * np.pi, (3, 2))
        field = np.stack([np.sin(xx * f[c, 0] + ph[c, 0]) + np.cos(yy * f[c, 1] + ph[c, 1]) for c in range(3)], -1)
        img = 127.5 + 50.0 * field + rng.normal(0.0, 18.0, (height, width, 3))
        path = d / f"{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=quality)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes))


def manifest_rows(n: int) -> pd.DataFrame:
    """Manifest-like rows of the synthetic class (the columns the loaders read)."""
    return pd.DataFrame({"path": [f"{CLASS_DIR}/{i:05d}.jpg" for i in range(n)],
                         "class_index": np.zeros(n, np.int64), "source_id": np.arange(n, dtype=np.int64)})


def data_block(root: Path, size: int) -> dict:
    return {"root": str(root), "image_size": size, "mean": MEAN, "std": STD}


def build_model(arch: str, num_classes: int, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(arch, num_classes, image_size=size, pretrained=False).eval()


# ---------------------------------------------------------------------------- memory child


def vm_kb(field: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in kB (Linux), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory_child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process: print one JSON line."""
    mode, n = args.child
    n = int(n)
    root = Path(args.root)
    data = data_block(root, args.size)
    model = build_model(args.arch, args.num_classes, args.size)
    with torch.no_grad():   # warm-up: one batch of the same shape (allocator, kernels)
        penultimate(model, torch.randn(args.batch, 3, args.size, args.size))
    base_hwm, base_rss = vm_kb("VmHWM"), vm_kb("VmRSS")
    rows = manifest_rows(n)
    feats = []
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "stream":   # teacher_features' loop (dd.batches = iter_batches at the inference batch)
            for x, _y in iter_batches(rows, data, args.batch):
                feats.append(penultimate(model, to_model_input(x, MEAN, STD)).float().numpy())
        else:                  # whole: the class's images in memory first (load_rows), then batches
            imgs = load_rows(rows, data)
            for s in range(0, n, args.batch):
                feats.append(penultimate(model, to_model_input(imgs[s:s + args.batch], MEAN, STD)).float().numpy())
    f = np.concatenate(feats)
    print(json.dumps({"mode": mode, "n": n, "seconds": time.perf_counter() - t0, "features": list(f.shape),
                      "base_hwm_kb": base_hwm, "base_rss_kb": base_rss, "hwm_kb": vm_kb("VmHWM"),
                      "ru_maxrss_kb": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}))


def measure_memory(args: argparse.Namespace, root: Path) -> list[dict]:
    out = []
    whole = args.whole_sizes if args.whole_sizes is not None else [max(args.memory_sizes)]
    env = dict(os.environ)
    if args.malloc_mmap_threshold > 0:   # fixed threshold: freed large blocks go back to the OS at once
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    for mode in args.memory_modes:
        for n in (args.memory_sizes if mode == "stream" else whole):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(n), "--root", str(root),
                   "--batch", str(args.batch), "--size", str(args.size), "--arch", args.arch,
                   "--num-classes", str(args.num_classes)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if res.returncode != 0:
                raise RuntimeError(f"memory child {mode} {n} failed:\n{res.stderr[-2000:]}")
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            out.append(rec)
            growth = (rec["hwm_kb"] - rec["base_hwm_kb"]) / 1024
            print(f"  {mode:6s} N={n:4d}  peak RSS {rec['hwm_kb'] / 1024:7.1f} MiB  (after warm-up "
                  f"{rec['base_hwm_kb'] / 1024:7.1f} MiB, growth {growth:6.1f} MiB)  {rec['seconds']:.1f} s",
                  flush=True)
    return out


# ---------------------------------------------------------------------------- timing


def batched(fn, x, batch: int) -> None:
    for s in range(0, x.shape[0], batch):
        fn(x[s:s + batch])


def timing(args: argparse.Namespace, model: torch.nn.Module, root: Path) -> tuple[dict, dict]:
    data = data_block(root, args.size)
    n, r = args.images, args.rded_images
    rows = manifest_rows(max(n, r))
    imgs = torch.from_numpy(load_rows(rows.iloc[:n], data))
    pool = torch.from_numpy(load_rows(rows.iloc[:r], data))
    labels = np.zeros(n, np.int64)
    x_norm = to_model_input(imgs, MEAN, STD)
    factor = default_factor(args.size)
    # a small synthetic "distilled set": IPC args.label_images of one class, args.label_views views each
    distilled = imgs[: args.label_images]
    d_labels = np.arange(args.label_images, dtype=np.int64) % args.num_classes
    views = sample_views(len(distilled), args.label_views, args.size, seed=0,
                         scale=resolve_crop_scale("auto", args.size), cutmix_alpha=1.0)
    out: dict = {"model": model, "distilled": distilled}

    def bare():
        with torch.no_grad():
            batched(model, x_norm, args.batch)

    def decode():
        load_rows(rows.iloc[:n], data)

    def features():
        with torch.no_grad():
            f = [penultimate(model, to_model_input(imgs[s:s + args.batch], MEAN, STD)).float().numpy()
                 for s in range(0, n, args.batch)]
        out["features"] = np.concatenate(f).astype(np.float32)

    def cams():
        raws, shares = [], []
        for s in range(0, n, args.batch):
            raw = raw_image_cams(model, imgs[s:s + args.batch], labels[s:s + args.batch], args.size, MEAN, STD,
                                 args.batch)
            cam = upsample_cams(raw, (args.size, args.size))
            shares.append((cam >= 0.5).float().mean(dim=(1, 2)).numpy())
            raws.append(raw.numpy())
        out["cams"] = np.concatenate(raws).astype(np.float32)

    def rded():
        out["rded"] = score_class(model, pool, np.zeros(r, np.int64), np.arange(r, dtype=np.int64),
                                  num_crop=args.num_crop, out_size=args.size, factor=factor, mean=MEAN, std=STD,
                                  seed=0, class_index=0, batch_size=args.batch)

    def render():   # the CPU-side part of both label writers: every view rendered (crop, flip, CutMix)
        for e in range(views.epochs):
            render_views(distilled, views, e, np.arange(len(distilled)), MEAN, STD)

    def fkd():
        out["fkd"] = teacher_soft_labels(model, distilled, views, args.topk, MEAN, STD, batch_size=args.batch)

    def dbr():
        out["dbr"] = teacher_dbr_labels(model, distilled, d_labels, views, MEAN, STD, batch_size=args.batch)

    # side -> (function, inputs per call, unit)
    sides = {
        "bare forward": (bare, n, "image"),
        "decode (load_rows)": (decode, n, "image"),
        "features (penultimate)": (features, n, "image"),
        "cams (raw + upsample)": (cams, n, "image"),
        "rded (score_class)": (rded, r * args.num_crop, "crop"),
        "render views (no forward)": (render, len(distilled) * args.label_views, "view"),
        f"fkd labels (top-{args.topk})": (fkd, len(distilled) * args.label_views, "view"),
        "dbr labels": (dbr, len(distilled) * args.label_views, "view"),
    }
    with torch.no_grad():   # warm-up: kernels and allocator at the batch shapes
        model(x_norm[: args.batch])
    times: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(args.repeats):
        for name, (fn, _k, _u) in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k.split()[0]} {v[-1]:.1f} s"
                                                                 for k, v in times.items()), flush=True)
    res = {}
    for name, (_fn, k, unit) in sides.items():
        med = statistics.median(times[name])
        res[name] = {"per_call_s": times[name], "median_s": med, "inputs": k, "unit": unit,
                     "per_s": k / med, "s_per_input": med / k}
    return res, out


# ---------------------------------------------------------------------------- storage


def storage(args: argparse.Namespace, arrays: dict, tmp: Path) -> dict:
    """Bytes per image (raw arrays) of what the assets store, and of the labels per view."""
    from dd_assets.storage.arrays import write_group
    from dd_assets.storage.root import DataRoot
    from dd_assets.storage.tables import write_table

    root = DataRoot(str(tmp / "store"))
    st: dict = {}

    def on_disk(rel: str, chunks_only: bool = False) -> int:
        """Bytes under ``rel``; ``chunks_only``: without the Zarr metadata files (a fixed ~1-2 KB per group)."""
        p = Path(root.path(rel))
        if not p.is_dir():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*")
                   if f.is_file() and not (chunks_only and f.name == "zarr.json"))

    n = arrays["features"].shape[0]
    ids = np.arange(n, dtype=np.int64)
    for key, arr in (("features", arrays["features"]), ("cams", arrays["cams"])):
        write_group(root, f"{key}.zarr", {"source_id": ids, key[:-1] if key == "cams" else key: arr})
        st[key] = {"shape_per_image": list(arr.shape[1:]), "dtype": str(arr.dtype),
                   "raw_bytes_per_image": (arr.nbytes + ids.nbytes) / n,
                   "zarr_chunk_bytes_per_image": on_disk(f"{key}.zarr", True) / n,
                   "zarr_metadata_bytes": on_disk(f"{key}.zarr") - on_disk(f"{key}.zarr", True), "images_written": n}
    # RDED scores table of one mipc pool: real boxes (the class generator, as score_class draws them);
    # scores resampled from the crops scored above (only their bytes matter here)
    m = args.mipc
    g = class_generator(0, 0)
    boxes = np.stack([sample_crop_boxes(args.size, args.size, args.num_crop, g)[0] for _ in range(m)])
    rng = np.random.default_rng(0)
    scores = rng.choice(arrays["rded"].score, m, replace=True).astype(np.float32)
    df = pd.DataFrame({"source_id": np.arange(m, dtype=np.int64) * 997, "class_index": 0,
                       "x0": boxes[:, 0], "y0": boxes[:, 1], "x1": boxes[:, 2], "y1": boxes[:, 3], "score": scores})
    write_table(root, "rded_scores.parquet", df, metadata={"code_version": "x" * 16})
    st["rded_scores"] = {"rows": m, "parquet_bytes_per_class": on_disk("rded_scores.parquet")}
    # labels: per image per view, from the writers' arrays
    fkd, dbr = arrays["fkd"].to_arrays(), arrays["dbr"].to_arrays()
    nv = arrays["fkd"].views.num_images * arrays["fkd"].views.epochs
    st["labels"] = {
        "views_measured": nv,
        "fkd_topk": args.topk,
        "fkd_bytes_per_view": label_array_bytes(fkd) / nv,
        "dbr_bytes_per_view": label_array_bytes(dbr) / nv,
        "view_param_bytes_per_view": arrays["fkd"].views.nbytes() / nv,
    }
    if args.full_topk:   # all classes kept (FKD with k = C), one untimed call
        full = teacher_soft_labels(arrays["model"], arrays["distilled"], arrays["fkd"].views, args.num_classes,
                                   MEAN, STD, batch_size=args.batch)
        st["labels"]["fkd_full_bytes_per_view"] = label_array_bytes(full.to_arrays()) / nv
    for key, store in (("fkd", fkd), ("dbr", dbr)):
        write_group(root, f"labels_{key}.zarr", store)
        st["labels"][f"{key}_zarr_chunk_bytes_per_view"] = on_disk(f"labels_{key}.zarr", True) / nv
    return st


# ---------------------------------------------------------------------------- report


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:,.1f} {unit}" if unit != "B" else f"{b:,.0f} B"
        b /= 1000.0
    return f"{b:.1f}"


def report(args: argparse.Namespace, t: dict, st: dict, mem: list[dict], jpeg_bytes: float) -> None:
    bare = t["bare forward"]["s_per_input"]
    print(f"\n== time per input: medians of {args.repeats} (torch threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.size} px, {args.arch}, {args.num_classes} classes)")
    print(f"{'side':28s} {'inputs':>7s} {'median s':>9s} {'inputs/s':>9s} {'ms/input':>9s} {'x bare':>7s}  runs (s)")
    for name, r in t.items():
        runs = ", ".join(f"{v:.2f}" for v in r["per_call_s"])
        print(f"{name:28s} {r['inputs']:7d} {r['median_s']:9.2f} {r['per_s']:9.2f} "
              f"{1000 * r['s_per_input']:9.1f} {r['s_per_input'] / bare:7.2f}  {runs}  [{r['unit']}]")
    per = {k: v["s_per_input"] for k, v in t.items()}
    imgs, pool, k = args.train_per_class, args.mipc, args.num_crop
    print(f"\n== seconds per class on this CPU ({imgs} train images, RDED pool {pool} x {k} crops; "
          f"synthetic JPEGs {jpeg_bytes / 1000:.0f} KB, {args.jpeg_size[0]}x{args.jpeg_size[1]})")
    rows = [("decode, all train images", imgs * per["decode (load_rows)"]),
            ("decode, RDED pool", pool * per["decode (load_rows)"]),
            ("teacher_features", imgs * per["features (penultimate)"]),
            ("cam_maps", imgs * per["cams (raw + upsample)"]),
            ("rded_scores", pool * k * per["rded (score_class)"])]
    for name, s in rows:
        print(f"  {name:28s} {s:9.1f} s  ({s * args.classes / 3600:8.1f} core-h for {args.classes} classes)")
    for ipc in args.ipcs:
        for lab in (f"fkd labels (top-{args.topk})", "dbr labels"):
            s = ipc * args.views * per[lab]
            print(f"  {lab.split(' (')[0] + f' IPC {ipc}, {args.views} views':28s} {s:9.1f} s  "
                  f"({s * args.classes / 3600:8.1f} core-h for {args.classes} classes)")

    print("\n== storage")
    for key in ("features", "cams"):
        s = st[key]
        print(f"  {key:9s} {s['shape_per_image']} {s['dtype']}: {s['raw_bytes_per_image']:,.0f} B/image raw "
              f"(with source_id), Zarr chunks {s['zarr_chunk_bytes_per_image']:,.0f} B/image on disk "
              f"(+ {s['zarr_metadata_bytes']:,} B metadata per group; {s['images_written']} images written); "
              f"{args.classes} classes x {imgs}: "
              f"{fmt_bytes(s['raw_bytes_per_image'] * imgs * args.classes)} raw")
    s = st["rded_scores"]
    print(f"  rded_scores: {s['parquet_bytes_per_class']:,} B Parquet per class ({s['rows']} rows); "
          f"{args.classes} classes: {fmt_bytes(s['parquet_bytes_per_class'] * args.classes)}")
    lab = st["labels"]
    print(f"  labels per image per view (measured on {lab['views_measured']} views): FKD top-{lab['fkd_topk']} "
          f"{lab['fkd_bytes_per_view']:.0f} B, DBR {lab['dbr_bytes_per_view']:.0f} B "
          f"(ratio {lab['fkd_bytes_per_view'] / lab['dbr_bytes_per_view']:.1f}x)"
          + (f", FKD all {args.num_classes} classes {lab['fkd_full_bytes_per_view']:.0f} B"
             if "fkd_full_bytes_per_view" in lab else "")
          + f"; view parameters {lab['view_param_bytes_per_view']:.0f} B (every mode); Zarr chunks on disk "
          f"(labels + views) FKD {lab['fkd_zarr_chunk_bytes_per_view']:.0f} B, "
          f"DBR {lab['dbr_zarr_chunk_bytes_per_view']:.0f} B")
    for ipc in args.ipcs:
        views = args.classes * ipc * args.views
        parts = [f"FKD top-{lab['fkd_topk']} {fmt_bytes(lab['fkd_bytes_per_view'] * views)}",
                 f"DBR {fmt_bytes(lab['dbr_bytes_per_view'] * views)}"]
        if "fkd_full_bytes_per_view" in lab:
            parts.append(f"FKD all classes {fmt_bytes(lab['fkd_full_bytes_per_view'] * views)}")
        parts.append(f"view params {fmt_bytes(lab['view_param_bytes_per_view'] * views)}")
        print(f"  IPC {ipc:3d} x {args.classes} classes x {args.views} views: " + ", ".join(parts))
    if mem:
        print("\n== peak RSS vs images (fresh process per row)")
        for m in mem:
            growth = (m["hwm_kb"] - m["base_hwm_kb"]) / 1024
            print(f"  {m['mode']:6s} N={m['n']:4d}: VmHWM {m['hwm_kb'] / 1024:7.1f} MiB "
                  f"(after warm-up {m['base_hwm_kb'] / 1024:.1f}, growth {growth:.1f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", help="create_model name (timm names work; pretrained=False)")
    ap.add_argument("--num-classes", type=int, default=1000, help="classifier width (ImageNet-1K)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32, help="inference batch (dd.inference_batch_size)")
    ap.add_argument("--images", type=int, default=16, help="images per timed features / CAM / decode call")
    ap.add_argument("--rded-images", type=int, default=8, help="pool images per timed score_class call")
    ap.add_argument("--num-crop", type=int, default=5, help="RDED's K")
    ap.add_argument("--label-images", type=int, default=8, help="synthetic distilled images labelled per call")
    ap.add_argument("--label-views", type=int, default=2, help="views per image labelled per call")
    ap.add_argument("--topk", type=int, default=10, help="FKD top-k (params.yaml labels.topk)")
    ap.add_argument("--no-full-topk", dest="full_topk", action="store_false",
                    help="skip the untimed FKD call that keeps all classes (bytes only)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-sizes", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--memory-modes", nargs="*", default=["stream", "whole"], choices=["stream", "whole"])
    ap.add_argument("--whole-sizes", type=int, nargs="*", default=None,
                    help="sizes for the whole contrast (default: the largest --memory-sizes)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                    help="MALLOC_MMAP_THRESHOLD_ of the memory children (0: glibc's dynamic default, which "
                         "keeps freed blocks and adds tens of MiB of noise to the peak)")
    ap.add_argument("--jpeg-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"),
                    help="synthetic source JPEG size (ImageNet's typical 500x375)")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    # extrapolation
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--train-per-class", type=int, default=1281, help="ImageNet-1K: 1,281,167 / 1,000")
    ap.add_argument("--mipc", type=int, default=300, help="RDED pool per class")
    ap.add_argument("--ipcs", type=int, nargs="*", default=[10, 50])
    ap.add_argument("--views", type=int, default=300, help="stored views per image (student epochs)")
    ap.add_argument("--json", help="also write every number here")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child(args)
        return

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="dd_imagenet_cost_"))
    try:
        n_files = max([args.images, args.rded_images, *args.memory_sizes, *(args.whole_sizes or [])])
        jpeg_bytes = write_jpegs(tmp, n_files, *args.jpeg_size, args.jpeg_quality)
        print(f"{n_files} synthetic JPEGs ({args.jpeg_size[0]}x{args.jpeg_size[1]}, mean {jpeg_bytes / 1000:.0f} KB) "
              f"in {tmp}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average {os.getloadavg()[0]:.2f}", flush=True)
        model = build_model(args.arch, args.num_classes, args.size)
        print(f"model {args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
        print(f"timing ... ({time.perf_counter() - t_start:.0f} s)", flush=True)
        t, arrays = timing(args, model, tmp)
        print(f"storage ... ({time.perf_counter() - t_start:.0f} s)", flush=True)
        st = storage(args, arrays, tmp)
        mem = []
        if args.memory_sizes and args.memory_modes:
            print(f"memory (fresh process per size) ... ({time.perf_counter() - t_start:.0f} s)", flush=True)
            mem = measure_memory(args, tmp)
        report(args, t, st, mem, jpeg_bytes)
        wall = time.perf_counter() - t_start
        print(f"\nwall {wall:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "args": {k: v for k, v in vars(args).items() if k not in ("child", "root")},
                "torch": torch.__version__, "threads": torch.get_num_threads(), "jpeg_mean_bytes": jpeg_bytes,
                "timing": t, "storage": st, "memory": mem, "wall_s": wall,
                "date": time.strftime("%Y-%m-%d"), "loadavg": os.getloadavg()}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
