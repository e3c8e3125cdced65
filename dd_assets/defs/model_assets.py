"""Group ``models``: the teacher (trained here, or loaded from weights) and the per-class
IPC-independent work that reads it (``scoring``: penultimate features, RDED crop scores)."""


import json
import time

import dagster as dg
import numpy as np
import pandas as pd
import torch

from dd_assets.config import Params, block_hash, load_params
from dd_assets.data.loading import iter_batches, load_rows
from dd_assets.defs.common import (
    MODULE_VERSIONS,
    check_params_current,
    code_version,
    histogram_md,
    histogram_picture,
    image_grid_array,
    overlay_png,
    png_md,
    provenance,
    result,
    timed,
    upstream_versions,
    versioned,
)
from dd_assets.defs.io import load_teacher, read_class_manifest, read_manifest
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL, DDResource
from dd_assets.methods_catalog import base_method, method_params, uses
from dd_assets.storage import layout
from dd_assets.storage.arrays import read_group, write_group
from dd_assets.storage.tables import write_table
from dd_assets.tracking import mlflow_run, run_link

TEACHER_BLOCKS = ["teacher"]


def _teacher_config(t: dict):
    from dd_assets.core.training import TrainConfig

    return TrainConfig(
        epochs=int(t["epochs"]),
        lr=float(t["lr"]),
        weight_decay=float(t["weight_decay"]),
        batch_size=int(t["batch_size"]),
        optimizer=t["optimizer"],
        scheduler=t["scheduler"],
        eval_every=1,
        seed=int(t["seed"]),
    )


def build(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    @dg.asset(
        group_name="models",
        deps=[dg.AssetDep("manifest", partition_mapping=dg.AllPartitionMapping())],
        code_version=code_version(params, "teacher", TEACHER_BLOCKS),
        description=(
            "The teacher/observer: trained on the train split (epoch selected on val) unless "
            "teacher.weights names a local checkpoint or a timm model; stores checkpoint + class map."
        ),
        kinds={"pytorch", "mlflow"},
        pool=GPU_POOL,
    )
    def teacher(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, "teacher", TEACHER_BLOCKS)
        return train_model_asset(context, dd, p, parts, "teacher")

    @dg.asset(
        group_name="scoring",
        deps=[teacher, "manifest"],
        partitions_def=parts.class_def,
        code_version=code_version(params, "teacher_features", ["features"]),
        description="Teacher penultimate features of every train image of a class (herding, k-means).",
        kinds={"zarr"},
        pool=GPU_POOL,
    )
    def teacher_features(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        from dd_assets.models.factory import penultimate
        from dd_assets.core.imaging import to_model_input

        p = check_params_current(context, "teacher_features", ["features"])
        root, data = dd.root(), p.block("data")
        cidx = parts.class_index(context.partition_key)
        device = dd.torch_device()
        with timed(root, context) as tm:
            model, _ = load_teacher(root, device)
            rows = read_class_manifest(root, cidx, tuple(p.block("features")["splits"]))
            feats = []
            with torch.no_grad():
                for x, _y in dd.batches(rows, data, f"teacher_features[{context.partition_key}]"):
                    feats.append(penultimate(model, to_model_input(x, data["mean"], data["std"], device)).float().cpu().numpy())
            f = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
            ups = upstream_versions(context, [("teacher", None), ("manifest", context.partition_key)])
            digest = write_group(root, layout.features(cidx),
                                 {"source_id": rows["source_id"].to_numpy(np.int64), "features": f.astype(np.float32)},
                                 attrs=provenance(context, p, ups))
        return result(digest, {"images": int(f.shape[0]), "dim": int(f.shape[1]) if f.ndim == 2 else 0,
                               "feature_norm": histogram_md(np.linalg.norm(f, axis=1), label="L2 norm")}, tm.get("seconds"))

    out = [teacher, teacher_features]
    if uses(params.block("methods"), "rded"):   # no rded entry: no rded_scores (and no methods.rded to hash)
        out.append(_rded_scores_asset(params, parts, teacher))
    if (params.raw.get("eval") or {}).get("hard_labels"):
        out.append(_full_data_asset(params, parts))   # true or a list of entries
    if uses(params.block("methods"), "focusdc"):
        out += _focusdc_assets(params, parts)
    if uses(params.block("methods"), "nrr"):
        from dd_assets.defs import cam_assets

        cams = cam_assets.build(teacher, parts, params)
        out += [cams, _cidd_asset(params, parts, teacher, cams)]
    if uses(params.block("methods"), "ddps"):
        from dd_assets.defs import ddps_assets

        out += ddps_assets.build(params, parts)
    return out


def _rded_scores_asset(params: Params, parts: Partitions, teacher: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """``rded_scores[class]``: RDED's observer CE of K random-resized crops per pooled image."""
    rded_blocks = ["methods.rded"]

    @dg.asset(
        group_name="scoring",
        deps=[teacher, "manifest"],
        partitions_def=parts.class_def,
        code_version=code_version(params, "rded_scores", rded_blocks),
        description="RDED: observer cross-entropy of K random-resized crops per pooled image; best crop kept per image.",
        kinds={"parquet"},
        pool=GPU_POOL,
    )
    def rded_scores(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        from dd_assets.methods.rded.crops import score_class

        p = check_params_current(context, "rded_scores", rded_blocks)
        root, data = dd.root(), p.block("data")
        mp = method_params("rded", p.block("methods").get("rded"))
        cidx = parts.class_index(context.partition_key)
        device = dd.torch_device()
        with timed(root, context) as tm:
            model, _ = load_teacher(root, device)
            rows = read_class_manifest(root, cidx, ("train",))
            pool = pool_rows(rows, int(mp["mipc"]), int(mp["seed"]), cidx)
            images = load_rows(pool, data)
            t0 = time.perf_counter()
            cands = score_class(
                model, images, np.full(len(pool), cidx, np.int64), pool["source_id"].to_numpy(np.int64),
                num_crop=int(mp["num_crop"]), out_size=int(data["image_size"]), factor=int(mp["factor"]),
                mean=data["mean"], std=data["std"], seed=int(mp["seed"]), class_index=cidx,
                scale=tuple(mp["scale"]), batch_size=dd.inference_batch_size, device=device,
            )
            score_s = time.perf_counter() - t0
            df = pd.DataFrame({
                "source_id": cands.source_id.astype(np.int64), "class_index": cidx,
                "x0": cands.boxes[:, 0], "y0": cands.boxes[:, 1], "x1": cands.boxes[:, 2], "y1": cands.boxes[:, 3],
                "score": cands.score.astype(np.float32),
            })
            ups = upstream_versions(context, [("teacher", None), ("manifest", context.partition_key)])
            digest = write_table(root, layout.scores("rded", cidx), df, metadata=provenance(context, p, ups))
        return result(digest, {"images": len(df), "crops_scored": len(df) * int(mp["num_crop"]),
                               "crops_per_second": round(len(df) * int(mp["num_crop"]) / max(score_s, 1e-9), 1),
                               "ce_histogram": histogram_md(df["score"].to_numpy(), label="CE"),
                               **histogram_picture(root, "rded_scores", layout.cls(cidx), df["score"].to_numpy(),
                                                   "observer CE of the best crop")}, tm.get("seconds"))

    return rded_scores

FULL_DATA_BLOCKS = ["eval.full_data", "student.arch", "student.arch_kwargs"]


def full_data_block(p: Params) -> dict:
    """The ``full_data_student`` recipe: ``eval.full_data`` with the student's architecture."""
    st, fd = p.block("student"), p.block("eval.full_data")
    return {**fd, "arch": st["arch"], "arch_kwargs": fd.get("arch_kwargs") or st.get("arch_kwargs") or {},
            "weights": fd.get("weights"), "pretrained": False}


def _full_data_asset(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    @dg.asset(
        name="full_data_student",
        group_name="models",
        deps=[dg.AssetDep("manifest", partition_mapping=dg.AllPartitionMapping())],
        code_version=code_version(params, "full_data_student", FULL_DATA_BLOCKS),
        description=(
            "DD-Ranking's real-data reference: the student architecture trained from scratch on every train "
            "image with hard labels (eval.full_data recipe, epoch selected on val), or the checkpoint "
            "eval.full_data.weights; its test accuracy is HLR's Acc(real, hard)."
        ),
        kinds={"pytorch", "mlflow"},
        pool=GPU_POOL,
    )
    def full_data_student(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, "full_data_student", FULL_DATA_BLOCKS)
        return train_model_asset(context, dd, p, parts, "full_data_student", full_data_block(p))

    return full_data_student


def _nrr_entry(params: Params) -> str:
    """The first ``methods`` entry built on NRR-DD: its CIDD parameters drive the shared
    scores, so every NRR-DD variant must agree on them.  Also refuses, naming
    ``methods.<entry>.<key>``, a ``beta`` that is neither ``auto`` nor a square and an
    unknown ``crop_score`` / ``confidence``."""
    from dd_assets.methods.nrr.cidd import CONFIDENCES, CROP_SCORES, resolve_beta

    mblock = params.block("methods")
    entries = [n for n in params.methods if base_method(n, mblock[n]) == "nrr"]
    size = int(params.block("data")["image_size"])
    for n in entries:
        mp = method_params(n, mblock[n])
        resolve_beta(mp["beta"], size, f"methods.{n}.beta")
        for key, allowed in (("crop_score", CROP_SCORES), ("confidence", CONFIDENCES)):
            if mp[key] not in allowed:
                raise ValueError(f"methods.{n}.{key} must be one of {', '.join(allowed)}, got {mp[key]!r}")
    cidd = {n: {k: method_params(n, mblock[n])[k] for k in CIDD_KEYS} for n in entries}
    if len({repr(sorted(v.items())) for v in cidd.values()}) > 1:
        raise ValueError(f"NRR-DD variants share one cidd_scores asset and must agree on {CIDD_KEYS}: {cidd}")
    return entries[0]


CIDD_KEYS = ("num_crop", "top_t", "mipc", "scale", "seed", "crop_score", "confidence")


def _cidd_asset(params: Params, parts: Partitions, teacher: dg.AssetsDefinition,
                cams: dg.AssetsDefinition) -> dg.AssetsDefinition:
    entry = _nrr_entry(params)

    def cidd_block(p: Params) -> dict:
        mp = method_params(entry, p.block("methods")[entry])
        return {k: mp[k] for k in CIDD_KEYS}

    @dg.asset(
        group_name="scoring",
        deps=[teacher, "manifest", cams],
        partitions_def=parts.class_def,
        code_version=versioned(block_hash(MODULE_VERSIONS["cidd_scores"], cidd_block(params)), [f"methods.{entry}"]),
        description=(
            "NRR-DD CIDD (Sec. 3.2, Eq. 1, Alg. 1 lines 2-8): per pooled image, random crops ranked by "
            "mean CAM (crop_score); the top crop's teacher score (confidence: true-class CE, higher = less "
            "confident, or highest probability) -- the least confident are kept. IPC-independent."
        ),
        kinds={"parquet"},
        pool=GPU_POOL,
    )
    def cidd_scores(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        from dd_assets.methods.nrr.cidd import cidd_candidates

        p = load_params()
        if block_hash(MODULE_VERSIONS["cidd_scores"], cidd_block(p)) != context.assets_def.code_versions_by_key[context.asset_key]:
            raise dg.Failure("params.yaml changed since the Dagster definitions were loaded; reload the code location")
        root, data, cb = dd.root(), p.block("data"), cidd_block(p)
        cidx = parts.class_index(context.partition_key)
        device = dd.torch_device()
        with timed(root, context) as tm:
            model, _ = load_teacher(root, device)
            pool = pool_rows(read_class_manifest(root, cidx, ("train",)), int(cb["mipc"]), int(cb["seed"]), cidx)
            stored, _ = read_group(root, layout.cams(cidx))
            where = pd.Series(np.arange(len(stored["source_id"])), index=stored["source_id"])
            missing = ~pool["source_id"].isin(where.index)
            if missing.any():
                raise dg.Failure(f"cam_maps[{context.partition_key}] lacks {int(missing.sum())} pooled images; "
                                 "re-materialize cam_maps for this class")
            raw = stored["cam"][where.loc[pool["source_id"]].to_numpy()]
            cands = cidd_candidates(
                model, load_rows(pool, data), np.full(len(pool), cidx, np.int64), pool["source_id"].to_numpy(np.int64),
                num_crop=int(cb["num_crop"]), out_size=int(data["image_size"]), mean=data["mean"], std=data["std"],
                seed=int(cb["seed"]), class_index=cidx, top_t=int(cb["top_t"]), scale=tuple(cb["scale"]),
                crop_score=cb["crop_score"], confidence=cb["confidence"],
                batch_size=dd.inference_batch_size, device=device, raw_cams=raw,
            )
            df = pd.DataFrame({
                "source_id": cands.source_id.astype(np.int64), "class_index": cidx,
                "x0": cands.boxes[:, 0], "y0": cands.boxes[:, 1], "x1": cands.boxes[:, 2], "y1": cands.boxes[:, 3],
                "score": cands.score.astype(np.float32),
            })
            ups = upstream_versions(context, [("teacher", None), ("manifest", context.partition_key),
                                              ("cam_maps", context.partition_key)])
            digest = write_table(root, layout.scores("cidd", cidx), df, metadata=provenance(context, p, ups))
        what = "true-class CE" if cb["confidence"] == "true_class_ce" else "highest probability"
        return result(digest, {"candidates": len(df), "confidence_histogram": histogram_md(df["score"].to_numpy(), label=what),
                               **histogram_picture(root, "cidd_scores", layout.cls(cidx), df["score"].to_numpy(),
                                                   f"teacher {what} of the CAM-critical crop")},
                      tm.get("seconds"))

    return cidd_scores


def _focusdc_assets(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    @dg.asset(
        group_name="models",
        deps=[dg.AssetDep("manifest", partition_mapping=dg.AllPartitionMapping())],
        code_version=code_version(params, "vit_scorer", ["vit_scorer"]),
        description=(
            "FocusDC's ViT scorer: a timm ViT (vit_scorer.weights: local checkpoint or timm name with "
            "pretrained) or, when none is given, a small ViT (4 blocks, patch 4, dim 192, 3 heads) "
            "trained on the train split, epoch selected on val."
        ),
        kinds={"pytorch", "mlflow"},
        pool=GPU_POOL,
    )
    def vit_scorer(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, "vit_scorer", ["vit_scorer"])
        return train_model_asset(context, dd, p, parts, "vit_scorer")

    @dg.asset(
        group_name="scoring",
        deps=[vit_scorer, "manifest"],
        partitions_def=parts.class_def,
        code_version=code_version(params, "focusdc_attention", []),
        description="FocusDC: class-token attention (Eq. 3-4, last block, head-averaged) and ViT logits of every train image.",
        kinds={"zarr"},
        pool=GPU_POOL,
    )
    def focusdc_attention(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        from dd_assets.defs.io import load_model
        from dd_assets.methods.focusdc.attention import attention_maps

        p = check_params_current(context, "focusdc_attention", [])
        root, data = dd.root(), p.block("data")
        cidx = parts.class_index(context.partition_key)
        device = dd.torch_device()
        with timed(root, context) as tm:
            vit, _ = load_model(root, "vit_scorer", device)
            rows = read_class_manifest(root, cidx, ("train",)).sort_values("source_id").reset_index(drop=True)
            maps, logits, sample = [], [], []
            for x, _y in dd.batches(rows, data, f"focusdc_attention[{context.partition_key}]"):
                a, lg = attention_maps(vit, x, data["mean"], data["std"], batch_size=dd.inference_batch_size, device=device)
                maps.append(a)
                logits.append(lg)
                if sum(len(s) for s in sample) < 16:
                    sample.append(np.asarray(x))
            attn = np.concatenate(maps)
            first = np.concatenate(sample)[:16].astype(np.uint8)
            png = overlay_png(first, attn[: len(first)])
            root.write_bytes(layout.overlay("focusdc_attention", cidx), png)
            ups = upstream_versions(context, [("vit_scorer", None), ("manifest", context.partition_key)])
            digest = write_group(root, layout.attention(cidx), {
                "source_id": rows["source_id"].to_numpy(np.int64), "attention": attn,
                "logits": np.concatenate(logits), "patch_size": np.asarray(_patch(vit), np.int64),
            }, attrs=provenance(context, p, ups))
        peak = attn.reshape(len(attn), -1).max(axis=1)
        return result(digest, {"images": len(attn), "grid": f"{attn.shape[1]}x{attn.shape[2]}",
                               "peak_attention": histogram_md(peak, label="max patch attention"),
                               **histogram_picture(root, "focusdc_attention", layout.cls(cidx), peak, "max patch attention"),
                               "overlays": png_md(png, f"attention overlays, class {context.partition_key}"),
                               "overlays_path": root.url(layout.overlay("focusdc_attention", cidx))}, tm.get("seconds"))

    return [vit_scorer, focusdc_attention]


def _patch(vit: torch.nn.Module) -> tuple[int, int]:
    ps = vit.patch_embed.patch_size
    return (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))



def train_model_asset(context: dg.AssetExecutionContext, dd: DDResource, p: Params, parts: Partitions,
                      name: str, block: dict | None = None) -> dg.MaterializeResult:
    """Train (or load, when ``<name>.weights`` is set) the model of params block ``name`` (or
    the recipe ``block``) on the train split, select the epoch on val, report val/test, store
    checkpoint + class map."""
    from dd_assets.core.training import evaluate, train_teacher
    from dd_assets.models import create_model, save_checkpoint

    root, data, t = dd.root(), p.block("data"), block if block is not None else p.block(name)
    device = dd.torch_device()
    man = read_manifest(root, parts)
    train, val, test = (man[man["split"] == s].reset_index(drop=True) for s in ("train", "val", "test"))
    if len(val) == 0:
        raise dg.Failure("the val split is empty; raise data.val_fraction (model selection needs it)")
    mean, std = data["mean"], data["std"]
    n_cls = len(parts.classes)

    def batches(rows: pd.DataFrame, seed: int | None = None):
        return iter_batches(rows, data, dd.inference_batch_size if seed is None else int(t["batch_size"]),
                            shuffle_seed=seed, num_workers=dd.num_workers)

    def eval_on(rows: pd.DataFrame):
        return lambda m: evaluate(m, batches(rows), mean, std, device)

    ups = upstream_versions(context, [("manifest", c) for c in parts.classes])
    tags = {"dagster_run_id": context.run_id, "asset_key": name, "partition": "",
            "code_version": context.assets_def.code_versions_by_key[context.asset_key], "profile": p.profile}
    with timed(root, context) as tm, mlflow_run(root, f"dd_assets/{p.profile}", name, tags, {name: t, "data": data}) as mlf:
        arch_kwargs = dict(t.get("arch_kwargs") or {})
        if t.get("weights"):
            model = create_model(t["arch"], n_cls, in_channels=3, image_size=int(data["image_size"]),
                                 pretrained=bool(t.get("pretrained")), checkpoint=t["weights"], **arch_kwargs).to(device)
            best_epoch, history = -1, []
        else:
            torch.manual_seed(int(t["seed"]))
            model = create_model(t["arch"], n_cls, in_channels=3, image_size=int(data["image_size"]),
                                 **arch_kwargs).to(device)
            steps = int(np.ceil(len(train) / int(t["batch_size"])))

            def on_epoch(row: dict) -> None:
                context.log.info(f"{name} epoch {row['epoch']}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
                mlf.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

            res = train_teacher(
                model, lambda e: batches(train, seed=int(t["seed"]) * 10_000 + e), steps, eval_on(val),
                _teacher_config(t), mean, std, device, augment=True, on_epoch=on_epoch, progress=dd.progress,
            )
            model.load_state_dict(res.best_state)
            best_epoch, history = res.best_epoch, res.history
        val_acc = eval_on(val)(model)
        test_acc = eval_on(test)(model) if len(test) else float("nan")
        mlf.log_metrics({"final_val_acc": val_acc, "final_test_acc": test_acc, "best_epoch": best_epoch})
        sample = pd.concat([g.head(8) for _, g in train.groupby("class_index", sort=True)])
        mlf.log_image(image_grid_array(load_rows(sample, data), sample["class_index"].to_numpy()), "train_sample_grid.png")
        run = mlf.active_run()
        meta = provenance(context, p, ups)
        with root.atomic_file(layout.model_checkpoint(name)) as tmp:
            save_checkpoint(tmp, model.cpu(), t["arch"], {**arch_kwargs, "image_size": int(data["image_size"])},
                            parts.classes, extra={**meta, "val_acc": val_acc, "test_acc": test_acc})
        metrics = {"val_acc": val_acc, "test_acc": test_acc, "best_epoch": best_epoch, "history": history,
                   "arch": t["arch"], "train_images": len(train), "val_images": len(val),
                   "test_images": len(test), "mlflow_run_id": run.info.run_id, **meta}
        root.write_bytes(layout.model_metrics(name), json.dumps(metrics, indent=1, default=float).encode())
        digest = state_digest(model, parts.classes)
    return result(digest, {
        "val_acc": float(val_acc), "test_acc": float(test_acc), "best_epoch": int(best_epoch),
        "classes": n_cls, "mlflow_run": dg.MetadataValue.url(run_link(run)), "checkpoint": root.url(layout.model_checkpoint(name)),
    }, tm.get("seconds"))

def state_digest(model: torch.nn.Module, class_names: list[str]) -> str:
    """Data version of a model: its weights and class map (not the checkpoint file, whose
    metadata names the run)."""
    import hashlib

    h = hashlib.sha256("\x1f".join(class_names).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def pool_rows(rows: pd.DataFrame, mipc: int, seed: int, class_index: int) -> pd.DataFrame:
    """RDED's pool: ``mipc`` train images of the class, seeded (all when fewer)."""
    rows = rows.sort_values("source_id").reset_index(drop=True)
    if len(rows) <= mipc:
        return rows
    keep = np.sort(np.random.default_rng([seed, class_index, 7]).choice(len(rows), mipc, replace=False))
    return rows.iloc[keep].reset_index(drop=True)
