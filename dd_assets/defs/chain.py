"""The generic chain every ``methods`` entry gets (no method names here): IPC-partitioned
``<entry>_selection`` -> ``<entry>_distilled`` (+ lineage) -> ``<entry>_soft_labels`` ->
``<entry>_students``. A select plugin's selection and composition are built here; a synthesize
plugin's distilled asset comes from its Dagster piece (:mod:`dd_assets.defs.methods`). An entry
differing from an earlier one only in label parameters trains on that entry's images
(:func:`dd_assets.methods.entries.images_source`)."""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl

from dd_assets.config import Params, block_hash
from dd_assets.defs.candidates import candidates_asset, select_rows_pl
from dd_assets.defs.common import histogram_md, histogram_picture, image_grid_png, png_md
from dd_assets.defs.composition import compose_method
from dd_assets.defs.io import load_teacher, read_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.labels_assets import soft_labels_asset
from dd_assets.defs.methods import hook
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.defs.student_assets import build_students
from dd_assets.methods.entries import entry_config, hashed_params, images_source, plugin_of
from dd_assets.methods.plugin import MethodPlugin
from dd_assets.storage import layout
from dd_assets.storage.arrays import write_group
from dd_assets.storage.tables import read_table_pl, write_table

ALL = dg.AllPartitionMapping()


def build(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    out: list[dg.AssetsDefinition] = []
    for entry in params.methods:
        out.extend(entry_chain(params, parts, entry))
    return out


def entry_chain(params: Params, parts: Partitions, entry: str) -> list[dg.AssetsDefinition]:
    mblock = params.block("methods")
    plugin = plugin_of(entry, mblock[entry])
    src = images_source(mblock, entry)
    if src != entry:   # a label-only variant: train on ``src``'s images, computed once
        labels = soft_labels_asset(params, parts, entry, plugin, src)
        return [labels, *_students(params, parts, entry, plugin, labels, f"{src}_distilled", src)]
    if plugin.kind == "synthesize":
        make = hook(plugin.name, "distilled_asset")
        if make is None:
            raise ValueError(f"methods.{entry}: synthesize method {plugin.name!r} needs distilled_asset in "
                             f"dd_assets/defs/methods/{plugin.name}.py")
        distilled = make(params, parts, entry)
    else:
        selection = _selection_asset(params, parts, entry, plugin)
        distilled = _distilled_asset(params, parts, entry, plugin, selection)
    labels = soft_labels_asset(params, parts, entry, plugin, entry)
    built = [distilled, labels, *_students(params, parts, entry, plugin, labels, distilled, entry)]
    return built if plugin.kind == "synthesize" else [selection, *built]


def _students(params, parts, entry, plugin, labels, distilled, src) -> list[dg.AssetsDefinition]:
    students = build_students(params, parts, entry, plugin, labels, distilled, src)
    out = [students]
    for owner in protocol_owners(params, entry):
        out += hook(owner, "protocol_assets")(params, parts, entry, students)
    return out


def protocol_owners(params: Params, entry: str) -> list[str]:
    """The methods whose evaluation protocol also evaluates ``entry``: its own method's
    (``MethodPlugin.protocols``) and, for the baseline's entries, every used method's -- a
    protocol's rows are compared with the baseline under the same protocol."""
    from dd_assets.methods.registry import BASELINE

    mblock = params.block("methods")
    mine = plugin_of(entry, mblock[entry])
    owners = []
    for other in params.methods:
        p = plugin_of(other, mblock[other])
        if p.protocols and p.name not in owners and (p.name == mine.name or mine.name == BASELINE):
            owners.append(p.name)
    return owners


def _selection_asset(params: Params, parts: Partitions, entry: str, plugin: MethodPlugin) -> dg.AssetsDefinition:
    blocks = [f"methods.{entry}"]
    scorer = candidates_asset(params, entry)

    @dd_asset(params, name=f"{entry}_selection", family="selection", blocks=blocks,
              group_name="selection", deps=[dg.AssetDep(scorer, partition_mapping=ALL)],
              partitions_def=parts.ipc_def, kinds={"parquet"},
              description=f"{entry}: {plugin.description}. One row per tile: class, image, tile, source, crop box.")
    def selection(run: Run):
        p, root, ipc = run.params, run.root, run.ipc
        mp = p.block("methods")[entry]
        size = int(p.block("data")["image_size"])
        df = select_rows_pl(plugin, entry_config(entry, mp), ipc, root, parts.classes, size, scorer)
        ups = run.upstream([(scorer, c) for c in parts.classes])
        df = df.with_columns(pl.lit(block_hash(hashed_params(entry, mp)), pl.String).alias("params_hash"),
                             pl.lit(block_hash(ups), pl.String).alias("scorer_version"))
        digest = write_table(root, layout.selection(entry, ipc), df, metadata=run.provenance())
        score = df["score"].to_numpy()
        return digest, {"tiles": len(df), "classes": int(df["class_index"].n_unique()),
                        "score_histogram": histogram_md(score),
                        **histogram_picture(root, f"{entry}_selection", layout.ipc_part(ipc), score,
                                            "score of the selected tiles")}

    return selection


def _distilled_asset(params: Params, parts: Partitions, entry: str, plugin: MethodPlugin,
                     selection: dg.AssetsDefinition) -> dg.AssetsDefinition:
    blocks = [f"methods.{entry}"]
    cfg0 = entry_config(entry, params.block("methods")[entry])
    scorer = candidates_asset(params, entry)
    refines = plugin.refine is not None and plugin.refines(cfg0)

    @dd_asset(params, name=f"{entry}_distilled", family="distilled", blocks=blocks,
              group_name="composition", partitions_def=parts.ipc_def, kinds={"zarr"}, pool=GPU_POOL,
              # a refining method reads the teacher: declared, so lineage and audit show it
              deps=[selection, dg.AssetDep("manifest", partition_mapping=ALL), *(["teacher"] if refines else [])],
              description=f"{entry}: distilled images (Zarr) and the lineage of every tile (Parquet).")
    def distilled(run: Run):
        p, root, ipc = run.params, run.root, run.ipc
        data = p.block("data")
        mp = p.block("methods")[entry]
        cfg = entry_config(entry, mp)
        sel = read_table_pl(root, layout.selection(entry, ipc))
        images, labels, lineage = compose_method(sel, read_manifest_pl(root, parts), data,
                                                 plugin.tiles(cfg, ipc, int(data["image_size"])))
        if refines:
            images = _refine(run, plugin, cfg, images, labels, data)
        lineage = lineage.select(pl.lit(entry, pl.String).alias("method"), pl.lit(ipc, pl.Int64).alias("ipc"),
                                 pl.all(), pl.lit(int(getattr(cfg, "seed", -1)), pl.Int64).alias("seed"),
                                 pl.lit(scorer, pl.String).alias("scorer_asset"))
        run.upstream([(f"{entry}_selection", run.partition)])
        meta = run.provenance()
        digest = write_group(root, layout.distilled(entry, ipc), {"images": images, "labels": labels}, attrs=meta)
        write_table(root, layout.lineage(entry, ipc), lineage, metadata=meta)
        png = image_grid_png(images, labels)
        root.write_bytes(layout.grid(entry, ipc), png)
        return digest, {"images": int(len(images)), "tiles": int(len(lineage)),
                        "grid": png_md(png, f"{entry} IPC {ipc}"), "grid_path": root.url(layout.grid(entry, ipc))}

    return distilled


def _refine(run: Run, plugin: MethodPlugin, cfg, images: np.ndarray, labels: np.ndarray, data: dict) -> np.ndarray:
    """The plugin's pixel refinement of the composites with the teacher (NRR-DD Sec. 3.3)."""
    from tqdm import tqdm

    device = run.dd.torch_device()
    teacher, _ = load_teacher(run.root, device)
    iterations = int(getattr(cfg, "iterations", 1))
    bar = tqdm(desc=f"{plugin.name} refine IPC {run.ipc}", disable=not run.dd.progress, leave=False)

    def on_step(batch: int, it: int, parts: dict) -> None:
        bar.update(1)
        if it % max(1, iterations // 4) == 0 or it == iterations - 1:
            run.log.info(f"{plugin.name.upper()} batch {batch} iteration {it}: "
                         + ", ".join(f"{k}={v:.4g}" for k, v in parts.items()))

    try:
        return plugin.refine(cfg, images, labels, teacher, data["mean"], data["std"], device, on_step)
    finally:
        bar.close()
