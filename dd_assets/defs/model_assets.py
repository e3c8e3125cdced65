"""Group ``models``: the teacher (trained here, or loaded from weights), the real-data reference
student (``full_data_student``, with ``eval.hard_labels``) and the teacher's penultimate features
(``scoring``: herding, k-means).  Method-specific models and scores live in the methods' pieces
(:mod:`dd_assets.defs.methods`), which reuse :func:`train_model_asset` and :func:`pool_rows`."""


import json

import dagster as dg
import numpy as np
import polars as pl
import torch

from dd_assets.config import Params
from dd_assets.data.loading import iter_batches, load_rows
from dd_assets.defs.common import histogram_md, image_grid_array
from dd_assets.defs.io import load_teacher, read_class_manifest_pl, read_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.storage import layout
from dd_assets.storage.arrays import write_group
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
    @dd_asset(params, name="teacher", family="teacher", blocks=TEACHER_BLOCKS,
              group_name="models", deps=[dg.AssetDep("manifest", partition_mapping=dg.AllPartitionMapping())],
              kinds={"pytorch", "mlflow"}, pool=GPU_POOL,
              description=(
                  "The teacher/observer: trained on the train split (epoch selected on val) unless "
                  "teacher.weights names a local checkpoint or a timm model; stores checkpoint + class map."
              ))
    def teacher(run: Run):
        return train_model_asset(run, parts, "teacher")

    @dd_asset(params, name="teacher_features", family="teacher_features", blocks=["features"],
              group_name="scoring", deps=[teacher, "manifest"], partitions_def=parts.class_def,
              kinds={"zarr"}, pool=GPU_POOL,
              description="Teacher penultimate features of every train image of a class (herding, k-means).")
    def teacher_features(run: Run):
        from dd_assets.models.factory import penultimate
        from dd_assets.core.imaging import to_model_input

        p, root, dd, part = run.params, run.root, run.dd, run.partition
        data = p.block("data")
        cidx = parts.class_index(part)
        device = dd.torch_device()
        model, _ = load_teacher(root, device)
        rows = read_class_manifest_pl(root, cidx, tuple(p.block("features")["splits"]))
        feats = []
        with torch.no_grad():
            for x, _y in dd.batches(rows, data, f"teacher_features[{part}]"):
                feats.append(penultimate(model, to_model_input(x, data["mean"], data["std"], device)).float().cpu().numpy())
        f = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
        run.upstream([("teacher", None), ("manifest", part)])
        digest = write_group(root, layout.features(cidx),
                             {"source_id": rows["source_id"].to_numpy().astype(np.int64), "features": f.astype(np.float32)},
                             attrs=run.provenance())
        return digest, {"images": int(f.shape[0]), "dim": int(f.shape[1]) if f.ndim == 2 else 0,
                        "feature_norm": histogram_md(np.linalg.norm(f, axis=1), label="L2 norm")}

    out = [teacher, teacher_features]
    if (params.raw.get("eval") or {}).get("hard_labels"):
        out.append(_full_data_asset(params, parts))   # true or a list of entries
    return out


FULL_DATA_BLOCKS = ["eval.full_data", "student.arch", "student.arch_kwargs"]


def full_data_block(p: Params) -> dict:
    """The ``full_data_student`` recipe: ``eval.full_data`` with the student's architecture."""
    st, fd = p.block("student"), p.block("eval.full_data")
    return {**fd, "arch": st["arch"], "arch_kwargs": fd.get("arch_kwargs") or st.get("arch_kwargs") or {},
            "weights": fd.get("weights"), "pretrained": False}


def _full_data_asset(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    @dd_asset(params, name="full_data_student", family="full_data_student", blocks=FULL_DATA_BLOCKS,
              group_name="models", deps=[dg.AssetDep("manifest", partition_mapping=dg.AllPartitionMapping())],
              kinds={"pytorch", "mlflow"}, pool=GPU_POOL,
              description=(
                  "DD-Ranking's real-data reference: the student architecture trained from scratch on every train "
                  "image with hard labels (eval.full_data recipe, epoch selected on val), or the checkpoint "
                  "eval.full_data.weights; its test accuracy is HLR's Acc(real, hard)."
              ))
    def full_data_student(run: Run):
        return train_model_asset(run, parts, "full_data_student", full_data_block(run.params))

    return full_data_student


def train_model_asset(run: Run, parts: Partitions, name: str, block: dict | None = None) -> tuple[str, dict]:
    """Train (or load, when ``<name>.weights`` is set) the model of params block ``name`` (or
    the recipe ``block``) on the train split, select the epoch on val, report val/test, store
    checkpoint + class map. The body of an asset of the kit: returns (data version, metadata)."""
    from dd_assets.core.training import evaluate, train_teacher
    from dd_assets.models import create_model, save_checkpoint

    context, dd, p = run.context, run.dd, run.params
    root, data, t = run.root, p.block("data"), block if block is not None else p.block(name)
    device = dd.torch_device()
    man = read_manifest_pl(root, parts)
    train, val, test = (man.filter(pl.col("split") == s) for s in ("train", "val", "test"))
    if len(val) == 0:
        raise dg.Failure("the val split is empty; raise data.val_fraction (model selection needs it)")
    mean, std = data["mean"], data["std"]
    n_cls = len(parts.classes)

    def batches(rows: pl.DataFrame, seed: int | None = None):
        return iter_batches(rows, data, dd.inference_batch_size if seed is None else int(t["batch_size"]),
                            shuffle_seed=seed, num_workers=dd.num_workers)

    def eval_on(rows: pl.DataFrame):
        return lambda m: evaluate(m, batches(rows), mean, std, device)

    run.upstream([("manifest", c) for c in parts.classes])
    tags = {"dagster_run_id": context.run_id, "asset_key": name, "partition": "",
            "code_version": context.assets_def.code_versions_by_key[context.asset_key], "profile": p.profile}
    with mlflow_run(root, f"dd_assets/{p.profile}", name, tags, {name: t, "data": data}) as mlf:
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
        sample = (train.filter(pl.int_range(pl.len()).over("class_index") < 8)   # each class's first 8, by class
                  .sort("class_index", maintain_order=True))
        mlf.log_image(image_grid_array(load_rows(sample, data), sample["class_index"].to_numpy()), "train_sample_grid.png")
        mlrun = mlf.active_run()
        meta = run.provenance()
        with root.atomic_file(layout.model_checkpoint(name)) as tmp:
            save_checkpoint(tmp, model.cpu(), t["arch"], {**arch_kwargs, "image_size": int(data["image_size"])},
                            parts.classes, extra={**meta, "val_acc": val_acc, "test_acc": test_acc})
        metrics = {"val_acc": val_acc, "test_acc": test_acc, "best_epoch": best_epoch, "history": history,
                   "arch": t["arch"], "train_images": len(train), "val_images": len(val),
                   "test_images": len(test), "mlflow_run_id": mlrun.info.run_id, **meta}
        root.write_bytes(layout.model_metrics(name), json.dumps(metrics, indent=1, default=float).encode())
        digest = state_digest(model, parts.classes)
    return digest, {
        "val_acc": float(val_acc), "test_acc": float(test_acc), "best_epoch": int(best_epoch),
        "classes": n_cls, "mlflow_run": dg.MetadataValue.url(run_link(mlrun)), "checkpoint": root.url(layout.model_checkpoint(name)),
    }

def state_digest(model: torch.nn.Module, class_names: list[str]) -> str:
    """Data version of a model: its weights and class map (not the checkpoint file, whose
    metadata names the run)."""
    import hashlib

    h = hashlib.sha256("\x1f".join(class_names).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def pool_rows(rows: pl.DataFrame, mipc: int, seed: int, class_index: int) -> pl.DataFrame:
    """RDED's pool: ``mipc`` train images of the class (manifest rows), seeded (all when fewer),
    in ascending ``source_id``."""
    rows = rows.sort("source_id", maintain_order=True)
    if len(rows) <= mipc:
        return rows
    keep = np.sort(np.random.default_rng([seed, class_index, 7]).choice(len(rows), mipc, replace=False))
    return rows[keep]
