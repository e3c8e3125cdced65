"""UDD's Dagster piece (docs/udd.md, "In the graph"): the chain (:mod:`dd_assets.defs.chain`)
calls it for every ``methods`` entry whose base method is ``udd``.

* No shared assets (:func:`shared_assets` validates the entries and returns ``[]``): the proxy network
  is re-initialized every outer iteration and trained on real data inside the loop (Eq. 6).
* ``<entry>_distilled[ipc]`` (group ``composition``): the synthetic set of
  :func:`dd_assets.methods.udd.distill.udd_distill` (Algorithm 1), initialized from the random
  baseline's real images at the entry's ``seed`` (UDD Sec. 2.1: "initialized with real
  samples"); real batches are drawn per class from the train split of the manifest and
  decoded on demand (:class:`dd_assets.data.sampling.ClassSampler`).  Writes the Zarr group
  ``images`` (uint8 ``[N, 3, S, S]``) + ``labels`` like every other method, so soft labels and
  students are the shared chain; the lineage table names each image's real initial image,
  the grid goes to ``reports/grids/`` and the loss curve (mean ``L_syn`` per outer
  iteration) to ``reports/curves/<entry>/``.

Variants are data (:mod:`dd_assets.methods.entries`): ``udd_dc: {method: udd, policy: none, cfc: false}``
is the DC-style gradient-matching row, ``udd_response`` / ``udd_jitter`` the region
policies without CFC, ``udd`` (jitter + CFC) the full method.  The code version of an entry's
distilled asset hashes only its own block (+ ``data.mean``/``data.std``, which the proxy
network reads), so a variant re-versions only its own chain.
"""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl

from dd_assets.config import Params, block_hash
from dd_assets.data.loading import load_rows
from dd_assets.data.sampling import ClassSampler
from dd_assets.defs.common import histogram_md, image_grid_png, png_md
from dd_assets.defs.io import read_class_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.methods.entries import entries_of, method_params
from dd_assets.methods.random.select import select_random
from dd_assets.methods.udd.config import UDDConfig
from dd_assets.methods.udd.params import BOOL_KEYS, FLOAT_LIST_KEYS, INT_KEYS, udd_config  # noqa: F401  (re-exported)
from dd_assets.storage import layout
from dd_assets.storage.arrays import write_group
from dd_assets.storage.tables import write_table

FAMILY = "udd_distilled"
ALL = dg.AllPartitionMapping()
CURVE_KEYS = ("loss", "loss_g", "loss_c", "net_loss", "lr")


def udd_entries(params: Params) -> list[str]:
    """The ``methods`` entries (in params order) that instantiate UDD."""
    return entries_of(params.block("methods"), "udd")


def _entry_config(params: Params, entry: str) -> UDDConfig:
    return udd_config(entry, method_params(entry, params.block("methods")[entry]))


def shared_assets(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    """UDD needs no shared asset; every entry's parameters are checked here (at load)."""
    for entry in udd_entries(params):
        _entry_config(params, entry)
    return []


# ============================================================================ the initial images


def initial_images(train: dict[int, pl.DataFrame], data: dict, classes: list[str], ipc: int, seed: int,
                   ) -> tuple[np.ndarray, np.ndarray, pl.DataFrame]:
    """UDD Sec. 2.1, synthetic images "initialized with real samples": per class the random
    baseline's draw (``registry.BASELINE``, :func:`select_random`: ``np.random.default_rng([seed,
    class])``), so at equal seeds UDD starts from exactly the images ``random`` is evaluated on.

    Returns:
        uint8 ``[C * ipc, 3, S, S]`` (class-major, ascending source_id), labels ``[C * ipc]``
        and one lineage row per image (the compose lineage's columns, whole-image boxes).
    """
    size = int(data["image_size"])
    images, labels, rows = [], [], []
    for cidx, cname in enumerate(classes):
        man = train[cidx]
        ids = man["source_id"].to_numpy().astype(np.int64)
        if len(ids) < ipc:
            raise ValueError(f"class {cname!r} has {len(ids)} train images but IPC needs {ipc}; "
                             "lower the IPC or add images to the class")
        chosen = select_random(ids, ipc, seed, cidx)
        sel = pl.DataFrame({"source_id": np.asarray(chosen, np.int64)}).join(
            man.unique("source_id", keep="first", maintain_order=True), on="source_id", how="left",
            maintain_order="left")   # in the chosen order
        images.append(load_rows(sel, data))
        labels += [cidx] * len(sel)
        for j, r in enumerate(sel.iter_rows(named=True)):
            rows.append({
                "image_index": len(rows), "class_index": cidx, "class_name": r["class_name"], "image_in_class": j,
                "tile": 0, "dest_x0": 0, "dest_y0": 0, "dest_x1": size, "dest_y1": size,
                "source_id": int(r["source_id"]), "source_path": r["path"], "source_sha256": r["sha256"],
                "box_x0": 0, "box_y0": 0, "box_x1": size, "box_y1": size,
                "src_x0": 0, "src_y0": 0, "src_x1": int(r["width"]), "src_y1": int(r["height"]), "score": float("nan"),
            })
    return np.concatenate(images).astype(np.uint8), np.asarray(labels, np.int64), pl.DataFrame(rows)


# ============================================================================ the distilled asset


def distilled_asset(params: Params, parts: Partitions, entry: str) -> dg.AssetsDefinition:
    """``<entry>_distilled``: UDD Algorithm 1 at the partition's IPC."""
    _entry_config(params, entry)  # a bad value fails at load, naming methods.<entry>.<key>

    @dd_asset(
        params, name=f"{entry}_distilled", family=FAMILY, blocks=[f"methods.{entry}", "data.mean", "data.std"],
        group_name="composition",
        deps=[dg.AssetDep("manifest", partition_mapping=ALL)],
        partitions_def=parts.ipc_def,
        description=(
            f"{entry}: UDD (Algorithm 1) -- gradient matching (Eq. 9) of synthetic images initialized from "
            "seeded real samples, a fresh ConvNet-3 proxy per outer iteration trained on real batches (Eq. 6), "
            "under-used regions (policy) upsampled into the matching batch, CFC loss (Eq. 7-8). Zarr images + "
            "lineage of the initial images; loss curve under reports/curves/<entry>/."
        ),
        kinds={"zarr"},
        pool=GPU_POOL,
    )
    def distilled(run: Run):
        p, root, dd = run.params, run.root, run.dd
        data, ipc = p.block("data"), run.ipc
        mp = method_params(entry, p.block("methods")[entry])
        cfg = _entry_config(p, entry)
        device = dd.torch_device()
        train = {c: read_class_manifest_pl(root, c, ("train",)).sort("source_id", maintain_order=True)
                 for c in range(len(parts.classes))}
        init, labels, lineage = initial_images(train, data, parts.classes, ipc, cfg.seed)
        sampler = ClassSampler(train, data)
        res = _run(run, entry, ipc, sampler, init, labels, cfg, data, len(parts.classes), device)
        images = res.images_uint8()
        change = np.abs(images.astype(np.int16) - init.astype(np.int16)).mean(axis=(1, 2, 3)) / 255.0
        lineage = lineage.select(
            pl.lit(entry, pl.String).alias("method"), pl.lit(ipc, pl.Int64).alias("ipc"), pl.all(),
            pl.lit(block_hash(mp), pl.String).alias("params_hash"), pl.lit("", pl.String).alias("scorer_version"),
            pl.lit(int(cfg.seed), pl.Int64).alias("seed"), pl.lit("manifest", pl.String).alias("scorer_asset"),
            pl.lit("init", pl.String).alias("role"),   # the real image the synthetic image started from
            pl.Series("pixel_change", change))
        run.upstream([("manifest", c) for c in parts.classes])
        curve = {k: [float(r[k]) for r in res.loss_curve] for k in CURVE_KEYS}  # no wall times: reproducible
        attrs = run.provenance() | {
            "method": "udd", "policy": cfg.policy, "cfc": cfg.cfc, "iterations": cfg.iterations,
            "inner_steps": cfg.inner_steps, "init": f"random real subset (seed {cfg.seed})",
            "proxy_mue": res.utilization, "proxy_mue_init": res.utilization_init,
            "region_counts": res.region_counts.tolist(), "loss_curve": curve,
            "real_images_decoded": sampler.decoded,
        }
        version = write_group(root, layout.distilled(entry, ipc), {"images": images, "labels": labels}, attrs=attrs)
        write_table(root, layout.lineage(entry, ipc), lineage, metadata=run.provenance())
        grid = image_grid_png(images, labels)
        root.write_bytes(layout.grid(entry, ipc), grid)
        curve_png = _curve_png(curve["loss"], f"{entry} IPC {ipc}")
        if curve_png:
            root.write_bytes(curve_path(entry, ipc), curve_png)
        per_iteration = [r["seconds"] for r in res.loss_curve]
        meta = {
            "images": int(len(images)), "iterations": cfg.iterations, "inner_steps": cfg.inner_steps,
            "policy": cfg.policy, "cfc": cfg.cfc,
            "seconds_per_iteration": float(np.mean(per_iteration)) if per_iteration else 0.0,
            "final_loss": curve["loss"][-1] if curve["loss"] else float("nan"),
            "mean_pixel_change": float(change.mean()), "pixel_change": histogram_md(change, label="mean |x - x_init|"),
            "proxy_mue": res.utilization, "proxy_mue_init": res.utilization_init,
            "real_images_decoded": int(sampler.decoded),
            "grid": png_md(grid, f"{entry} IPC {ipc}"), "grid_path": root.url(layout.grid(entry, ipc)),
        }
        if curve_png:
            meta |= {"loss_curve": png_md(curve_png, f"{entry} loss"), "loss_curve_path": root.url(curve_path(entry, ipc))}
        return version, meta

    return distilled


def curve_path(entry: str, ipc: int) -> str:
    """Where an entry's loss curve lives (``layout.curve``: the entry's own folder)."""
    return layout.curve(entry, layout.ipc_part(ipc))


def _curve_png(losses: list[float], title: str) -> bytes:
    if not losses:
        return b""
    from dd_assets.pictures import loss_curve_png

    return loss_curve_png(losses, title=f"{title}: mean L_syn per outer iteration", ylabel="L_g + L_c")


def _run(run: Run, entry: str, ipc: int, sampler: ClassSampler, init: np.ndarray,
         labels: np.ndarray, cfg: UDDConfig, data: dict, num_classes: int, device):
    """:func:`udd_distill` with a tqdm bar (``dd.progress``) and a log line every ~10 % of iterations
    (a ``ValueError``, e.g. a proxy architecture that does not fit the image size, fails the run
    through the kit)."""
    from tqdm import tqdm

    from dd_assets.methods.udd.distill import udd_distill

    every = max(1, cfg.iterations // 10)
    bar = tqdm(total=cfg.iterations, desc=f"{entry} IPC {ipc}", disable=not run.dd.progress, leave=False)

    def on_step(it: int, rec: dict) -> None:
        bar.update(1)
        if it % every == 0 or it == cfg.iterations - 1:
            run.log.info(
                f"{entry} IPC {ipc}: iteration {it + 1}/{cfg.iterations}: L_syn={rec['loss']:.4g} "
                f"(L_g={rec['loss_g']:.4g}, L_c={rec['loss_c']:.4g}), proxy CE={rec['net_loss']:.3g}, "
                f"lr={rec['lr']:.3g}, {rec['seconds']:.1f}s")

    try:
        return udd_distill(sampler, init, labels, cfg, device, on_step,
                           mean=data["mean"], std=data["std"], num_classes=num_classes)
    finally:
        bar.close()


def curve_table(attrs: dict) -> pl.DataFrame:
    """The loss curve stored in a UDD distilled group's attributes, one row per outer iteration."""
    return pl.DataFrame(attrs.get("loss_curve") or {k: pl.Series(k, [], pl.Float64) for k in CURVE_KEYS})

