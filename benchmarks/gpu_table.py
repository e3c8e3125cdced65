"""The CIFAR-10 (JPEG) results table in one call on one GPU (issue 19, item 3).

One process, no Dagster / Zarr / DuckDB / MLflow: it reads the two shared tarballs, rebuilds the
pipeline's manifest split exactly (``dd_assets.data.manifest.assign_splits``: val = a seeded
``data.val_fraction`` per class of train, ``split_seed``), loads the shared teacher, and for every
selected ``methods`` entry of the profile at every IPC calls the same pure functions the assets
call -- RDED scoring (``methods.rded.crops.score_class`` / ``select_lowest``), teacher penultimate
features + ``methods.herding.select.herding`` / ``methods.kmeans.select.kmeans_select``,
``methods.random.select.select_random``; NRR-DD (``nrr`` and its variants): teacher CAMs
(``methods.nrr.cams.raw_image_cams``), CIDD scores (``methods.nrr.cidd.cidd_candidates``), the
plugin's ``select`` / ``tiles`` / ``refine`` (Sec. 3.3, Eq. 11-12 with ``label_refine``) and DBR
labels (``core.dbr.teacher_dbr_labels``); FocusDC (``focusdc`` and its variants): the ViT
scorer (``vit_scorer.weights``, the shared ``vit_tiny_patch4_cifar10.pt``), attention maps
(``methods.focusdc.attention.attention_maps``), the plugin's ``select`` / ``tiles``; EDF
(``edf``, ``mtt``, ``edf_cpd``, ``edf_dae``): the ``experts`` block's trajectories
(``methods.edf.experts.train_experts`` on the train split in the asset's seeded batch order, shared
by every EDF entry and IPC), Comp-DD complexity (``methods.edf.comp_dd.comp_dd_batch``), the
entry's config per IPC (``methods.edf.params.entry_config``) and ``methods.edf.distill.edf_distill``
from the random baseline's images; UDD (``udd`` and its variants): ``methods.udd.params.udd_config``
and ``methods.udd.distill.udd_distill`` from the random baseline's images; DDPS (``ddps``,
``ddps_nocluster``, ``ddps_flip``; needs diffusers, else skipped with the reason): the ``diffusion``
block's pixel U-Net (``methods.ddps.pixel_diffusion.pixel_config`` / ``train_class_diffusion`` on the
train split in the asset's seeded batch order), ``methods.ddps.config.ddps_config`` and the stages
``methods.ddps.stages.score_windows`` / ``window_features`` / ``cluster_candidates``, each level
shared between entries by ``entries.owner_entry`` as the assets share it, then the plugin's
``select`` / ``tiles``; ``core.compose.compose_images``, ``soft_labels.sample_views`` / ``teacher_soft_labels``,
``training.train_student`` / ``evaluate`` -- with the profile's protocol
(``dd_assets.evaluation.protocol.resolve``: budgets, hard-label students, views, recipe).
Students are selected on val (best ``eval_every`` epoch), tested once.  Images, val and test live
on ``--device`` from the start.

Outputs under ``--out`` (default ``$OUT`` when set, else a new folder under /tmp):
``results.csv`` (exactly ``dd_assets.evaluation.results.to_csv(results_rows(...))``, the schema
of ``docs/results/<profile>.csv``), ``results.md`` (its markdown table), ``students.csv`` (one row
per trained student), ``timings.csv`` (seconds per stage, exclusive of nested stages) and
``run.json`` (device, versions, arguments, what was skipped).

    python benchmarks/gpu_table.py                              # cifar10 profile, IPC 10, 3 seeds
    python benchmarks/gpu_table.py --ipc1 --budgets 100 1000    # + IPC 1, + 100 / 1000-epoch students
    python benchmarks/gpu_table.py --tiny --device cpu          # seconds: 2 classes x 30 images

Methods are functions ``name -> fn(state, ipc, params) -> (uint8 [N, 3, S, S] images, int64 [N]
labels)`` in :data:`METHODS`; every profile entry whose base method has one is run, the others
are listed as skipped (``run.json``: ``skipped_reasons``).  A label-only variant
(``nrr_dbr: {method: nrr, labels: dbr}``) labels its source entry's images, computed once.
FocusDC's Dynamic Fine-Tuning ruler (``<entry>+dft`` rows) is not run (``run.json``: ``not_run``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a bare GPU machine runs the checkout without installing it
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from dd_assets.config import block_hash, deep_merge  # noqa: E402
from dd_assets.data.images import BadImageError, load_image  # noqa: E402
from dd_assets.data.manifest import assign_splits, source_id  # noqa: E402
from dd_assets.data.sources import IMAGE_EXTENSIONS  # noqa: E402
from dd_assets.evaluation.protocol import Protocol  # noqa: E402
from dd_assets.evaluation.protocol import resolve as resolve_protocol  # noqa: E402
from dd_assets.evaluation.results import markdown_table, results_rows, to_csv  # noqa: E402
from dd_assets.core.compose import compose_images  # noqa: E402
from dd_assets.core.imaging import to_model_input  # noqa: E402
from dd_assets.methods.herding.select import herding  # noqa: E402
from dd_assets.methods.random.select import select_random  # noqa: E402
from dd_assets.methods.rded.crops import score_class, select_lowest  # noqa: E402
from dd_assets.core.soft_labels import ViewParams, label_array_bytes, sample_views, teacher_soft_labels  # noqa: E402
from dd_assets.core.batched_views import renderer  # noqa: E402
from dd_assets.core.bulk_students import StudentJob, train_students_bulk  # noqa: E402
from dd_assets.core.student_training import train_student  # noqa: E402
from dd_assets.core.training import TrainConfig, evaluate, train_teacher  # noqa: E402
from dd_assets.core.types import CandidateCrops  # noqa: E402
from dd_assets.methods.entries import base_method, images_source, method_params, owner_entry  # noqa: E402
from dd_assets.core.dbr import teacher_dbr_labels  # noqa: E402
from dd_assets.core.randaugment import STUDENT_RANDAUGMENT, recipe_suffix  # noqa: E402
from dd_assets.methods import registry  # noqa: E402
from dd_assets.methods.edf.comp_dd import comp_dd_batch  # noqa: E402
from dd_assets.methods.edf.config import check_config  # noqa: E402
from dd_assets.methods.edf.distill import edf_distill  # noqa: E402
from dd_assets.methods.edf.experts import ExpertTrajectories, expert_accuracy, train_experts  # noqa: E402
from dd_assets.methods.edf.params import entry_config as edf_entry_config  # noqa: E402
from dd_assets.methods.edf.params import expert_config  # noqa: E402
from dd_assets.methods.focusdc.attention import attention_maps  # noqa: E402
from dd_assets.methods.udd.distill import udd_distill  # noqa: E402
from dd_assets.methods.udd.params import udd_config  # noqa: E402
from dd_assets.methods.nrr.cams import raw_image_cams  # noqa: E402
from dd_assets.methods.nrr.cidd import cidd_candidates  # noqa: E402
from dd_assets.methods.plugin import SELECTION_COLUMNS, ClassCandidates  # noqa: E402
from dd_assets.models import create_model, penultimate  # noqa: E402

TARBALLS = {"train": "cifar10-jpeg-train.tar.gz", "test": "cifar10-jpeg-test.tar.gz"}
TINY_CLASSES, TINY_PER_CLASS = 2, 30


# ----------------------------------------------------------------------------- timings


class Timer:
    """Seconds per stage, exclusive of nested stages (a scoring pass triggered inside a
    selection is booked to scoring only); CUDA is synchronized at every boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[dict[str, Any]] = []
        self._stack: list[list[float]] = []  # [start, seconds spent in children]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str, what: str = "", **extra: Any) -> Iterator[None]:
        self._sync()
        self._stack.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            self._sync()
            start, children = self._stack.pop()
            total = time.perf_counter() - start
            if self._stack:
                self._stack[-1][1] += total
            self.rows.append({"stage": name, "what": what, "seconds": total - children, **extra})

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        head = ["stage", "what", "seconds"]
        return df[head + [c for c in df.columns if c not in head]] if len(df) else pd.DataFrame(columns=head)

    def table(self) -> str:
        df = self.frame()
        if df.empty:
            return "(no stages)"
        g = df.groupby("stage", sort=False)["seconds"].agg(["count", "sum"]).reset_index()
        width = max(len("stage"), *(len(s) for s in g["stage"]))
        lines = [f"{'stage':<{width}}  {'calls':>5}  {'seconds':>9}", "-" * (width + 18)]
        lines += [f"{r.stage:<{width}}  {int(r['count']):>5}  {r['sum']:>9.2f}" for _, r in g.iterrows()]
        lines.append(f"{'total':<{width}}  {int(g['count'].sum()):>5}  {g['sum'].sum():>9.2f}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- k-means without scikit-learn


class SeededKMeans:
    """A small stand-in for ``sklearn.cluster.KMeans`` (the attributes ``coresets.kmeans_select``
    reads: ``labels_``, ``cluster_centers_``), used only where scikit-learn is missing: k-means++
    seeding and Lloyd iterations in float64 from ``np.random.default_rng(random_state)``, best of
    ``n_init`` by inertia.  Deterministic, but not bit-identical to scikit-learn's picks."""

    def __init__(self, n_clusters: int, random_state: int = 0, n_init: int = 10, max_iter: int = 300,
                 tol: float = 1e-4) -> None:
        self.n_clusters, self.random_state, self.n_init = int(n_clusters), int(random_state), int(n_init)
        self.max_iter, self.tol = int(max_iter), float(tol)

    @staticmethod
    def _d2(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]).clamp_min_(0)

    def fit(self, features: np.ndarray) -> SeededKMeans:
        x = torch.from_numpy(np.asarray(features, np.float64))
        n, k = x.shape[0], self.n_clusters
        rng = np.random.default_rng(self.random_state)
        tol = self.tol * float(x.var(0).mean()) if n > 1 else 0.0
        best = None
        for _ in range(max(1, self.n_init)):
            centres = x[[int(rng.integers(n))]]
            for _j in range(1, k):  # k-means++
                d = self._d2(x, centres).min(1).values.numpy()
                p = d / d.sum() if d.sum() > 0 else np.full(n, 1.0 / n)
                centres = torch.cat([centres, x[[int(rng.choice(n, p=p))]]])
            for _it in range(self.max_iter):
                labels = self._d2(x, centres).argmin(1)
                new = centres.clone()
                for c in range(k):
                    members = labels == c
                    if members.any():
                        new[c] = x[members].mean(0)
                shift = float(((new - centres) ** 2).sum())
                centres = new
                if shift <= tol:
                    break
            d = self._d2(x, centres)
            labels = d.argmin(1)
            inertia = float(d.gather(1, labels[:, None]).sum())
            if best is None or inertia < best[0]:
                best = (inertia, labels.numpy().astype(np.int64), centres.numpy())
        _, self.labels_, self.cluster_centers_ = best
        return self


def import_coresets(impl: str) -> tuple[types.ModuleType, str, type | None]:
    """``dd_assets.methods.kmeans.select`` (the k-means coreset) through :func:`import_with_kmeans`."""
    return import_with_kmeans("dd_assets.methods.kmeans.select", impl)


def import_with_kmeans(module: str, impl: str) -> tuple[types.ModuleType, str, type | None]:
    """``module`` (one that binds scikit-learn's ``KMeans`` lazily at module level: the k-means
    coreset, DDPS's ``methods.ddps.clusters``; see ``core.lazy_sklearn``), which k-means it runs,
    and the class :func:`kmeans_with` swaps in for the call (None: scikit-learn's).

    ``auto``: scikit-learn's KMeans where it imports (exactly the pipeline), else
    :class:`SeededKMeans`; ``torch``: always :class:`SeededKMeans`; ``sklearn``: fail without it.
    """
    import importlib

    if impl not in ("auto", "sklearn", "torch"):
        raise ValueError(f"--kmeans must be auto, sklearn or torch, got {impl!r}")
    mod = importlib.import_module(module)   # importable without scikit-learn (bound at first use)
    try:
        import sklearn.cluster  # noqa: F401
        import threadpoolctl  # noqa: F401

        real = True
    except ImportError:
        if impl == "sklearn":
            raise
        real = False
    if impl == "torch" or not real:
        return mod, "SeededKMeans (benchmarks/gpu_table.py; scikit-learn absent or --kmeans torch)", SeededKMeans
    return mod, "sklearn.cluster.KMeans", None


@contextlib.contextmanager
def kmeans_with(coresets: types.ModuleType, cls: type | None) -> Iterator[None]:
    """``coresets.kmeans_select`` with ``cls`` as its ``KMeans`` (and no thread limits: the stand-in
    needs no threadpoolctl) for the duration of the call only."""
    if cls is None:
        yield
        return
    old = coresets.KMeans, coresets.threadpool_limits
    coresets.KMeans, coresets.threadpool_limits = cls, lambda limits=None: contextlib.nullcontext()
    try:
        yield
    finally:
        coresets.KMeans, coresets.threadpool_limits = old


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, 3, S, S]
    labels: np.ndarray  # int64 [N]
    source_ids: np.ndarray  # int64 [N]


def _tar_members(path: Path, classes: set[str]) -> dict[tuple[str, str], list[tuple[str, bytes]]]:
    """``(split dir, class) -> [(file name, bytes)]`` of ``<split>/<class>/<file>`` members."""
    out: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    with tarfile.open(path, "r|gz") as tf:
        for m in tf:
            parts = m.name.lstrip("./").split("/")
            if not m.isfile() or len(parts) != 3 or parts[1] not in classes or parts[2].startswith("."):
                continue
            out.setdefault((parts[0], parts[1]), []).append((parts[2], tf.extractfile(m).read()))
    return out


def _synthetic_members(classes: list[str], per_class: int, size: int) -> dict[tuple[str, str], list[tuple[str, Any]]]:
    """Seeded stand-in when the tarballs are absent: each class a colour + stripe pattern + noise."""
    out: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    yy, xx = np.mgrid[0:size, 0:size]
    for cidx, cname in enumerate(classes):
        rng = np.random.default_rng([1234, cidx])
        colour = rng.integers(40, 216, size=3)
        stripes = np.sin((xx * (cidx + 1) + yy * (2 - cidx % 3)) * 0.35) * 40
        for split in ("train", "test"):
            files = []
            for i in range(per_class):
                noise = rng.normal(0, 25, size=(3, size, size))
                img = np.clip(colour[:, None, None] + stripes[None] + noise, 0, 255).astype(np.uint8)
                files.append((f"{i:04d}.png", img))
            out[(split, cname)] = files
    return out


def build_splits(data: dict, classes: list[str], datasets: Path | None, synthetic: bool, workers: int,
                 timer: Timer) -> tuple[Split, Split, Split, str]:
    """Train / val / test exactly as ``manifest[class]`` assigns them (positions, ``max_per_class``,
    ``assign_splits``), decoded as ``load_rows`` decodes them."""
    size = int(data["image_size"])
    with timer.stage("read_tarballs"):
        if synthetic:
            members = _synthetic_members(classes, int(data.get("max_per_class") or TINY_PER_CLASS), size)
            has_test, origin = True, "synthetic (seeded colour + stripes; no tarball)"
        else:
            assert datasets is not None
            with ThreadPoolExecutor(2) as ex:
                parts = list(ex.map(lambda s: _tar_members(datasets / TARBALLS[s], set(classes)), ("train", "test")))
            members = {**parts[0], **parts[1]}
            has_test, origin = True, f"{datasets / TARBALLS['train']} + {TARBALLS['test']}"
    frames, blobs = [], []
    with timer.stage("build_manifest"):
        for cidx, cname in enumerate(classes):
            files = {"train": sorted(members.get(("train", cname), []), key=lambda f: f[0])}
            if has_test:
                files["test"] = sorted(members.get(("test", cname), []), key=lambda f: f[0])
            if not any(files.values()):
                raise FileNotFoundError(f"class {cname!r} has no images in {origin}")
            rows, position = [], 0
            for split_dir, entries in sorted(files.items(), key=lambda kv: kv[0] != "train"):
                cap = data.get("max_per_class")
                if cap is not None and len(entries) > cap:  # manifest._rng(split_seed, class, 3)
                    keep = np.sort(np.random.default_rng([int(data["split_seed"]), cidx, 3]).choice(len(entries), cap, replace=False))
                    entries = [entries[i] for i in keep]
                for name, blob in entries:
                    pos = position
                    position += 1
                    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    rows.append({"source_id": source_id(cidx, pos), "class_index": cidx,
                                 "split": "test" if split_dir == "test" else "train", "blob": len(blobs)})
                    blobs.append(blob)
            df = assign_splits(pd.DataFrame(rows), data, cidx, has_test_dir=has_test)
            frames.append(df)
        man = pd.concat(frames, ignore_index=True)
    with timer.stage("decode_images", f"{len(man)} images"):
        def decode(i: int) -> np.ndarray | None:
            b = blobs[i]
            if isinstance(b, np.ndarray):
                return b
            try:
                return load_image(io.BytesIO(b), size)
            except BadImageError:
                return None

        with ThreadPoolExecutor(max(1, workers)) as ex:
            pix = list(ex.map(decode, man["blob"].tolist(), chunksize=512))
        bad = [i for i, p in enumerate(pix) if p is None]
        if bad:  # the manifest skips undecodable files (their positions stay used)
            man = man.drop(index=bad).reset_index(drop=True)
            pix = [p for p in pix if p is not None]
        pixels = np.stack(pix) if pix else np.zeros((0, 3, size, size), np.uint8)

    def split(name: str) -> Split:
        sel = (man["split"] == name).to_numpy()
        sub = man[sel]
        return Split(pixels[sel], np.array(sub["class_index"], np.int64), np.array(sub["source_id"], np.int64))

    return split("train"), split("val"), split("test"), origin


# ----------------------------------------------------------------------------- state


@dataclass
class State:
    """Everything a method function may read: effective params, data (host + device), teacher."""

    raw: dict
    data: dict
    classes: list[str]
    proto: Protocol
    device: torch.device
    batch_size: int  # inference batch (operational: changes no result beyond float rounding)
    train: Split
    val: Split
    test: Split
    train_dev: torch.Tensor
    val_dev: torch.Tensor
    test_dev: torch.Tensor
    teacher: torch.nn.Module
    timer: Timer
    coresets: types.ModuleType
    kmeans_cls: type | None = None
    models: Path | None = None  # --shared's models folder (FocusDC's vit_scorer checkpoint)
    model_ctx: dict = field(default_factory=dict)  # what load_or_train reads (data, classes, device, train, val)
    render: str = "exact"  # view renderer (operational: results equal up to float rounding)
    cache: dict[str, Any] = field(default_factory=dict)
    entry: str = ""  # the profile entry being distilled (EDF / UDD configs name it in their errors)
    _where: dict[int, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.data["image_size"])

    def class_rows(self, cidx: int) -> np.ndarray:
        """Row indices into ``train`` of class ``cidx``, ascending source id (the class manifest's order)."""
        rows = np.flatnonzero(self.train.labels == cidx)
        return rows[np.argsort(self.train.source_ids[rows], kind="stable")]

    def pixels(self, sid: int) -> np.ndarray:
        if not self._where:
            self._where = {int(s): i for i, s in enumerate(self.train.source_ids)}
        return self.train.images[self._where[int(sid)]]

    def evaluator(self, which: str) -> Callable[[torch.nn.Module], float]:
        x, y = (self.val_dev, self.val.labels) if which == "val" else (self.test_dev, self.test.labels)
        bs = self.batch_size

        def run(model: torch.nn.Module) -> float:
            return evaluate(model, ((x[s:s + bs], y[s:s + bs]) for s in range(0, len(y), bs)),
                            self.data["mean"], self.data["std"], self.device)

        return run


def _need(cname: str, have: int, need: int, what: str) -> None:
    if have < need:
        raise ValueError(f"class {cname!r} has {have} {what} but IPC needs {need}; lower the IPC or add images")


def _full_boxes(n: int, size: int) -> np.ndarray:
    return np.tile(np.array([[0, 0, size, size]], np.int32), (n, 1))


def selection_frame(cands: CandidateCrops, order: np.ndarray, ipc: int) -> pd.DataFrame:
    """``chain.select_method``'s rows: tile ``t`` of image ``i`` is the ``(t * IPC + i)``-th pick."""
    order = np.asarray(order, np.int64)
    pos = np.arange(len(order))
    return pd.DataFrame({
        "class_index": cands.class_index, "image_index": pos % ipc, "tile": pos // ipc,
        "source_id": cands.source_id[order], "x0": cands.boxes[order, 0], "y0": cands.boxes[order, 1],
        "x1": cands.boxes[order, 2], "y1": cands.boxes[order, 3], "score": cands.score[order].astype(np.float32),
    })


def compose_selection(state: State, sel: pd.DataFrame, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """``chain.compose_method`` without the lineage: one composite per (class, image), class-major."""
    images, labels = [], []
    for (cidx, _img), grp in sel.groupby(["class_index", "image_index"], sort=True):
        grp = grp.sort_values("tile")
        srcs = grp["source_id"].tolist()
        image, _tiles = compose_images([state.pixels(s) for s in srcs], grp[["x0", "y0", "x1", "y1"]].to_numpy(),
                                       state.size, factor, srcs, grp["score"].tolist())
        images.append(np.asarray(image))
        labels.append(int(cidx))
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.int64)


# ----------------------------------------------------------------------------- methods


def teacher_features(state: State) -> dict[int, np.ndarray]:
    """``teacher_features[class]`` (features.splits: train): penultimate features of every train image."""
    if "features" not in state.cache:
        with state.timer.stage("teacher_features"):
            out = {}
            with torch.no_grad():
                for cidx in range(len(state.classes)):
                    rows = torch.from_numpy(state.class_rows(cidx)).to(state.device)
                    feats = [penultimate(state.teacher, to_model_input(state.train_dev[rows[s:s + state.batch_size]],
                                                                       state.data["mean"], state.data["std"], state.device)
                                         ).float().cpu().numpy() for s in range(0, len(rows), state.batch_size)]
                    out[cidx] = np.concatenate(feats).astype(np.float32)
            state.cache["features"] = out
    return state.cache["features"]


def pool_positions(n: int, mipc: int, seed: int, cidx: int) -> np.ndarray:
    """``model_assets.pool_rows``: positions (into the class sorted by source id) of the seeded
    ``mipc`` pool -- ``rng([seed, class, 7])``, all when the class has no more."""
    if n <= mipc:
        return np.arange(n)
    return np.sort(np.random.default_rng([int(seed), int(cidx), 7]).choice(n, int(mipc), replace=False))


def rded_candidates(state: State, mp: dict) -> dict[int, CandidateCrops]:
    """``rded_scores[class]``: the seeded ``mipc`` pool (``model_assets.pool_rows``) scored by ``score_class``."""
    key = "rded:" + block_hash(mp)
    if key not in state.cache:
        with state.timer.stage("rded_scores"):
            out = {}
            for cidx in range(len(state.classes)):
                rows = state.class_rows(cidx)
                rows = rows[pool_positions(len(rows), int(mp["mipc"]), int(mp["seed"]), cidx)]
                out[cidx] = score_class(
                    state.teacher, state.train_dev[torch.from_numpy(rows).to(state.device)],
                    np.full(len(rows), cidx, np.int64), state.train.source_ids[rows],
                    num_crop=int(mp["num_crop"]), out_size=state.size, factor=int(mp["factor"]),
                    mean=state.data["mean"], std=state.data["std"], seed=int(mp["seed"]), class_index=cidx,
                    scale=tuple(mp["scale"]), batch_size=state.batch_size, device=state.device)
            state.cache[key] = out
    return state.cache[key]


def distill_random(state: State, ipc: int, mp: dict) -> tuple[np.ndarray, np.ndarray]:
    frames = []
    for cidx, cname in enumerate(state.classes):
        ids = state.train.source_ids[state.class_rows(cidx)]
        _need(cname, len(ids), ipc, "train images")
        chosen = select_random(ids, ipc, int(mp["seed"]), cidx)
        cands = CandidateCrops(cidx, chosen, _full_boxes(len(chosen), state.size), np.full(len(chosen), np.nan, np.float32))
        frames.append(selection_frame(cands, np.arange(len(chosen)), ipc))
    return compose_selection(state, pd.concat(frames, ignore_index=True), 1)


def distill_rded(state: State, ipc: int, mp: dict) -> tuple[np.ndarray, np.ndarray]:
    cands_by_class = rded_candidates(state, mp)
    factor = int(mp.get("factor", 1))
    per_class = ipc * factor * factor
    frames = []
    for cidx, cname in enumerate(state.classes):
        cands = cands_by_class[cidx]
        _need(cname, len(cands.score), per_class, "scored crops (methods.rded.mipc pool)")
        frames.append(selection_frame(cands, select_lowest(cands, per_class), ipc))
    return compose_selection(state, pd.concat(frames, ignore_index=True), factor)


def _coreset(state: State, ipc: int, pick: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    feats = teacher_features(state)
    frames = []
    for cidx, cname in enumerate(state.classes):
        ids = state.train.source_ids[state.class_rows(cidx)]
        _need(cname, len(ids), ipc, "train images with features")
        cands = CandidateCrops(cidx, ids, _full_boxes(len(ids), state.size), np.full(len(ids), np.nan, np.float32))
        frames.append(selection_frame(cands, pick(feats[cidx]), ipc))
    return compose_selection(state, pd.concat(frames, ignore_index=True), 1)


def distill_herding(state: State, ipc: int, mp: dict) -> tuple[np.ndarray, np.ndarray]:
    return _coreset(state, ipc, lambda f: herding(f, ipc))


def distill_kmeans(state: State, ipc: int, mp: dict) -> tuple[np.ndarray, np.ndarray]:
    def pick(f: np.ndarray) -> np.ndarray:
        with kmeans_with(state.coresets, state.kmeans_cls):
            return state.coresets.kmeans_select(f, ipc, seed=int(mp["seed"]), n_init=int(mp["n_init"]))

    return _coreset(state, ipc, pick)


def plugin_selection(state: State, base: str, mp: dict, ipc: int,
                     candidates: Callable[[int, str], ClassCandidates]) -> tuple[np.ndarray, np.ndarray]:
    """``chain.select_method`` + ``compose_method`` + ``chain._refine`` of a select plugin: the
    plugin's ``select`` on every class's candidates (``candidates.select_rows_pl``), the composites
    at ``plugin.tiles``, then -- where ``plugin.refines(cfg)`` -- ``plugin.refine`` with the teacher."""
    plugin = registry.get(base)
    cfg = plugin.make_config(mp)  # = methods.entries.entry_config: mp is method_params(entry, block)
    frames = []
    for cidx, cname in enumerate(state.classes):
        df = plugin.select(cfg, candidates(cidx, cname), ipc, state.size)
        df.insert(0, "class_index", cidx)
        frames.append(df)
    sel = pd.concat(frames, ignore_index=True)[SELECTION_COLUMNS]
    images, labels = compose_selection(state, sel, plugin.tiles(cfg, ipc, state.size))
    if plugin.refine is not None and plugin.refines(cfg):
        with state.timer.stage(f"{base}_refine", f"ipc{ipc} {len(images)} images",
                               iterations=int(getattr(cfg, "iterations", 0))):
            images = plugin.refine(cfg, images, labels, state.teacher, state.data["mean"], state.data["std"],
                                   state.device)
    return images, labels


# NRR-DD: dd_assets.defs.methods.nrr.CIDD_KEYS (what cidd_scores reads; variants agreeing on them share it)
NRR_CIDD_KEYS = ("num_crop", "top_t", "mipc", "scale", "seed", "crop_score", "confidence")


def nrr_cams(state: State) -> dict[int, torch.Tensor]:
    """``cam_maps[class]``: raw teacher CAMs (``methods.nrr.cams.raw_image_cams``, Eq. 1) of every
    train image of the class, ascending source id (the asset's row order)."""
    if "cam_maps" not in state.cache:
        with state.timer.stage("cam_maps"):
            out = {}
            for cidx in range(len(state.classes)):
                rows = state.class_rows(cidx)
                out[cidx] = raw_image_cams(state.teacher, state.train_dev[torch.from_numpy(rows).to(state.device)],
                                           np.full(len(rows), cidx, np.int64), state.size, state.data["mean"],
                                           state.data["std"], state.batch_size, state.device)
            state.cache["cam_maps"] = out
    return state.cache["cam_maps"]


def nrr_candidates(state: State, mp: dict) -> dict[int, ClassCandidates]:
    """``cidd_scores[class]`` (``nrr.load_candidates``): the seeded ``mipc`` pool (``pool_rows``)
    scored by ``methods.nrr.cidd.cidd_candidates`` from its stored raw CAMs; shared between
    entries agreeing on :data:`NRR_CIDD_KEYS`, as the assets are."""
    cb = {k: mp[k] for k in NRR_CIDD_KEYS}
    key = "cidd:" + block_hash(cb)
    if key not in state.cache:
        cams = nrr_cams(state)
        with state.timer.stage("cidd_scores"):
            out = {}
            for cidx, cname in enumerate(state.classes):
                rows = state.class_rows(cidx)
                keep = pool_positions(len(rows), int(cb["mipc"]), int(cb["seed"]), cidx)
                rows = rows[keep]
                c = cidd_candidates(
                    state.teacher, state.train_dev[torch.from_numpy(rows).to(state.device)],
                    np.full(len(rows), cidx, np.int64), state.train.source_ids[rows], num_crop=int(cb["num_crop"]),
                    out_size=state.size, mean=state.data["mean"], std=state.data["std"], seed=int(cb["seed"]),
                    class_index=cidx, top_t=int(cb["top_t"]), scale=tuple(cb["scale"]), crop_score=cb["crop_score"],
                    confidence=cb["confidence"], batch_size=state.batch_size, device=state.device,
                    raw_cams=cams[cidx][torch.from_numpy(keep)])
                # crops_from_table: what the stored table gives back (int32 boxes, float32 scores)
                out[cidx] = ClassCandidates(cidx, cname, c.source_id.astype(np.int64),
                                            boxes=c.boxes.astype(np.int32).reshape(-1, 4),
                                            score=c.score.astype(np.float32))
            state.cache[key] = out
    return state.cache[key]


def distill_nrr(state: State, ipc: int, mp: dict) -> tuple[np.ndarray, np.ndarray]:
    """NRR-DD: CIDD candidates, the plugin's ``select`` (the ``beta * IPC`` least confident
    CAM-critical crops), composites at ``sqrt(beta)`` tiles, non-critical region refinement
    (Sec. 3.3; Eq. 11-12 label refinement with ``label_refine``) unless ``refine: false``."""
    cands = nrr_candidates(state, mp)
    return plugin_selection(state, "nrr", mp, ipc, lambda cidx, cname: cands[cidx])


def vit_scorer(state: State) -> tuple[torch.nn.Module, str]:
    """The ``vit_scorer`` asset: the ``vit_scorer.weights`` checkpoint (the shared
    ``vit_tiny_patch4_cifar10.pt`` under ``--shared``'s models) or, without one, trained here."""
    if "vit" not in state.cache:
        state.cache["vit"] = load_or_train(state.model_ctx, state.raw["vit_scorer"], "vit_scorer", state.models,
                                           state.timer)
    return state.cache["vit"]


def focusdc_candidates(state: State) -> dict[int, ClassCandidates]:
    """``focusdc_attention[class]`` (``focusdc.load_candidates``): class-token attention and ViT
    logits (``methods.focusdc.attention.attention_maps``) of every train image, ascending source id."""
    if "focusdc_attention" not in state.cache:
        vit, _src = vit_scorer(state)
        ps = vit.patch_embed.patch_size  # focusdc._patch
        patch = (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))
        with state.timer.stage("focusdc_attention"):
            out = {}
            for cidx, cname in enumerate(state.classes):
                rows = state.class_rows(cidx)
                attn, logits = attention_maps(vit, state.train_dev[torch.from_numpy(rows).to(state.device)],
                                              state.data["mean"], state.data["std"], batch_size=state.batch_size,
                                              device=state.device)
                out[cidx] = ClassCandidates(cidx, cname, state.train.source_ids[rows].astype(np.int64),
                                            arrays={"attention": attn, "logits": logits,
                                                    "patch_size": np.asarray(patch, np.int64)})
            state.cache["focusdc_attention"] = out
    return state.cache["focusdc_attention"]


def distill_focusdc(state: State, ipc: int, mp: dict) -> tuple[np.ndarray, np.ndarray]:
    """FocusDC: the plugin's ``select`` (key windows of the ViT attention scored by realism,
    ``m * IPC`` key patches + ``n * IPC`` low-resolution context images), composites at
    ``sqrt(m + n)`` tiles.  Its DFT ruler (``<entry>+dft`` rows) is not in this benchmark."""
    cands = focusdc_candidates(state)
    return plugin_selection(state, "focusdc", mp, ipc, lambda cidx, cname: cands[cidx])


def distill_edf(state: State, ipc: int, mp: dict) -> tuple[np.ndarray, np.ndarray]:
    """EDF (``<entry>_distilled``): Algorithm 1 (``methods.edf.distill.edf_distill``) at the
    entry's config for this IPC (``methods.edf.params.entry_config``, checked against the experts
    with ``check_config``), from the random baseline's images at the entry's ``seed``, with the
    teacher as the Grad-CAM model when ``use_dae``; every EDF entry and IPC shares the experts."""
    traj = expert_trajectories(state)
    comp_dd_complexity(state)  # a scoring asset of the piece (easy / hard classes), not an input here
    cfg = edf_entry_config(state.entry or "edf", mp, ipc)
    try:
        check_config(cfg, traj.num_experts, traj.num_epochs)
    except ValueError as err:
        raise ValueError(f"methods.{state.entry or 'edf'} at IPC {ipc}: {err} (experts: {traj.num_experts} x "
                         f"{traj.num_epochs} epochs)") from err
    init, labels = distill_random(state, ipc, {"seed": int(mp["seed"])})  # initial_selection + compose_method
    cfg.cam_batch_size = state.batch_size
    m = cfg.match
    with state.timer.stage("edf_distill", f"{state.entry} ipc{ipc}", iterations=m.iterations, syn_steps=m.syn_steps,
                           batch_syn=min(int(m.batch_syn or len(labels)), len(labels))):
        res = edf_distill(init, labels, traj, state.teacher if cfg.use_dae else None, cfg, state.data["mean"],
                          state.data["std"], state.device, state.classes, state.classes)
    return np.asarray(res.images, np.uint8), np.asarray(res.labels, np.int64)


def expert_trajectories(state: State) -> ExpertTrajectories:
    """The ``expert_trajectories`` asset: ``methods.edf.experts.train_experts`` on the train split
    (rows by ascending source id), batches in the asset's order (``iter_batches`` with
    ``shuffle_seed = (seed * 1_000_003 + expert) * 10_007 + epoch``: a ``DataLoader`` shuffle),
    gathered from the images already on the device; the experts' val accuracy as the asset logs it."""
    if "experts" not in state.cache:
        from torch.utils.data import DataLoader

        cfg, k, e = expert_config(state.raw["experts"])
        order = np.argsort(state.train.source_ids, kind="stable")
        images = state.train_dev[torch.from_numpy(order).to(state.device)]
        labels = torch.from_numpy(state.train.labels[order]).to(state.device)

        def source(expert: int, epoch: int):
            gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + expert) * 10_007 + epoch)
            for idx in DataLoader(range(len(order)), batch_size=cfg.batch_size, shuffle=True, generator=gen):
                idx = idx.to(state.device)
                yield images[idx], labels[idx]

        with state.timer.stage("expert_trajectories", f"{k} experts x {e} epochs", experts=k, epochs=e):
            traj = train_experts(source, len(state.classes), k, e, cfg, state.data["mean"], state.data["std"],
                                 state.device, image_size=state.size, in_channels=3)
        with state.timer.stage("expert_accuracy"):
            bs, x, y = state.batch_size, state.val_dev, torch.from_numpy(state.val.labels)
            val_acc = expert_accuracy(traj, ((x[s:s + bs], y[s:s + bs]) for s in range(0, len(y), bs)),
                                      state.data["mean"], state.data["std"], state.device) if len(y) else []
        state.cache["experts"] = traj
        state.cache["experts_info"] = {"experts": k, "epochs": e, "val_acc_last_epoch": val_acc}
        del images, labels
    return state.cache["experts"]


def comp_dd_complexity(state: State) -> dict[str, float]:
    """``comp_dd_complexity[class]``: Comp-DD complexity (``methods.edf.comp_dd.comp_dd_batch``) of
    every train image under the teacher, ascending source id; the class means go to run.json."""
    if "comp_dd" not in state.cache:
        with state.timer.stage("comp_dd_complexity"):
            out = {}
            for cidx, cname in enumerate(state.classes):
                rows = torch.from_numpy(state.class_rows(cidx)).to(state.device)
                comps = [comp_dd_batch(state.teacher, state.train_dev[rows[s:s + state.batch_size]],
                                       np.full(len(rows[s:s + state.batch_size]), cidx, np.int64), state.classes,
                                       state.classes, state.data["mean"], state.data["std"], state.device)[0]
                         for s in range(0, len(rows), state.batch_size)]
                out[cname] = float(np.concatenate(comps).mean()) if comps else float("nan")
            state.cache["comp_dd"] = out
    return state.cache["comp_dd"]


def distill_udd(state: State, ipc: int, mp: dict) -> tuple[np.ndarray, np.ndarray]:
    """UDD (``<entry>_distilled``): Algorithm 1 (``methods.udd.distill.udd_distill``) at the
    entry's ``methods.udd.params.udd_config``, from the random baseline's images at its ``seed``
    (``udd.initial_images``); real batches drawn per class from the train images on the device,
    ascending source id (``RealPool``: the same draws as the asset's ``ClassSampler``)."""
    cfg = udd_config(state.entry or "udd", mp)
    init, labels = distill_random(state, ipc, {"seed": int(cfg.seed)})
    if "udd_real" not in state.cache:
        state.cache["udd_real"] = {c: state.train_dev[torch.from_numpy(state.class_rows(c)).to(state.device)]
                                   for c in range(len(state.classes))}
    with state.timer.stage("udd_distill", f"{state.entry} ipc{ipc}", iterations=cfg.iterations,
                           inner_steps=cfg.inner_steps):
        res = udd_distill(state.cache["udd_real"], init, labels, cfg, state.device, mean=state.data["mean"],
                          std=state.data["std"], num_classes=len(state.classes))
    return res.images_uint8(), res.labels.numpy().astype(np.int64)


# DDPS: dd_assets.defs.methods.ddps.SCORE_KEYS / FEATURE_KEYS / CLUSTER_KEYS (the parameters each
# IPC-independent level reads; entries agreeing on a level's keys share that level, owner_entry)
DDPS_SCORE_KEYS = ("mipc", "image_size", "patch_size", "patch_stride", "n_draws", "t_range", "seed")
DDPS_FEATURE_KEYS = DDPS_SCORE_KEYS + ("patches_per_image", "prefer", "dift_t", "dift_up_block", "dift_ensemble",
                                       "dift_input")
DDPS_CLUSTER_KEYS = DDPS_FEATURE_KEYS + ("n_clusters", "kmeans_n_init")
DDPS_NEEDS_DIFFUSERS = "needs diffusers: carry its wheel (benchmarks/README.md)"


def ddps_unavailable(raw: dict) -> str | None:
    """Why the DDPS entries cannot run in this process, or None.  diffusers (the U-Net behind
    ``methods.ddps.pixel_diffusion``) is imported here and only here, when a DDPS entry is
    selected; a bare GPU machine lacks it unless its wheel is carried.  ``diffusion.weights``
    (a local Stable Diffusion folder) is refused: this benchmark trains the small pixel U-Net only."""
    weights = (raw.get("diffusion") or {}).get("weights")
    if weights:
        return (f"diffusion.weights = {weights!r}: a Stable Diffusion folder is not run by this benchmark "
                "(it trains the small pixel U-Net only); set diffusion.weights: null")
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "diffusers":
            return DDPS_NEEDS_DIFFUSERS
        return f"needs diffusers: importing it failed ({err}); carry its wheel and what it lacks (benchmarks/README.md)"
    return None


def ddps_model(state: State) -> torch.nn.Module:
    """The ``diffusion_model`` asset (``weights: null``): ``methods.ddps.pixel_diffusion.
    train_class_diffusion`` at ``pixel_config(diffusion, image_size)`` on the train split (rows by
    ascending source id), batches in the asset's order (``_Epochs``: ``iter_batches`` with
    ``shuffle_seed = seed * 10_000 + epoch``, epochs from 1, a ``DataLoader`` shuffle) scaled to
    [-1, 1], gathered from the images already on the device; the same seeded init and draws."""
    if "ddps_model" not in state.cache:
        from torch.utils.data import DataLoader

        from dd_assets.methods.ddps.pixel_diffusion import pixel_config, train_class_diffusion

        cfg = pixel_config(state.raw["diffusion"], state.size)
        order = np.argsort(state.train.source_ids, kind="stable")
        images = state.train_dev[torch.from_numpy(order).to(state.device)]
        labels = torch.from_numpy(state.train.labels[order])
        if len(order) == 0:
            raise ValueError("the train split is empty; the diffusion model has nothing to learn from")

        class Epochs:
            epoch = 0

            def __iter__(self):
                self.epoch += 1
                gen = torch.Generator().manual_seed(cfg.seed * 10_000 + self.epoch)
                for idx in DataLoader(range(len(order)), batch_size=cfg.batch_size, shuffle=True, generator=gen):
                    yield images[idx.to(state.device)].float().div(255.0).mul(2.0).sub(1.0), labels[idx]

        with state.timer.stage("diffusion_train", f"{cfg.steps} steps x {cfg.batch_size}", steps=cfg.steps,
                               batch_size=cfg.batch_size):
            model, losses = train_class_diffusion(Epochs(), None, len(state.classes), cfg, state.device)
        tail = float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else float("nan")
        state.cache["ddps_model"] = model.eval()
        state.cache["ddps_info"] = {
            "backend": "pixel_unet (trained here)", "steps": cfg.steps, "batch_size": cfg.batch_size,
            "block_out_channels": list(cfg.block_out_channels), "attention_from_level": cfg.attention_from_level,
            "parameters": int(sum(t.numel() for t in model.parameters())), "train_images": int(len(order)),
            "first_loss": losses[0] if losses else None, "final_loss": tail}
        del images
    return state.cache["ddps_model"]


def ddps_candidates(state: State, entry: str) -> dict[int, ClassCandidates]:
    """``ddps_clusters[class]`` of ``entry`` (``ddps.load_candidates``: the whole cluster table),
    through the three levels, each computed once per owner (``entries.owner_entry`` on
    :data:`DDPS_SCORE_KEYS` < :data:`DDPS_FEATURE_KEYS` < :data:`DDPS_CLUSTER_KEYS`, each level
    with its owner's parameters, as the assets are built): ``ddps_scores`` --
    ``methods.ddps.stages.score_windows`` on the seeded ``mipc`` pool (``pool_rows``), ascending
    source id; ``dift_features`` -- ``window_features``; ``ddps_clusters`` --
    ``cluster_candidates`` and ``to_table``.  The config is ``methods.ddps.config.ddps_config``
    (pixel model: ``latent`` False) with the inference batch ``--batch-size`` (operational: the
    draws do not depend on it; the assets cap it at 32 for SD's attention memory)."""
    from dd_assets.methods.ddps.config import ddps_config
    from dd_assets.methods.ddps.stages import cluster_candidates, score_windows, window_features

    mblock = state.raw["methods"]
    owners = [owner_entry(mblock, entry, keys) for keys in (DDPS_SCORE_KEYS, DDPS_FEATURE_KEYS, DDPS_CLUSTER_KEYS)]
    key = f"ddps_clusters:{owners[2]}"
    if key in state.cache:
        return state.cache[key]
    predictor = ddps_model(state)
    mps = [method_params(o, mblock[o]) for o in owners]
    cfgs = [ddps_config(m, state.size, state.batch_size, latent=False) for m in mps]
    skey, fkey = f"ddps_scores:{owners[0]}", f"dift_features:{owners[1]}"
    if skey not in state.cache:
        cfg = cfgs[0]
        with state.timer.stage("ddps_scores", owners[0], n_draws=cfg.n_draws):
            out = {}
            for cidx in range(len(state.classes)):
                rows = state.class_rows(cidx)
                rows = rows[pool_positions(len(rows), int(mps[0]["mipc"]), int(mps[0]["seed"]), cidx)]
                if len(rows) == 0:
                    raise ValueError(f"class {state.classes[cidx]!r} has no train images to score")
                images = state.train_dev[torch.from_numpy(rows).to(state.device)]
                table, _maps = score_windows(predictor, images, state.train.source_ids[rows].astype(np.int64), cidx,
                                             cfg, device=state.device)
                out[cidx] = (rows, table)
            state.cache[skey] = out
    if fkey not in state.cache:
        cfg = cfgs[1]
        with state.timer.stage("dift_features", owners[1], prefer=cfg.prefer):
            out = {}
            for cidx, (rows, table) in state.cache[skey].items():
                ids = state.train.source_ids[rows].astype(np.int64)   # = np.unique(table.source_id): the pool
                out[cidx] = window_features(predictor, state.train_dev[torch.from_numpy(rows).to(state.device)], ids,
                                            table, cidx, cfg, device=state.device)
            state.cache[fkey] = out
    cfg = cfgs[2]
    clusters_mod, _impl, km_cls = state.cache["ddps_kmeans"]
    with state.timer.stage("ddps_clusters", owners[2], n_clusters=cfg.n_clusters):
        out = {}
        for cidx, cname in enumerate(state.classes):
            with kmeans_with(clusters_mod, km_cls):
                cands, _cl = cluster_candidates(state.cache[fkey][cidx], cidx, cfg)
            table = pd.DataFrame(cands.to_table())
            out[cidx] = ClassCandidates(cidx, cname, source_id=table["source_id"].to_numpy(np.int64), table=table)
        state.cache[key] = out
    return out


def distill_ddps(state: State, ipc: int, mp: dict) -> tuple[np.ndarray, np.ndarray]:
    """DDPS: the entry's cluster table (:func:`ddps_candidates`), the plugin's ``select`` (the
    patches nearest the centres of the top clusters, then the best by R; ``cluster: false`` the
    best by R), composites at ``plugin.tiles`` (whole images at CIFAR's low resolution)."""
    cands = ddps_candidates(state, state.entry or "ddps")
    return plugin_selection(state, "ddps", mp, ipc, lambda cidx, cname: cands[cidx])


#: base method -> fn(state, ipc, params) -> (uint8 [N, 3, S, S], int64 [N]); add entries here.
METHODS: dict[str, Callable[[State, int, dict], tuple[np.ndarray, np.ndarray]]] = {
    "random": distill_random,
    "rded": distill_rded,
    "herding": distill_herding,
    "kmeans": distill_kmeans,
    "nrr": distill_nrr,
    "focusdc": distill_focusdc,
    "edf": distill_edf,
    "udd": distill_udd,
    "ddps": distill_ddps,
}


# ----------------------------------------------------------------------------- models


def resolve_weights(path: str | None, models: Path | None) -> Path | None:
    """A params ``weights`` path: as written (relative to the repo), else its file name under ``--shared``'s models."""
    if not path:
        return None
    p = Path(path)
    p = p if p.is_absolute() else REPO / p
    if p.is_file():
        return p
    if models is not None and (models / p.name).is_file():
        return models / p.name
    raise FileNotFoundError(f"checkpoint {path!r} not found (tried {p}{f' and {models / p.name}' if models else ''}); "
                            "pass --shared with the folder that holds it")


def load_or_train(state_like: dict, block: dict, name: str, models: Path | None, timer: Timer) -> tuple[torch.nn.Module, str]:
    """``model_assets.train_model_asset``: the checkpoint ``block.weights`` or, without one, the
    model trained with ``train_teacher`` on the train split (epoch selected on val)."""
    data, classes, device = state_like["data"], state_like["classes"], state_like["device"]
    train, val = state_like["train"], state_like["val_eval"]
    kwargs = dict(block.get("arch_kwargs") or {})
    weights = resolve_weights(block.get("weights"), models)
    with timer.stage(f"{name}_load" if weights else f"{name}_train"):
        if weights is not None:
            meta = torch.load(weights, map_location="cpu", weights_only=True)
            names = meta.get("class_names") if isinstance(meta, dict) else None
            if names is not None and list(names) != list(classes):
                raise ValueError(f"{weights} was trained on classes {names}, the profile lists {classes}")
            model = create_model(block["arch"], len(classes), in_channels=3, image_size=int(data["image_size"]),
                                 pretrained=bool(block.get("pretrained")), checkpoint=weights, **kwargs)
            return model.to(device).eval(), str(weights)
        from torch.utils.data import DataLoader, TensorDataset

        torch.manual_seed(int(block["seed"]))
        model = create_model(block["arch"], len(classes), in_channels=3, image_size=int(data["image_size"]), **kwargs).to(device)
        ds = TensorDataset(torch.from_numpy(train.images), torch.from_numpy(train.labels))

        def batches(e: int):  # iter_batches(train, shuffle_seed=seed * 10_000 + e): same order
            gen = torch.Generator().manual_seed(int(block["seed"]) * 10_000 + e)
            return DataLoader(ds, batch_size=int(block["batch_size"]), shuffle=True, generator=gen)

        cfg = TrainConfig(epochs=int(block["epochs"]), lr=float(block["lr"]), weight_decay=float(block["weight_decay"]),
                          batch_size=int(block["batch_size"]), optimizer=block["optimizer"], scheduler=block["scheduler"],
                          eval_every=1, seed=int(block["seed"]))
        res = train_teacher(model, batches, math.ceil(len(train.labels) / cfg.batch_size), val, cfg,
                            data["mean"], data["std"], device, augment=True)
        model.load_state_dict(res.best_state)
        return model.eval(), f"trained here ({cfg.epochs} epochs)"


# ----------------------------------------------------------------------------- students


@dataclass
class RowSet:
    """One table row at one IPC, ready for its students: the distilled set on the device, its
    labels (stored soft labels, or views for online / hard-label students) and the runs it owes."""

    entry: str
    ipc: int
    images: torch.Tensor
    labels: np.ndarray
    kind: str
    views: Any
    soft: Any
    label_bytes: int
    runs: list[tuple[int, str]]
    code_version: str
    dbr: Any = None  # NRR-DD's DBRLabels (labels: dbr)
    dbr_r: float = 0.4
    dbr_alpha: float = 1.0


def label_row(state: State, entry: str, ipc: int, images: np.ndarray, labels: np.ndarray, kind: str,
              code_version: str, mp: dict | None = None) -> RowSet:
    """``soft_labels`` + the run list of ``student_assets._train_students`` without Dagster: every
    budget with the entry's labels, plus (``eval.hard_labels``) one hard-label student at the main
    budget on the same views.  ``mp``: the entry's parameters (``student_augment: randaugment``:
    RandAugment on the views; ``labels: dbr``: ``core.dbr.teacher_dbr_labels`` with its ``r``,
    ``alpha_dbr`` for the student loss)."""
    lab, data, proto, mp = state.raw["labels"], state.data, state.proto, mp or {}
    images_dev = torch.from_numpy(images).to(state.device)
    ra = STUDENT_RANDAUGMENT if mp.get("student_augment", "none") == "randaugment" else None
    views = sample_views(len(images), proto.views, state.size, seed=int(lab["seed"]),
                         scale=proto.crop_scale, cutmix_alpha=proto.cutmix_alpha, randaugment=ra)
    soft = dbr = None
    label_bytes = 0
    with state.timer.stage("soft_labels", f"{entry} ipc{ipc}", views=proto.views):
        if kind == "fkd":
            k = min(int(lab["topk"]), len(state.classes))
            soft = teacher_soft_labels(state.teacher, images_dev, views, k, data["mean"], data["std"],
                                       batch_size=state.batch_size, device=state.device, render=renderer(state.render))
            label_bytes = label_array_bytes(soft.to_arrays())
        elif kind == "dbr":
            dbr = teacher_dbr_labels(state.teacher, images_dev, labels, views, data["mean"], data["std"],
                                     batch_size=state.batch_size, device=state.device)
            label_bytes = label_array_bytes(dbr.to_arrays())
        elif kind not in ("online", "hard"):
            raise ValueError(f"label kind {kind!r} is not one of fkd, dbr, online, hard")
    runs = [(e, kind) for e in proto.budgets] + ([(proto.epochs, "hard")] if proto.hard_for(entry) and kind != "hard" else [])
    return RowSet(entry, ipc, images_dev, labels, kind, views, soft, label_bytes, runs, code_version, dbr=dbr,
                  dbr_r=float(mp.get("r", 0.4)), dbr_alpha=float(mp.get("alpha_dbr", 1.0)))


def train_students(state: State, rowsets: list[RowSet], seeds: list[int], student_batch: int,
                   precision: str) -> list[dict]:
    """Every student the rows owe.  ``student_batch`` 1: one at a time (``train_student``, the
    assets' loop); else students of one (IPC, budget) train together in groups of at most
    ``student_batch`` (0: all of them) with ``train_students_bulk``."""
    st, data = state.raw["student"], state.data
    val_eval, test_eval = state.evaluator("val"), state.evaluator("test")
    specs = [(r, seed, int(e), mode) for r in rowsets for seed in seeds for e, mode in r.runs]
    groups: dict[tuple[int, int], list] = {}
    for spec in specs:
        groups.setdefault((spec[0].ipc, spec[2]), []).append(spec)
    rows = []
    for (ipc, epochs), members in groups.items():
        size = len(members) if student_batch <= 0 else student_batch
        for at in range(0, len(members), size):
            chunk = members[at:at + size]
            jobs = []
            for r, seed, e, mode in chunk:
                n = len(r.labels)
                cfg = TrainConfig(epochs=e, lr=float(st["lr"]), weight_decay=float(st["weight_decay"]),
                                  batch_size=min(int(st["batch_size"]), n), optimizer=st["optimizer"],
                                  scheduler="cosine", temperature=float(st["temperature"]),
                                  eval_every=int(st["eval_every"]), seed=int(seed))
                torch.manual_seed(int(seed))
                model = create_model(st["arch"], len(state.classes), in_channels=3, image_size=state.size,
                                     **dict(st.get("arch_kwargs") or {})).to(state.device)
                hard = mode == "hard"
                jobs.append(StudentJob(model, r.images, r.labels, cfg, soft=None if hard else r.soft,
                                       teacher=state.teacher if mode == "online" else None,
                                       views=r.views if (hard or mode == "online") else None,
                                       dbr=None if hard else r.dbr, dbr_r=r.dbr_r, dbr_alpha=r.dbr_alpha))
            what = f"ipc{ipc} e{epochs} x{len(jobs)}" if len(jobs) > 1 else \
                f"{chunk[0][0].entry} ipc{ipc} seed{chunk[0][1]} e{epochs} {chunk[0][3]}"
            with state.timer.stage("students", what, epochs=epochs, students=len(jobs)):
                if len(jobs) == 1 and student_batch == 1:
                    j = jobs[0]
                    results = [train_student(j.model, j.images, j.hard_labels, j.soft, j.cfg, data["mean"], data["std"],
                                             val_eval, state.device, teacher=j.teacher, views=j.views, dbr=j.dbr,
                                             dbr_r=j.dbr_r, dbr_alpha=j.dbr_alpha)]
                    j.model.load_state_dict(results[0].best_state)
                else:
                    results = train_students_bulk(jobs, data["mean"], data["std"], val_eval, state.device,
                                                  precision=precision, render=state.render)
                tests = [test_eval(j.model) for j in jobs]
            for (r, seed, e, mode), res, test_acc in zip(chunk, results, tests):
                hard = mode == "hard"
                rows.append({"method": r.entry, "ipc": ipc, "seed": int(seed), "student": st["arch"], "epochs": e,
                             "label_mode": mode, "best_epoch": int(res.best_epoch), "val_acc": float(res.best_val_acc),
                             "test_acc": float(test_acc), "n_images": len(r.labels),
                             "label_bytes": 0 if hard else r.label_bytes, "code_version": r.code_version})
                print(f"  {r.entry:<10} IPC {ipc:>3} seed {seed} {e:>5} ep {mode:<5} val {res.best_val_acc:.4f} "
                      f"(epoch {res.best_epoch}) test {test_acc:.4f}", flush=True)
    return rows


# ----------------------------------------------------------------------------- main


def load_profile(params_path: Path, profile: str) -> dict:
    """``config.load_params`` without its pydantic schema check: the base blocks deep-merged with the profile."""
    doc = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    profiles = doc.get("profiles") or {}
    if profile not in profiles:
        raise SystemExit(f"{params_path}: unknown profile {profile!r}; defined: {', '.join(sorted(profiles))}")
    base = {k: v for k, v in doc.items() if k not in ("profile", "profiles")}
    return deep_merge(base, profiles[profile] or {})


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")


def find_shared(arg: str | None) -> Path | None:
    cands = [Path(arg)] if arg else [REPO.parent / "shared", REPO / "shared", REPO / ".gpu_table"]
    for c in cands:
        c = c if c.is_absolute() else Path.cwd() / c
        if (c / "datasets" / TARBALLS["train"]).is_file() or (c / TARBALLS["train"]).is_file():
            return c
    if arg:
        raise SystemExit(f"--shared {arg}: no {TARBALLS['train']} in it or in its datasets/ folder")
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cifar10", help="params.yaml profile (default cifar10)")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--shared", default=None,
                    help="folder with datasets/ and models/ (or the tarballs and checkpoints side by side); "
                         "default: ../shared, ./shared or ./.gpu_table beside the repo")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else a new folder under /tmp)")
    ap.add_argument("--ipcs", type=int, nargs="+", default=None, help="IPCs (default 10)")
    ap.add_argument("--ipc1", action="store_true", help="also IPC 1")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="profile entries to run (default: every entry whose base method this script has)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default: the profile's)")
    ap.add_argument("--budgets", type=int, nargs="*", default=None,
                    help="extra student budgets in epochs, each its own run (eval.budgets; default: the profile's)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="override student.epochs (the main budget; for smoke tests, not for the table)")
    ap.add_argument("--hard-labels", choices=("profile", "all", "none"), default="profile",
                    help="hard-label students: the profile's eval.hard_labels, every entry, or none")
    ap.add_argument("--kmeans", choices=("auto", "sklearn", "torch"), default="auto",
                    help="k-means of the kmeans baseline and DDPS's clusters: scikit-learn's (the pipeline's) "
                         "when importable")
    ap.add_argument("--batch-size", type=int, default=None, help="inference batch (default 1024 on CUDA, 256 on CPU)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="JPEG decoding threads")
    ap.add_argument("--tiny", action="store_true",
                    help=f"seconds: {TINY_CLASSES} classes x {TINY_PER_CLASS} images per class, IPC 1-2, 2 student "
                         "epochs, 1 seed, a 1-epoch teacher trained here")
    ap.add_argument("--student-batch", type=int, default=0,
                    help="students trained at once (vmapped): 0 = all of one IPC and budget (default), 1 = one at a time")
    ap.add_argument("--render", choices=("auto", "exact", "batched"), default="auto",
                    help="view rendering: exact per-image (the pipeline's), batched (equal up to float rounding); "
                         "auto = batched on CUDA, exact on CPU")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bulk students' forward precision (bf16: CUDA autocast)")
    ap.add_argument("--synthetic", action="store_true", help="seeded synthetic images instead of the tarballs (tiny sizes)")
    return ap.parse_args(argv)


def tiny_overrides(raw: dict) -> dict:
    """The ``tiny`` profile's scale on the chosen profile: a 1-epoch teacher and a 1-epoch ViT
    scorer trained here (the shared checkpoints know 10 classes), a 1-epoch full-data reference,
    small pools, 2 NRR-DD refinement iterations, 2 EDF experts x 3 epochs (width 16) and 3
    matching iterations of 3 steps, 1 UDD outer iteration of 2 steps, a 3-step DDPS diffusion model
    (16/32 channels) scored with 2 draws and clustered with 2 k-means inits, and ConvNets of width
    16 (every code path of the full run, in seconds on one CPU thread)."""
    over = {
        "data": {"classes": list(raw["data"]["classes"] or [])[:TINY_CLASSES] or None, "max_per_class": TINY_PER_CLASS},
        "teacher": {"weights": None, "epochs": 1, "arch_kwargs": {"width": 16}},
        "vit_scorer": {"weights": None, "epochs": 1},
        "student": {"epochs": 2, "eval_every": 1, "seeds": [0], "arch_kwargs": {"width": 16}},
        "eval": {"budgets": [1], "full_data": {"weights": None, "epochs": 1, "arch_kwargs": {"width": 16}}},
        "methods": {"rded": {"mipc": 8}, "kmeans": {"n_init": 2}},
    }
    mblock = raw.get("methods", {})
    over["methods"] = {k: v for k, v in over["methods"].items() if k in mblock}
    tiny_entry = {  # the tiny profile's nrr / edf / udd / ddps blocks, for every entry of that base method
        "nrr": {"mipc": 8, "iterations": 2},
        "edf": {"iterations": 3, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 2, "initial_max_start_epoch": 1,
                "expansion_end_iteration": 2, "cam_every": 2},
        "udd": {"iterations": 1, "inner_steps": 2, "batch_real": 4, "net_batch_size": 8, "top_p": 2},
        "ddps": {"n_draws": 2, "kmeans_n_init": 2},
    }
    for m, block in mblock.items():   # e.g. nrr, nrr_dbr, ...; edf, mtt, ...; udd, udd_dc, ...; ddps, ddps_flip, ...
        if base_method(m, block) in tiny_entry:
            over["methods"][m] = tiny_entry[base_method(m, block)]
    if any(base_method(m, b) == "edf" for m, b in mblock.items()):   # the tiny profile's experts: 2 x 3 epochs
        over["experts"] = {"num_experts": 2, "epochs": 3, "batch_size": 64, "arch_kwargs": {"width": 16}}
    if any(base_method(m, b) == "ddps" for m, b in mblock.items()):   # the tiny profile's diffusion model: 3 steps
        over["diffusion"] = {"block_out_channels": [16, 32], "steps": 3, "batch_size": 16}
    return deep_merge(raw, over)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    timer = Timer(device)
    raw = load_profile(Path(args.params), args.profile)
    if args.tiny:
        raw = tiny_overrides(raw)
    if args.epochs is not None:
        raw["student"] = {**raw["student"], "epochs": int(args.epochs),
                          "eval_every": min(int(raw["student"]["eval_every"]), int(args.epochs))}
    ev = dict(raw.get("eval") or {})
    if args.budgets is not None:
        ev["budgets"] = list(args.budgets)
    if args.hard_labels != "profile":
        ev["hard_labels"] = args.hard_labels == "all"
    raw["eval"] = ev
    proto = resolve_protocol(raw)
    data = dict(raw["data"])
    classes = [str(c) for c in (data.get("classes") or [])]
    if not classes:
        raise SystemExit(f"profile {args.profile!r} lists no data.classes; this benchmark reads class folders from tarballs")
    ipcs = sorted(set(args.ipcs or ([1, 2] if args.tiny else [10])) | ({1} if args.ipc1 else set()))
    seeds = list(args.seeds if args.seeds is not None else raw["student"]["seeds"])
    mblock = raw["methods"]
    wanted = args.methods or [m for m in mblock if base_method(m, mblock[m]) in METHODS]
    unknown = [m for m in wanted if m not in mblock or base_method(m, mblock[m]) not in METHODS]
    if unknown:
        raise SystemExit(f"--methods {unknown}: not profile entries with a benchmark function "
                         f"(base methods here: {', '.join(METHODS)})")
    # DDPS needs diffusers (imported only here, only when a DDPS entry is selected): without it its
    # entries are skipped with the reason and the rest runs
    ddps_wanted = [m for m in wanted if base_method(m, mblock[m]) == "ddps"]
    ddps_why = ddps_unavailable(raw) if ddps_wanted else None
    if ddps_why:
        wanted = [m for m in wanted if m not in ddps_wanted]
        if not wanted:
            raise SystemExit(f"nothing to run: {', '.join(ddps_wanted)}: {ddps_why}")
    skipped = [m for m in mblock if m not in wanted]
    skip_reasons = {m: (ddps_why if ddps_why and m in ddps_wanted else
                        f"no benchmark function for base method {base_method(m, mblock[m])!r}"
                        if base_method(m, mblock[m]) not in METHODS else "not in --methods") for m in skipped}
    out = Path(args.out or os.environ.get("OUT") or f"/tmp/gpu_table-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    bs = args.batch_size or (1024 if device.type == "cuda" else 256)
    coresets, kmeans_impl, kmeans_cls = import_coresets(args.kmeans)
    ddps_kmeans = import_with_kmeans("dd_assets.methods.ddps.clusters", args.kmeans) if ddps_wanted and not ddps_why \
        else None

    shared = None if args.synthetic else find_shared(args.shared)
    synthetic = args.synthetic or shared is None
    if synthetic and not args.tiny:
        raise SystemExit("no CIFAR-10 tarballs found (--shared); only --tiny may run on synthetic images")
    datasets = models = None
    if shared is not None:
        datasets = shared / "datasets" if (shared / "datasets" / TARBALLS["train"]).is_file() else shared
        models = shared / "models" if (shared / "models").is_dir() else shared
    print(f"gpu_table: profile {args.profile}{' (tiny)' if args.tiny else ''}, device {device}, IPC {ipcs}, "
          f"seeds {seeds}, budgets {list(proto.budgets)}, hard labels {proto.hard_labels}, views {proto.views}, "
          f"entries {wanted}" + (f", skipped {skipped}" if skipped else ""), flush=True)

    train, val, test, origin = build_splits(data, classes, datasets, synthetic, args.workers, timer)
    print(f"data: {origin}: train {len(train.labels)}, val {len(val.labels)}, test {len(test.labels)}", flush=True)
    with timer.stage("to_device"):
        train_dev, val_dev, test_dev = (torch.from_numpy(s.images).to(device) for s in (train, val, test))

    def val_eval_of(x, y):
        return lambda m: evaluate(m, ((x[s:s + bs], y[s:s + bs]) for s in range(0, len(y), bs)),
                                  data["mean"], data["std"], device)

    ctx = {"data": data, "classes": classes, "device": device, "train": train,
           "val_eval": val_eval_of(val_dev, val.labels)}
    teacher, teacher_src = load_or_train(ctx, raw["teacher"], "teacher", models, timer)
    state = State(raw=raw, data=data, classes=classes, proto=proto, device=device, batch_size=bs, train=train, val=val,
                  test=test, train_dev=train_dev, val_dev=val_dev, test_dev=test_dev, teacher=teacher, timer=timer,
                  coresets=coresets, kmeans_cls=kmeans_cls, models=models, model_ctx=ctx,
                  render=("batched" if device.type == "cuda" else "exact") if args.render == "auto" else args.render)
    state.cache["ddps_kmeans"] = ddps_kmeans   # (methods.ddps.clusters, its k-means, the class swapped in)
    with timer.stage("teacher_eval"):
        teacher_val, teacher_test = state.evaluator("val")(teacher), state.evaluator("test")(teacher)
    print(f"teacher ({teacher_src}): val {teacher_val:.4f}, test {teacher_test:.4f}", flush=True)

    full_acc, full_src = float("nan"), "none (eval.hard_labels off)"
    if proto.hard_labels:
        st, fd = raw["student"], dict(ev.get("full_data") or {})
        fblock = {**fd, "arch": st["arch"], "arch_kwargs": fd.get("arch_kwargs") or st.get("arch_kwargs") or {},
                  "pretrained": False}
        same = (fblock.get("weights") and raw["teacher"].get("weights")
                and resolve_weights(fblock["weights"], models) == resolve_weights(raw["teacher"]["weights"], models)
                and fblock["arch"] == raw["teacher"]["arch"]
                and dict(fblock["arch_kwargs"]) == dict(raw["teacher"].get("arch_kwargs") or {}))
        if same:
            full_acc, full_src = teacher_test, f"the teacher checkpoint ({teacher_src})"
        else:
            full_model, full_src = load_or_train(ctx, fblock, "full_data", models, timer)
            with timer.stage("full_data_eval"):
                full_acc = state.evaluator("test")(full_model)
            del full_model
        print(f"full-data reference ({full_src}): test {full_acc:.4f}", flush=True)

    rowsets: list[RowSet] = []
    label_mode = str(raw["labels"]["mode"])
    for ipc in ipcs:
        for entry in wanted:
            mp = method_params(entry, mblock[entry])
            kind = mp.get("labels", label_mode)
            base = base_method(entry, mblock[entry])
            # a label-only variant (nrr_dbr: {method: nrr, labels: dbr}) labels its source entry's images
            src = images_source(mblock, entry)
            with timer.stage("distill", f"{entry} ipc{ipc}" + (f" (images of {src})" if src != entry else "")):
                if ("images", src, ipc) not in state.cache:
                    state.entry = src
                    state.cache[("images", src, ipc)] = METHODS[base](state, ipc, mp)
                images, labels = state.cache[("images", src, ipc)]
            cv = block_hash("gpu_table", {k: raw[k] for k in ("student", "labels")}, ev, mp)
            rowsets.append(label_row(state, entry, ipc, images, labels, kind, cv, mp))
    students = train_students(state, rowsets, seeds, args.student_batch, args.precision)

    with timer.stage("results"):
        sdf = pd.DataFrame(students)
        bases = {m: base_method(m, mblock[m]) for m in wanted}
        hashes = {str(m): str(v) for m, v in sdf.groupby("method")["code_version"].first().items()}
        dataset = "CIFAR-10 (JPEG)" if args.profile == "cifar10" and not synthetic else f"{origin.split(' ')[0]} ({args.profile})"
        if args.tiny:
            dataset += f" tiny: {len(classes)} classes x {TINY_PER_CLASS}"
        # report_assets.results_record: student_augment randaugment rows are their own recipe
        recipes = {m: proto.recipe + recipe_suffix(*STUDENT_RANDAUGMENT) for m in wanted
                   if method_params(m, mblock[m]).get("student_augment", "none") == "randaugment"}
        rows = results_rows(sdf, bases, dataset=dataset, recipe=proto.recipe, main_labels=proto.label_mode,
                            full_data_acc=full_acc, lrs_weight=proto.lrs_weight, commit=git_commit(), params_hash=hashes,
                            recipes=recipes)
        (out / "results.csv").write_text(to_csv(rows))
        (out / "results.md").write_text(markdown_table(rows))
        sdf.to_csv(out / "students.csv", index=False, float_format="%.6f")
    timings = timer.frame()
    timings.to_csv(out / "timings.csv", index=False, float_format="%.4f")
    wall = time.perf_counter() - t_start
    info = {
        "argv": sys.argv[1:] if argv is None else list(argv), "profile": args.profile, "tiny": args.tiny,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "data": origin, "train": len(train.labels), "val": len(val.labels), "test": len(test.labels),
        "teacher": teacher_src, "teacher_val": teacher_val, "teacher_test": teacher_test,
        "full_data": full_src, "full_data_test": full_acc, "kmeans": kmeans_impl, "ipcs": ipcs, "seeds": seeds,
        "budgets": list(proto.budgets), "recipe": proto.recipe, "entries": wanted, "skipped_entries": skipped,
        "skipped_reasons": skip_reasons, "recipes": recipes,
        "vit_scorer": state.cache["vit"][1] if "vit" in state.cache else None,
        "ddps_diffusion": state.cache.get("ddps_info"), "ddps_kmeans": ddps_kmeans[1] if ddps_kmeans else None,
        "edf_experts": state.cache.get("experts_info"), "comp_dd_class_complexity": state.cache.get("comp_dd"),
        "not_run": {f"{m}+dft": "FocusDC's Dynamic Fine-Tuning ruler (focusdc_dft) is not in this benchmark"
                    for m in wanted if "focusdc" in bases.values() and bases[m] in ("focusdc", "random")},
        "students": len(students), "wall_seconds": wall, "commit": git_commit(),
        "student_batch": args.student_batch, "render": state.render, "precision": args.precision,
    }
    (out / "run.json").write_text(json.dumps(info, indent=1, default=str))
    print()
    print(markdown_table(rows))
    print("seconds per stage (exclusive of nested stages)")
    print(timer.table())
    print(f"wall {wall:.1f} s (imports excluded); {len(students)} students; wrote {out}/"
          "{results.csv, results.md, students.csv, timings.csv, run.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
