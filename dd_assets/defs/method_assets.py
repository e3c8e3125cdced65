"""One chain of IPC-partitioned assets per method (groups ``selection``, ``composition``,
``labels``, ``students``): selection -> distilled images (+ lineage) -> soft labels ->
students.  The chain is built from ``methods_catalog.METHODS``; IPC is the partition."""


import dagster as dg
import numpy as np

from dd_assets.config import Params, block_hash
from dd_assets.defs.common import (
    check_params_current,
    code_version,
    histogram_md,
    histogram_picture,
    image_grid_png,
    png_md,
    provenance,
    result,
    timed,
    upstream_versions,
)
from dd_assets.defs.io import load_teacher, read_manifest
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL, DDResource
from dd_assets.defs.chain import compose_method, select_method, tiles_per_side
from dd_assets.defs.student_assets import build_students
from dd_assets.core.soft_labels import label_array_bytes
from dd_assets.methods_catalog import METHODS, base_method, hashed_params, images_source, method_params
from dd_assets.storage import layout
from dd_assets.storage.arrays import read_group, write_group
from dd_assets.storage.tables import read_table, write_table

LABEL_BLOCKS = ["labels", "student.epochs", "protocol.views"]   # views cover the longest budget

ALL = dg.AllPartitionMapping()


def build(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    out: list[dg.AssetsDefinition] = []
    for name in params.methods:
        out.extend(_build_chain(params, parts, name))
    return out


def _build_chain(params: Params, parts: Partitions, method: str) -> list[dg.AssetsDefinition]:
    spec = METHODS[base_method(method, params.block("methods")[method])]
    src = images_source(params.block("methods"), method)
    if src != method:  # a label-only variant: train on ``src``'s images, computed once
        soft_labels = _soft_labels_asset(params, parts, method, spec, src)
        return [soft_labels, *build_students(params, parts, method, spec, soft_labels, f"{src}_distilled", src)]
    if spec.synthesize:  # pixel-optimizing methods: distilled images come from their own module
        from dd_assets.defs.synth_assets import distilled_asset

        distilled = distilled_asset(params, parts, method, spec)
        soft_labels = _soft_labels_asset(params, parts, method, spec, method)
        return [distilled, soft_labels, *build_students(params, parts, method, spec, soft_labels, distilled, method)]
    mblocks = [f"methods.{method}"]
    scorer = spec.candidates
    if spec.name == "ddps":  # variants with other scoring parameters read their own cluster table
        from dd_assets.defs.ddps_assets import clusters_asset

        scorer = clusters_asset(params, method)

    @dg.asset(
        name=f"{method}_selection",
        group_name="selection",
        deps=[dg.AssetDep(scorer, partition_mapping=ALL)],
        partitions_def=parts.ipc_def,
        code_version=code_version(params, "selection", mblocks),
        description=f"{method}: {spec.description}. One row per tile: class, image, tile, source, crop box.",
        kinds={"parquet"},
    )
    def selection(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, "selection", mblocks)
        root = dd.root()
        ipc = int(context.partition_key)
        mp = method_params(method, p.block("methods").get(method))
        with timed(root, context) as tm:
            try:
                df = select_method(spec.name, mp, ipc, root, parts.classes, p.block("data"), source=scorer)
            except ValueError as err:  # e.g. a class with fewer images than IPC needs
                raise dg.Failure(f"{method} at IPC {ipc}: {err}") from err
            ups = upstream_versions(context, [(scorer, c) for c in parts.classes])
            meta = provenance(context, p, ups)
            df["params_hash"] = block_hash(hashed_params(method, p.block("methods").get(method)))
            df["scorer_version"] = block_hash(ups)
            digest = write_table(root, layout.selection(method, ipc), df, metadata=meta)
        return result(digest, {"tiles": len(df), "classes": int(df["class_index"].nunique()),
                               "score_histogram": histogram_md(df["score"].to_numpy()),
                               **histogram_picture(root, f"{method}_selection", layout.ipc_part(ipc), df["score"].to_numpy(),
                                                   "score of the selected tiles")}, tm.get("seconds"))

    @dg.asset(
        name=f"{method}_distilled",
        group_name="composition",
        # NRR-DD's refinement reads the teacher (BN statistics, CAMs): declared, so lineage and audit show it
        deps=[selection, dg.AssetDep("manifest", partition_mapping=ALL),
              *(["teacher"] if spec.name == "nrr" and method_params(method, params.block("methods")[method])["refine"] else [])],
        partitions_def=parts.ipc_def,
        code_version=code_version(params, "distilled", mblocks),
        description=f"{method}: distilled images (Zarr) and the lineage of every tile (Parquet).",
        kinds={"zarr"},
        pool=GPU_POOL,
    )
    def distilled(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, "distilled", mblocks)
        root, data = dd.root(), p.block("data")
        ipc = int(context.partition_key)
        mp = method_params(method, p.block("methods").get(method))
        with timed(root, context) as tm:
            sel = read_table(root, layout.selection(method, ipc))
            man = read_manifest(root, parts)
            images, labels, lineage = compose_method(sel, man, data, tiles_per_side(spec.name, mp, ipc, int(data["image_size"])))
            if spec.name == "nrr" and mp["refine"]:
                images = _nrr_refine(context, dd, images, labels, mp, data)
            lineage.insert(0, "method", method)
            lineage.insert(1, "ipc", ipc)
            lineage["seed"] = int(mp.get("seed", -1))
            lineage["scorer_asset"] = scorer
            ups = upstream_versions(context, [(f"{method}_selection", context.partition_key)])
            meta = provenance(context, p, ups)
            digest = write_group(root, layout.distilled(method, ipc), {"images": images, "labels": labels}, attrs=meta)
            write_table(root, layout.lineage(method, ipc), lineage, metadata=meta)
            png = image_grid_png(images, labels)
            root.write_bytes(layout.grid(method, ipc), png)
        return result(digest, {"images": int(len(images)), "tiles": int(len(lineage)),
                               "grid": png_md(png, f"{method} IPC {ipc}"), "grid_path": root.url(layout.grid(method, ipc))},
                      tm.get("seconds"))

    soft_labels = _soft_labels_asset(params, parts, method, spec, method)
    return [selection, distilled, soft_labels, *build_students(params, parts, method, spec, soft_labels, distilled, method)]


def _soft_labels_asset(params: Params, parts: Partitions, method: str, spec, src: str) -> dg.AssetsDefinition:
    """Labels of ``src``'s distilled images for entry ``method`` (``src == method`` unless the
    entry is a label-only variant of another entry)."""
    label_blocks = LABEL_BLOCKS + ([f"methods.{method}"] if "labels" in spec.defaults else [])

    @dg.asset(
        name=f"{method}_soft_labels",
        group_name="labels",
        deps=[f"{src}_distilled", "teacher"],
        partitions_def=parts.ipc_def,
        code_version=code_version(params, "soft_labels", label_blocks),
        description="FKD-style replayable labels: E augmentation views per image + teacher top-k logits (fp16).",
        kinds={"zarr"},
        pool=GPU_POOL,
    )
    def soft_labels(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        from dd_assets.evaluation.protocol import resolve as resolve_protocol
        from dd_assets.core.randaugment import STUDENT_RANDAUGMENT, recipe_suffix
        from dd_assets.core.soft_labels import sample_views, teacher_soft_labels

        p = check_params_current(context, "soft_labels", label_blocks)
        root, data, lab = dd.root(), p.block("data"), p.block("labels")
        mp = method_params(method, p.block("methods")[method])
        kind = mp.get("labels", lab["mode"])
        augment = mp.get("student_augment", "none")   # NRR-DD Supp. A.2: 2x RandAugment on the views
        ra = STUDENT_RANDAUGMENT if augment == "randaugment" else None
        ipc = int(context.partition_key)
        device = dd.torch_device()
        with timed(root, context) as tm:
            arrays, _ = read_group(root, layout.distilled(src, ipc))
            images = arrays["images"]
            proto = resolve_protocol(p.raw)
            n_views = proto.views
            views = sample_views(len(images), n_views, int(data["image_size"]), seed=int(lab["seed"]),
                                 scale=proto.crop_scale, cutmix_alpha=proto.cutmix_alpha,
                                 randaugment=ra)
            if kind == "dbr":
                from dd_assets.core.dbr import teacher_dbr_labels

                teacher, _ = load_teacher(root, device)
                dl = teacher_dbr_labels(teacher, images, arrays["labels"], views, data["mean"], data["std"],
                                        batch_size=dd.inference_batch_size, device=device)
                store = dl.to_arrays()
            elif kind == "fkd":
                teacher, _ = load_teacher(root, device)
                k = min(int(lab["topk"]), len(parts.classes))
                sl = teacher_soft_labels(teacher, images, views, k, data["mean"], data["std"],
                                         batch_size=dd.inference_batch_size, device=device)
                store = sl.to_arrays()
            elif kind in ("online", "hard"):
                store = views.to_arrays()
            else:
                raise dg.Failure(f"label kind {kind!r} is not one of fkd, online, hard, dbr")
            nbytes, view_bytes = label_array_bytes(store), views.nbytes()
            ups = upstream_versions(context, [(f"{src}_distilled", context.partition_key), ("teacher", None)])
            meta = provenance(context, p, ups) | {"mode": kind, "label_bytes": nbytes, "view_bytes": view_bytes}
            digest = write_group(root, layout.soft_labels(method, ipc), store, attrs=meta)
        return result(digest, {"mode": kind, "views_per_image": n_views, "label_bytes": nbytes,
                               "crop_scale": str(list(proto.crop_scale)),
                               "recipe": proto.recipe + (recipe_suffix(*ra) if ra else ""),
                               "view_param_bytes": view_bytes, "images_of": src, "student_augment": augment},
                      tm.get("seconds"))

    return soft_labels


def _nrr_refine(context, dd: DDResource, images: np.ndarray, labels: np.ndarray, mp: dict, data: dict) -> np.ndarray:
    """NRR-DD Sec. 3.3: refine only the non-critical regions (CAM < eps) of the composites."""
    from dd_assets.methods.nrr.refine import NRRConfig, refine

    device = dd.torch_device()
    teacher, _ = load_teacher(dd.root(), device)
    cfg = NRRConfig(alpha_bn=float(mp["alpha_bn"]), eps=float(mp["eps"]), lr=float(mp["lr"]),
                    iterations=int(mp["iterations"]), batch_size=int(mp["batch_size"]), seed=int(mp["seed"]),
                    mask_on=mp["mask_on"], r=float(mp["r"]))

    from tqdm import tqdm

    n_batches = -(-len(images) // cfg.batch_size)
    bar = tqdm(total=n_batches * cfg.iterations, desc=f"NRR refine IPC {context.partition_key}",
               disable=not dd.progress, leave=False)

    def on_step(batch: int, it: int, parts: dict) -> None:
        bar.update(1)
        if it % max(1, cfg.iterations // 4) == 0 or it == cfg.iterations - 1:
            context.log.info(f"NRR batch {batch} iteration {it}: " + ", ".join(f"{k}={v:.4g}" for k, v in parts.items()))

    try:
        return refine(images, labels, teacher, None, cfg, data["mean"], data["std"], device,
                      label_refine=bool(mp["label_refine"]), on_step=on_step)
    except ValueError as err:  # e.g. an instance-norm teacher has no BN statistics
        raise dg.Failure(f"NRR refinement: {err}") from err
    finally:
        bar.close()
