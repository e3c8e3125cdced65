"""EDF's Dagster piece (docs/edf.md, "In the graph"); its shared assets are built only when a
``methods`` entry uses ``edf``.

* ``expert_trajectories`` (group ``models``): ``K`` experts trained on the train split for ``E``
  epochs (params block ``experts``; batches streamed from the manifest), every epoch's flat
  parameters in :class:`ExpertTrajectories`' own format under ``models/expert_trajectories/``.
  It reads no ``methods`` block and no IPC: every EDF entry (``edf``, ``mtt``, ``edf_cpd``,
  ...) and every IPC reuses it.
* ``comp_dd_complexity`` (``scoring``, per class): Comp-DD (Sec. 3, App. D) complexity of every
  train image, ``1 - share(Grad-CAM >= 0.5)`` under the teacher; ``dd-assets easy-hard`` turns
  the class means into easy / hard class lists.
* ``<entry>_distilled`` (``composition``, per IPC): Algorithm 1 (:func:`edf_distill`) from the
  seeded real images of each class (the ``random`` baseline's images at the same seed), the
  teacher as the Grad-CAM model ``G`` (labels mapped to its classes by name); Zarr ``images`` /
  ``labels`` like every method, so soft labels and students are the shared chain.

How a ``methods`` entry and the ``experts`` block become configs: :mod:`.edf_params`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time

import dagster as dg
import numpy as np
import polars as pl
import torch

from dd_assets.config import Params, block_hash
from dd_assets.data.loading import iter_batches
from dd_assets.defs.candidates import select_rows_pl
from dd_assets.defs.common import histogram_md, histogram_picture, image_grid_png, overlay_png, png_md
from dd_assets.defs.composition import compose_method
from dd_assets.defs.io import load_teacher, read_class_manifest_pl, read_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.methods.edf_params import check_entry, edf_entries, entry_config, expert_config
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.methods import registry
from dd_assets.methods.edf.comp_dd import COMP_DD_THRESHOLD, comp_dd_batch
from dd_assets.methods.edf.distill import edf_distill
from dd_assets.methods.edf.experts import ExpertTrajectories, expert_accuracy, train_experts
from dd_assets.methods.entries import method_params
from dd_assets.pictures import loss_curve_png
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import write_group
from dd_assets.storage.tables import write_table

ALL = dg.AllPartitionMapping()
EXPERTS = "expert_trajectories"
COMP_DD = "comp_dd_complexity"
EXPERT_BLOCKS = ["experts"]
PROVENANCE = f"{layout.EXPERTS_DIR}/provenance.json"


# ============================================================================ the piece's hooks


def shared_assets(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    """Shared EDF assets: ``expert_trajectories`` and ``comp_dd_complexity`` (every entry's
    parameters are checked here, at load, against the experts)."""
    try:
        expert_config(params.block("experts"))
        for entry in edf_entries(params):
            check_entry(params, entry)
    except ValueError as err:
        raise ValueError(f"{params.path}: {err}") from err
    return [_experts_asset(params, parts), _comp_dd_asset(params, parts)]


def initial_selection(ipc: int, root, classes: list[str], size: int, seed: int) -> pl.DataFrame:
    """The random baseline's selection at ``seed`` (``SELECTION_COLUMNS``): EDF's initial images."""
    base = registry.get(registry.BASELINE)
    cfg = base.make_config(base.defaults | {"seed": int(seed)})
    return select_rows_pl(base, cfg, ipc, root, classes, size, "manifest")


# ============================================================================ helpers


def load_experts(root: DataRoot, parts: Partitions) -> ExpertTrajectories:
    """The stored trajectories (memory-mapped on a local root); their classes must be ours."""
    rel = layout.expert_trajectories()
    if not root.exists(rel) or not root.exists(PROVENANCE):
        raise dg.Failure(f"expert trajectories {root.url(rel)} are missing; materialize '{EXPERTS}'")
    names = json.loads(root.read_bytes(PROVENANCE))["class_names"]
    if list(names) != list(parts.classes):
        raise dg.Failure(f"{EXPERTS} were trained on classes {names[:5]}..., the data now has "
                         f"{parts.classes[:5]}...; re-materialize {EXPERTS}")
    if root.is_local:
        return ExpertTrajectories.load(root.local(rel))
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("trajectories.npy", "trajectories.json"):
            root.fs.get_file(root.path(f"{layout.EXPERTS_DIR}/{name}"), os.path.join(tmp, name))
        return ExpertTrajectories.load(os.path.join(tmp, "trajectories.npy"), mmap=False)


def _digest(params: np.ndarray, names: list[str], meta: dict) -> str:
    h = hashlib.sha256(json.dumps([names, meta], sort_keys=True, default=str).encode())
    for k in range(params.shape[0]):
        h.update(np.ascontiguousarray(params[k]).tobytes())
    return h.hexdigest()[:16]


def _progress(dd, desc: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not dd.progress, leave=False)


# ============================================================================ shared assets


def _experts_asset(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    @dd_asset(
        params, name=EXPERTS, family=EXPERTS, blocks=EXPERT_BLOCKS,
        group_name="models",
        deps=[dg.AssetDep("manifest", partition_mapping=ALL)],
        description=(
            "EDF/MTT expert trajectories: K experts (ConvNet-3, instance norm) trained on the train split for E "
            "epochs (SGD, DSA), flat parameters at init and after every epoch ([K, E+1, P] float32 .npy + .json). "
            "Shared by every EDF entry and IPC."
        ),
        kinds={"numpy"},
        pool=GPU_POOL,
    )
    def expert_trajectories(run: Run):
        from dd_assets.models import create_model

        p, root, dd = run.params, run.root, run.dd
        data = p.block("data")
        cfg, k, e = expert_config(p.block("experts"))
        device = dd.torch_device()
        man = read_manifest_pl(root, parts)
        train = man.filter(pl.col("split") == "train").sort("source_id", maintain_order=True)
        val = man.filter(pl.col("split") == "val").sort("source_id", maintain_order=True)
        if len(train) == 0:
            raise dg.Failure("the train split is empty; the experts have nothing to learn from")
        size, n_cls = int(data["image_size"]), len(parts.classes)
        n_params = sum(t.numel() for t in create_model(cfg.arch, n_cls, in_channels=3, image_size=size,
                                                         **cfg.arch_kwargs).parameters() if t.requires_grad)
        per_epoch = math.ceil(len(train) / cfg.batch_size)
        bar = _progress(dd, EXPERTS, k * e * per_epoch)
        every, done, t0 = max(1, k * e // 10), [0], time.perf_counter()

        def source(expert: int, epoch: int):
            seed = (cfg.seed * 1_000_003 + expert) * 10_007 + epoch  # reshuffled per expert and epoch
            for batch in iter_batches(train, data, cfg.batch_size, shuffle_seed=seed, num_workers=dd.num_workers):
                bar.update(1)
                yield batch

        def on_epoch(rec: dict) -> None:
            done[0] += 1
            if done[0] % every == 0 or done[0] == k * e:
                run.log.info(f"expert {rec['expert'] + 1}/{k} epoch {rec['epoch'] + 1}/{e}: loss="
                             f"{rec['train_loss']:.4g} acc={rec['train_acc']:.3f} ({time.perf_counter() - t0:.0f}s)")

        run.upstream([("manifest", c) for c in parts.classes])
        meta = run.provenance()
        with root.atomic_dir(layout.EXPERTS_DIR) as tmp:
            npy = os.path.join(tmp, "trajectories.npy")
            out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(k, e + 1, n_params))
            try:
                traj = train_experts(source, n_cls, k, e, cfg, data["mean"], data["std"], device,
                                     image_size=size, in_channels=3, on_epoch=on_epoch, out=out)
            finally:
                bar.close()
            out.flush()
            traj.save_meta(npy)
            val_acc = expert_accuracy(traj, iter_batches(val, data, dd.inference_batch_size,
                                                         num_workers=dd.num_workers),
                                      data["mean"], data["std"], device) if len(val) else []
            version = _digest(out, parts.classes, {"names": traj.names, "seeds": traj.seeds, "experts": p.block("experts")})
            with open(os.path.join(tmp, "provenance.json"), "w") as fh:
                json.dump({**meta, "class_names": parts.classes, "val_acc_last_epoch": val_acc,
                           "train_images": len(train), "data_version": version}, fh, indent=1)
            nbytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
            last = [h for h in traj.history if h["epoch"] == e - 1]
            del out, traj
        rows = [f"| {r['expert']} | {r['train_acc']:.3f} | {val_acc[r['expert']] if val_acc else float('nan'):.3f} |"
                for r in last]
        return version, {
            "experts": k, "epochs": e, "parameters": int(n_params), "bytes_on_disk": int(nbytes),
            "train_images": len(train), "val_acc_mean": float(np.mean(val_acc)) if val_acc else float("nan"),
            "last_epoch": dg.MetadataValue.md("| expert | train acc | val acc |\n| --- | --- | --- |\n" + "\n".join(rows)),
            "path": root.url(layout.expert_trajectories()),
        }

    return expert_trajectories


def _comp_dd_asset(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    @dd_asset(
        params, name=COMP_DD, family=COMP_DD, blocks=[],
        group_name="scoring",
        deps=["teacher", "manifest"],
        partitions_def=parts.class_def,
        description=(
            "Comp-DD (EDF Sec. 3, App. D): complexity 1 - share(Grad-CAM >= 0.5) of every train image under the "
            "teacher (CAM of the image's own class). `dd-assets easy-hard` ranks the class means."
        ),
        kinds={"parquet"},
        pool=GPU_POOL,
    )
    def comp_dd_complexity(run: Run):
        root, data, dd = run.root, run.params.block("data"), run.dd
        part = run.partition
        cidx = parts.class_index(part)
        device = dd.torch_device()
        teacher, meta = load_teacher(root, device)
        rows = read_class_manifest_pl(root, cidx, ("train",)).sort("source_id", maintain_order=True)
        comps, first, first_maps = [], [], []
        for x, y in dd.batches(rows, data, f"{COMP_DD}[{part}]"):
            comp_b, cams = comp_dd_batch(teacher, x, y.numpy(), parts.classes, meta["class_names"],
                                         data["mean"], data["std"], device)
            comps.append(comp_b)
            if sum(len(f) for f in first) < 16:
                first.append(x.numpy())
                first_maps.append(cams.cpu().numpy())
        comp = np.concatenate(comps) if comps else np.zeros(0)
        n = len(rows)
        df = pl.DataFrame({"source_id": rows["source_id"].to_numpy().astype(np.int64),
                           "class_index": np.full(n, cidx, np.int64),
                           "class_name": pl.Series([parts.classes[cidx]] * n, dtype=pl.String),
                           "complexity": comp, "high_activation_share": 1.0 - comp})
        run.upstream([("teacher", None), ("manifest", part)])
        version = write_table(root, layout.comp_dd(cidx), df,
                              metadata=run.provenance() | {"threshold": COMP_DD_THRESHOLD})
        png = overlay_png(np.concatenate(first)[:16], np.concatenate(first_maps)[:16]) if first else b""
        if png:
            root.write_bytes(layout.overlay(COMP_DD, cidx), png)
        return version, {
            "images": len(df), "class_complexity": float(comp.mean()) if len(comp) else float("nan"),
            "complexity": histogram_md(comp, label="complexity"),
            **histogram_picture(root, COMP_DD, layout.cls(cidx), comp, "Comp-DD complexity per image"),
            **({"cam_overlays": png_md(png, f"Grad-CAM, class {part}"),
                "cam_overlays_path": root.url(layout.overlay(COMP_DD, cidx))} if png else {}),
        }

    return comp_dd_complexity


# ============================================================================ the distilled asset


def distilled_asset(params: Params, parts: Partitions, entry: str) -> dg.AssetsDefinition:
    """``<entry>_distilled``: EDF Algorithm 1 at the partition's IPC."""

    @dd_asset(
        params, name=f"{entry}_distilled", family="edf_distilled", blocks=["experts", f"methods.{entry}"],
        group_name="composition",
        deps=[EXPERTS, "teacher", dg.AssetDep("manifest", partition_mapping=ALL)],
        partitions_def=parts.ipc_def,
        description=(
            f"{entry}: EDF (Algorithm 1) from seeded real images -- trajectory matching against "
            "expert_trajectories, Common Pattern Dropout (Eq. 2) and teacher Grad-CAM-weighted pixel updates "
            "(Eq. 3-5) as switched on; images + labels (Zarr), lineage of the initial images (Parquet)."
        ),
        kinds={"zarr"},
        pool=GPU_POOL,
    )
    def distilled(run: Run):
        p, root, dd = run.params, run.root, run.dd
        data, ipc = p.block("data"), run.ipc
        mp = method_params(entry, p.block("methods")[entry])
        device = dd.torch_device()
        cfg = entry_config(entry, mp, ipc)
        sel = initial_selection(ipc, root, parts.classes, int(data["image_size"]), int(mp["seed"]))
        ups = run.upstream([(EXPERTS, None), ("teacher", None)])
        sel = sel.with_columns(pl.lit(block_hash(mp), pl.String).alias("params_hash"),
                               pl.lit(block_hash(ups), pl.String).alias("scorer_version"))
        init, labels, lineage = compose_method(sel, read_manifest_pl(root, parts), data, 1)
        traj = load_experts(root, parts)
        teacher, meta = load_teacher(root, device) if cfg.use_dae else (None, {"class_names": parts.classes})
        cfg.cam_batch_size = dd.inference_batch_size
        total = cfg.match.iterations
        bar, every, t0 = _progress(dd, f"{entry}_distilled[{ipc}]", total), max(1, total // 10), time.perf_counter()

        def on_step(t: int, m: dict) -> None:
            bar.update(1)
            if t % every == 0 or t == total - 1:
                run.log.info(f"{entry} IPC {ipc} iteration {t + 1}/{total}: loss={m['loss']:.4g} "
                             f"lr={m['lr']:.4g} expert={int(m['expert'])} start={int(m['start_epoch'])} "
                             f"({time.perf_counter() - t0:.0f}s)")

        threads = torch.get_num_threads()
        if dd.threads == 0 and device.type == "cpu":  # small unrolled batches: 1 thread is ~10x faster on
            torch.set_num_threads(1)                     # a busy 2-core machine (docs/edf.md)
        try:
            res = edf_distill(init, labels, traj, teacher, cfg, data["mean"], data["std"], device,
                              parts.classes, meta["class_names"], on_step)
        except FloatingPointError as err:
            raise dg.Failure(f"{entry} at IPC {ipc}: {err}") from err
        finally:
            bar.close()
            torch.set_num_threads(threads)
        loop_s = time.perf_counter() - t0
        lineage = lineage.select(pl.lit(entry, pl.String).alias("method"), pl.lit(ipc, pl.Int64).alias("ipc"),
                                 pl.all(), pl.lit(int(mp["seed"]), pl.Int64).alias("seed"),
                                 pl.lit(EXPERTS, pl.String).alias("scorer_asset"))
        meta_out = run.provenance() | {"init": f"random baseline images, seed {int(mp['seed'])}"}
        arrays = {"images": res.images, "labels": res.labels.astype(np.int64), "loss": res.loss,
                  "lr_curve": res.lr_curve, "learned_lr": np.asarray([res.lr])}
        if res.soft_labels is not None:
            arrays["learned_logits"] = res.soft_labels
        version = write_group(root, layout.distilled(entry, ipc), arrays, attrs=meta_out)
        write_table(root, layout.lineage(entry, ipc), lineage, metadata=meta_out)
        grid = image_grid_png(res.images, res.labels)
        root.write_bytes(layout.grid(entry, ipc), grid)
        curve = loss_curve_png(res.loss.tolist(), f"{entry} IPC {ipc}: trajectory matching loss", "matching loss")
        curve_rel = layout.curve(entry, layout.ipc_part(ipc))  # the entry's distillation curve
        root.write_bytes(curve_rel, curve)
        tail = res.loss[-max(1, len(res.loss) // 10):] if len(res.loss) else np.zeros(1)
        share = res.extra.get("discriminative_share") or [float("nan")]
        return version, {
            "images": int(len(res.images)), "iterations": int(total), "syn_steps": cfg.match.syn_steps,
            "batch_syn": min(int(cfg.match.batch_syn or len(labels)), len(labels)), "use_cpd": cfg.use_cpd,
            "use_dae": cfg.use_dae, "alpha": cfg.alpha, "beta": cfg.beta, "cam_every": cfg.cam_every,
            "final_loss": float(np.mean(tail)), "learned_lr": float(res.lr), "skipped_iterations": int(res.skipped),
            "cam_refreshes": len(res.extra.get("cam_iterations", [])),
            "discriminative_share_first_last": f"{share[0]:.3f} / {share[-1]:.3f}",
            "mean_abs_pixel_change": float(np.abs(res.images.astype(np.int16) - init.astype(np.int16)).mean()),
            "seconds_per_iteration": round(loop_s / max(1, total), 3),
            "grid": png_md(grid, f"{entry} IPC {ipc}"), "grid_path": root.url(layout.grid(entry, ipc)),
            "loss_curve": png_md(curve, "matching loss"), "loss_curve_path": root.url(curve_rel),
        }

    return distilled
