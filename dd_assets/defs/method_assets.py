"""One chain of IPC-partitioned assets per method (groups ``selection``, ``composition``,
``labels``, ``students``): selection -> distilled images (+ lineage) -> soft labels ->
students.  The chain is built from ``methods_catalog.METHODS``; IPC is the partition."""


import dagster as dg
import numpy as np
import pandas as pd
import torch

from dd_assets.config import Params, block_hash
from dd_assets.data.loading import iter_batches
from dd_assets.defs.common import (
    check_params_current,
    code_version,
    histogram_md,
    image_grid_array,
    image_grid_png,
    png_md,
    provenance,
    result,
    timed,
    upstream_versions,
)
from dd_assets.defs.io import load_teacher, read_manifest
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import DDResource
from dd_assets.defs.chain import compose_method, select_method, tiles_per_side
from dd_assets.methods.soft_labels import ViewParams
from dd_assets.methods_catalog import METHODS, base_method, method_params
from dd_assets.storage import layout
from dd_assets.storage.arrays import read_group, write_group
from dd_assets.storage.tables import read_table, write_table
from dd_assets.tracking import mlflow_run, run_link

LABEL_BLOCKS = ["labels", "student.epochs"]
STUDENT_BLOCKS = ["student", "labels.mode"]

ALL = dg.AllPartitionMapping()


def build(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    out: list[dg.AssetsDefinition] = []
    for name in params.methods:
        out.extend(_build_chain(params, parts, name))
    return out


def _build_chain(params: Params, parts: Partitions, method: str) -> list[dg.AssetsDefinition]:
    spec = METHODS[base_method(method, params.block("methods")[method])]
    mblocks = [f"methods.{method}"]
    scorer = spec.candidates

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
                df = select_method(spec.name, mp, ipc, root, parts.classes, p.block("data"))
            except ValueError as err:  # e.g. a class with fewer images than IPC needs
                raise dg.Failure(f"{method} at IPC {ipc}: {err}") from err
            ups = upstream_versions(context, [(scorer, c) for c in parts.classes])
            meta = provenance(context, p, ups)
            df["params_hash"] = block_hash(mp)
            df["scorer_version"] = block_hash(ups)
            digest = write_table(root, layout.selection(method, ipc), df, metadata=meta)
        return result(digest, {"tiles": len(df), "classes": int(df["class_index"].nunique()),
                               "score_histogram": histogram_md(df["score"].to_numpy())}, tm.get("seconds"))

    @dg.asset(
        name=f"{method}_distilled",
        group_name="composition",
        deps=[selection, dg.AssetDep("manifest", partition_mapping=ALL)],
        partitions_def=parts.ipc_def,
        code_version=code_version(params, "distilled", mblocks),
        description=f"{method}: distilled images (Zarr) and the lineage of every tile (Parquet).",
        kinds={"zarr"},
    )
    def distilled(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, "distilled", mblocks)
        root, data = dd.root(), p.block("data")
        ipc = int(context.partition_key)
        mp = method_params(method, p.block("methods").get(method))
        with timed(root, context) as tm:
            sel = read_table(root, layout.selection(method, ipc))
            man = read_manifest(root, parts)
            images, labels, lineage = compose_method(sel, man, data, tiles_per_side(spec.name, mp))
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

    label_blocks = LABEL_BLOCKS + ([f"methods.{method}"] if "labels" in spec.defaults else [])

    @dg.asset(
        name=f"{method}_soft_labels",
        group_name="labels",
        deps=[distilled, "teacher"],
        partitions_def=parts.ipc_def,
        code_version=code_version(params, "soft_labels", label_blocks),
        description="FKD-style replayable labels: E augmentation views per image + teacher top-k logits (fp16).",
        kinds={"zarr"},
    )
    def soft_labels(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        from dd_assets.methods.soft_labels import sample_views, teacher_soft_labels

        p = check_params_current(context, "soft_labels", label_blocks)
        root, data, lab = dd.root(), p.block("data"), p.block("labels")
        kind = method_params(method, p.block("methods")[method]).get("labels", lab["mode"])
        ipc = int(context.partition_key)
        device = dd.torch_device()
        with timed(root, context) as tm:
            arrays, _ = read_group(root, layout.distilled(method, ipc))
            images = arrays["images"]
            n_views = int(lab.get("views") or p.block("student")["epochs"])
            views = sample_views(len(images), n_views, int(data["image_size"]), seed=int(lab["seed"]),
                                 scale=tuple(lab["crop_scale"]), cutmix_alpha=float(lab["cutmix_alpha"]))
            if kind == "dbr":
                from dd_assets.methods.dbr import teacher_dbr_labels

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
            nbytes, view_bytes = _label_bytes(store), views.nbytes()
            ups = upstream_versions(context, [(f"{method}_distilled", context.partition_key), ("teacher", None)])
            meta = provenance(context, p, ups) | {"mode": kind, "label_bytes": nbytes, "view_bytes": view_bytes}
            digest = write_group(root, layout.soft_labels(method, ipc), store, attrs=meta)
        return result(digest, {"mode": kind, "views_per_image": n_views, "label_bytes": nbytes,
                               "view_param_bytes": view_bytes}, tm.get("seconds"))

    @dg.asset(
        name=f"{method}_students",
        group_name="students",
        deps=[soft_labels, distilled, "teacher", dg.AssetDep("manifest", partition_mapping=ALL)],
        partitions_def=parts.ipc_def,
        code_version=code_version(params, "students", STUDENT_BLOCKS),
        description="Students trained from scratch on the distilled set, one per seed; epoch chosen on val, test reported.",
        kinds={"pytorch", "mlflow"},
    )
    def students(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, "students", STUDENT_BLOCKS)
        ipc = int(context.partition_key)
        with timed(dd.root(), context) as tm:
            df, digest = _train_students(context, dd, p, parts, method, ipc)
        acc = df["test_acc"].to_numpy()
        return result(digest, {
            "test_acc_mean": float(acc.mean()), "test_acc_std": float(acc.std(ddof=0)),
            "val_acc_mean": float(df["val_acc"].mean()), "seeds": len(df),
            "mlflow_runs": dg.MetadataValue.md("\n".join(f"- seed {s}: `{u}`" for s, u in zip(df["seed"], df["mlflow_link"], strict=True))),
        }, tm.get("seconds"))

    out = [selection, distilled, soft_labels, students]
    if spec.name == "focusdc":
        out.append(_dft_asset(params, parts, method, students))
    return out


def _nrr_refine(context, dd: DDResource, images: np.ndarray, labels: np.ndarray, mp: dict, data: dict) -> np.ndarray:
    """NRR-DD Sec. 3.3: refine only the non-critical regions (CAM < eps) of the composites."""
    from dd_assets.methods.nrr import NRRConfig, refine

    device = dd.torch_device()
    teacher, _ = load_teacher(dd.root(), device)
    cfg = NRRConfig(alpha_bn=float(mp["alpha_bn"]), eps=float(mp["eps"]), lr=float(mp["lr"]),
                    iterations=int(mp["iterations"]), batch_size=int(mp["batch_size"]), seed=int(mp["seed"]),
                    mask_on=mp["mask_on"], r=float(mp["r"]))

    def on_step(batch: int, it: int, parts: dict) -> None:
        if it % max(1, cfg.iterations // 4) == 0 or it == cfg.iterations - 1:
            context.log.info(f"NRR batch {batch} iteration {it}: " + ", ".join(f"{k}={v:.4g}" for k, v in parts.items()))

    try:
        return refine(images, labels, teacher, None, cfg, data["mean"], data["std"], device,
                      label_refine=bool(mp["label_refine"]), on_step=on_step)
    except ValueError as err:  # e.g. an instance-norm teacher has no BN statistics
        raise dg.Failure(f"NRR refinement: {err}") from err


DFT_BLOCKS = ["focusdc_dft", "student"]


def _dft_asset(params: Params, parts: Partitions, method: str, students: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"{method}_dft_students",
        group_name="students",
        deps=[students, "teacher", dg.AssetDep("manifest", partition_mapping=ALL)],
        partitions_def=parts.ipc_def,
        code_version=code_version(params, "students", DFT_BLOCKS),
        description="FocusDC + Dynamic Fine-Tuning (App. 6.2.1): each FocusDC student fine-tuned on a fresh "
                    "IPC-per-class random real subset every epoch; reported as its own row.",
        kinds={"pytorch", "mlflow"},
    )
    def dft_students(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, "students", DFT_BLOCKS)
        ipc = int(context.partition_key)
        with timed(dd.root(), context) as tm:
            df, digest = _train_dft(context, dd, p, parts, method, ipc)
        acc = df["test_acc"].to_numpy()
        return result(digest, {"test_acc_mean": float(acc.mean()), "test_acc_std": float(acc.std(ddof=0)),
                               "seeds": len(df)}, tm.get("seconds"))

    return dft_students


def _train_dft(context, dd: DDResource, p: Params, parts: Partitions, method: str, ipc: int):
    from dd_assets.data.loading import load_rows
    from dd_assets.methods.focusdc import dynamic_finetune_subsets
    from dd_assets.methods.training import TrainConfig, dynamic_finetune, evaluate
    from dd_assets.models import create_model

    root, data, st, dft = dd.root(), p.block("data"), p.block("student"), p.block("focusdc_dft")
    device = dd.torch_device()
    teacher, _ = load_teacher(root, device)
    man = read_manifest(root, parts)
    train = man[man["split"] == "train"].set_index("source_id")
    val, test = man[man["split"] == "val"], man[man["split"] == "test"]
    pools = [np.sort(train.index[train["class_index"] == c].to_numpy()) for c in range(len(parts.classes))]
    mean, std = data["mean"], data["std"]

    def eval_on(rows):
        return lambda m: evaluate(m, iter_batches(rows, data, dd.inference_batch_size, num_workers=dd.num_workers), mean, std, device)

    ups = upstream_versions(context, [(f"{method}_students", str(ipc)), ("teacher", None)])
    meta = provenance(context, p, ups)
    rows = []
    for seed in st["seeds"]:
        subsets = dynamic_finetune_subsets(pools, ipc, int(dft["epochs"]), int(seed))

        def subset(e: int, subsets=subsets):
            ids = subsets[e]
            return load_rows(train.loc[ids].reset_index(), data), train.loc[ids, "class_index"].to_numpy(np.int64)

        model = create_model(st["arch"], len(parts.classes), in_channels=3, image_size=int(data["image_size"]),
                             **dict(st.get("arch_kwargs") or {}))
        model.load_state_dict(torch.load(root.local(layout.student_checkpoint(method, ipc, seed)), map_location="cpu"))
        n = ipc * len(parts.classes)
        cfg = TrainConfig(epochs=int(dft["epochs"]), lr=float(dft["lr"]), weight_decay=float(st["weight_decay"]),
                          batch_size=min(int(dft["batch_size"]), n), optimizer=st["optimizer"], scheduler="cosine",
                          temperature=float(st["temperature"]), eval_every=int(dft["eval_every"]), seed=int(seed))
        tags = {"dagster_run_id": context.run_id, "asset_key": f"{method}_dft_students", "partition": str(ipc),
                "code_version": meta["code_version"], "method": f"{method}+dft", "ipc": str(ipc), "seed": str(seed),
                "profile": p.profile}
        with mlflow_run(root, f"dd_assets/{p.profile}", f"{method}+dft_ipc{ipc}_seed{seed}", tags,
                        {"student": st, "focusdc_dft": dft, "ipc": ipc}) as mlf:
            def on_epoch(row: dict, mlf=mlf) -> None:
                mlf.log_metrics({k: float(v) for k, v in row.items() if k != "epoch" and v is not None}, step=int(row["epoch"]))

            res = dynamic_finetune(model, subset, teacher, cfg, mean, std, eval_on(val), device,
                                   steps_per_epoch=int(np.ceil(n / cfg.batch_size)), on_epoch=on_epoch, progress=dd.progress)
            test_acc = eval_on(test)(model)
            mlf.log_metrics({"best_val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch})
            run = mlf.active_run()
        rows.append({
            "method": f"{method}+dft", "ipc": ipc, "seed": int(seed), "student": st["arch"],
            "epochs": int(st["epochs"]), "label_mode": "online", "best_epoch": int(res.best_epoch),
            "val_acc": float(res.best_val_acc), "test_acc": float(test_acc), "n_images": n,
            "label_bytes": 0, "mlflow_run_id": run.info.run_id, "mlflow_link": run_link(run),
            "code_version": meta["code_version"],
        })
    df = pd.DataFrame(rows)
    digest = write_table(root, layout.students(f"{method}+dft", ipc), df, metadata=meta,
                         hash_exclude=("mlflow_run_id", "mlflow_link"))
    return df, digest


def _train_students(context, dd: DDResource, p: Params, parts: Partitions, method: str, ipc: int):
    from dd_assets.methods.soft_labels import SoftLabels
    from dd_assets.methods.training import TrainConfig, evaluate, train_student
    from dd_assets.models import create_model

    root, data, st, lab = dd.root(), p.block("data"), p.block("student"), p.block("labels")
    device = dd.torch_device()
    arrays, _ = read_group(root, layout.distilled(method, ipc))
    images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    stored, attrs = read_group(root, layout.soft_labels(method, ipc))
    kind = attrs.get("mode", lab["mode"])
    mp = method_params(method, p.block("methods")[method])
    teacher = soft = dbr = views = None
    if kind == "fkd":
        soft = SoftLabels.from_arrays(stored)
    elif kind == "dbr":
        from dd_assets.methods.dbr import DBRLabels

        dbr = DBRLabels.from_arrays(stored)
    else:
        views = ViewParams.from_arrays(stored)
        if kind == "online":
            teacher, _ = load_teacher(root, device)
    man = read_manifest(root, parts, ("val", "test"))
    val, test = man[man["split"] == "val"], man[man["split"] == "test"]
    mean, std = data["mean"], data["std"]

    def eval_on(rows):
        return lambda m: evaluate(m, iter_batches(rows, data, dd.inference_batch_size, num_workers=dd.num_workers), mean, std, device)

    ups = upstream_versions(context, [(f"{method}_soft_labels", str(ipc)), (f"{method}_distilled", str(ipc)), ("teacher", None)])
    meta = provenance(context, p, ups)
    rows = []
    grid = image_grid_array(images, labels)
    for seed in st["seeds"]:
        cfg = TrainConfig(
            epochs=int(st["epochs"]), lr=float(st["lr"]), weight_decay=float(st["weight_decay"]),
            batch_size=min(int(st["batch_size"]), len(images)), optimizer=st["optimizer"], scheduler="cosine",
            temperature=float(st["temperature"]), eval_every=int(st["eval_every"]), seed=int(seed),
        )
        torch.manual_seed(int(seed))
        model = create_model(st["arch"], len(parts.classes), in_channels=3, image_size=int(data["image_size"]),
                             **dict(st.get("arch_kwargs") or {})).to(device)
        tags = {"dagster_run_id": context.run_id, "asset_key": f"{method}_students", "partition": str(ipc),
                "code_version": meta["code_version"], "method": method, "ipc": str(ipc), "seed": str(seed),
                "profile": p.profile}
        with mlflow_run(root, f"dd_assets/{p.profile}", f"{method}_ipc{ipc}_seed{seed}", tags,
                        {"student": st, "labels": lab, "method": method, "ipc": ipc}) as mlf:
            def on_epoch(row: dict, mlf=mlf) -> None:
                mlf.log_metrics({k: float(v) for k, v in row.items() if k != "epoch" and v is not None}, step=int(row["epoch"]))

            res = train_student(model, images, labels, soft, cfg, mean, std, eval_on(val), device,
                                teacher=teacher, views=views, dbr=dbr, dbr_r=float(mp.get("r", 0.4)),
                                dbr_alpha=float(mp.get("alpha_dbr", 1.0)), on_epoch=on_epoch, progress=dd.progress)
            model.load_state_dict(res.best_state)
            test_acc = eval_on(test)(model)
            with root.atomic_file(layout.student_checkpoint(method, ipc, seed)) as tmp:
                torch.save(res.best_state, tmp)
            mlf.log_metrics({"best_val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch})
            mlf.log_image(grid, "distilled_grid.png")
            run = mlf.active_run()
        rows.append({
            "method": method, "ipc": ipc, "seed": int(seed), "student": st["arch"], "epochs": int(st["epochs"]),
            "label_mode": kind, "best_epoch": int(res.best_epoch), "val_acc": float(res.best_val_acc),
            "test_acc": float(test_acc), "n_images": len(images), "label_bytes": int(_label_bytes(stored)),
            "mlflow_run_id": run.info.run_id, "mlflow_link": run_link(run), "code_version": meta["code_version"],
        })
        context.log.info(f"{method} IPC {ipc} seed {seed}: val {res.best_val_acc:.4f} (epoch {res.best_epoch}), test {test_acc:.4f}")
    df = pd.DataFrame(rows)
    digest = write_table(root, layout.students(method, ipc), df, metadata=meta,
                         hash_exclude=("mlflow_run_id", "mlflow_link"))
    return df, digest


def _label_bytes(stored: dict[str, np.ndarray]) -> int:
    """Bytes of the label arrays proper (FKD: top-k values + indices; DBR: d_org + d_aug),
    without the view parameters every mode stores alike."""
    return int(sum(a.nbytes for k, a in stored.items() if k not in ViewParams.KEYS and k != "num_classes"))
