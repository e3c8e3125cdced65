"""FocusDC's Dagster piece.

* ``vit_scorer`` (group ``models``): the ViT whose attention FocusDC reads -- a timm ViT
  (``vit_scorer.weights``) or a small ViT trained here;
* ``focusdc_attention[class]`` (``scoring``): class-token attention (Eq. 3-4) and ViT logits of
  every train image, the candidates every FocusDC selection reads;
* ``<entry>_dft_students`` (``students``): the paper's ruler, Dynamic Fine-Tuning (App. 6.2.1):
  each main student fine-tuned on a fresh IPC-per-class random real subset every epoch with an
  online teacher.  Built for every FocusDC entry and -- when there is one -- for every entry of
  the baseline, so ``focusdc+dft`` is compared with ``random+dft`` (issue 21); the chain calls
  :func:`protocol_assets` for both.
"""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl
import torch

from dd_assets.config import Params
from dd_assets.defs.common import histogram_md, histogram_picture, overlay_png, png_md
from dd_assets.defs.io import evaluator, load_teacher, read_class_manifest_pl, read_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.model_assets import train_model_asset
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.methods.plugin import ClassCandidates
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group, write_group
from dd_assets.storage.tables import write_table
from dd_assets.tracking import mlflow_run, run_link

ALL = dg.AllPartitionMapping()
METHOD = "focusdc"
DFT_BLOCKS = ["focusdc_dft", "student"]


def shared_assets(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    return [_vit_asset(params, parts), _attention_asset(params, parts)]


def load_candidates(root: DataRoot, asset: str, class_index: int, class_name: str, size: int) -> ClassCandidates:
    """One class of ``focusdc_attention``: every train image with its attention map, ViT logits
    and the ViT's patch size (the plugin's ``select`` scores key windows from them)."""
    arrays, _ = read_group(root, layout.attention(class_index))
    return ClassCandidates(class_index, class_name, np.asarray(arrays["source_id"], np.int64),
                           arrays={k: arrays[k] for k in ("attention", "logits", "patch_size")})


def protocol_assets(params: Params, parts: Partitions, entry: str,
                    students: dg.AssetsDefinition) -> list[dg.AssetsDefinition]:
    """``<entry>_dft_students``: the DFT ruler on ``entry``'s main students."""
    return [_dft_asset(params, parts, entry, students)]


def dft_entries(params: Params) -> list[str]:
    """The entries with DFT students: every FocusDC entry and, when there is one, every
    baseline entry (the chain's protocol owners, for readers such as the report)."""
    from dd_assets.methods.entries import entries_of
    from dd_assets.methods.registry import BASELINE

    mblock = params.block("methods")
    if not entries_of(mblock, METHOD):
        return []
    mine = set(entries_of(mblock, METHOD)) | set(entries_of(mblock, BASELINE))
    return [m for m in params.methods if m in mine]


# ============================================================================ scoring


def _vit_asset(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    @dd_asset(params, name="vit_scorer", family="vit_scorer", blocks=["vit_scorer"],
              group_name="models", deps=[dg.AssetDep("manifest", partition_mapping=ALL)],
              kinds={"pytorch", "mlflow"}, pool=GPU_POOL,
              description=(
                  "FocusDC's ViT scorer: a timm ViT (vit_scorer.weights: local checkpoint or timm name with "
                  "pretrained) or, when none is given, a small ViT (4 blocks, patch 4, dim 192, 3 heads) "
                  "trained on the train split, epoch selected on val."
              ))
    def vit_scorer(run: Run):
        return train_model_asset(run, parts, "vit_scorer")

    return vit_scorer


def _attention_asset(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    @dd_asset(params, name="focusdc_attention", family="focusdc_attention", blocks=[],
              group_name="scoring", deps=["vit_scorer", "manifest"], partitions_def=parts.class_def,
              kinds={"zarr"}, pool=GPU_POOL,
              description="FocusDC: class-token attention (Eq. 3-4, last block, head-averaged) and ViT logits "
                          "of every train image.")
    def focusdc_attention(run: Run):
        from dd_assets.defs.io import load_model
        from dd_assets.methods.focusdc.attention import attention_maps

        root, data, dd, part = run.root, run.params.block("data"), run.dd, run.partition
        cidx = parts.class_index(part)
        device = dd.torch_device()
        vit, _ = load_model(root, "vit_scorer", device)
        rows = read_class_manifest_pl(root, cidx, ("train",)).sort("source_id", maintain_order=True)
        maps, logits, sample = [], [], []
        for x, _y in dd.batches(rows, data, f"focusdc_attention[{part}]"):
            a, lg = attention_maps(vit, x, data["mean"], data["std"], batch_size=dd.inference_batch_size, device=device)
            maps.append(a)
            logits.append(lg)
            if sum(len(s) for s in sample) < 16:
                sample.append(np.asarray(x))
        attn = np.concatenate(maps)
        first = np.concatenate(sample)[:16].astype(np.uint8)
        png = overlay_png(first, attn[: len(first)])
        root.write_bytes(layout.overlay("focusdc_attention", cidx), png)
        run.upstream([("vit_scorer", None), ("manifest", part)])
        digest = write_group(root, layout.attention(cidx), {
            "source_id": rows["source_id"].to_numpy().astype(np.int64), "attention": attn,
            "logits": np.concatenate(logits), "patch_size": np.asarray(_patch(vit), np.int64),
        }, attrs=run.provenance())
        peak = attn.reshape(len(attn), -1).max(axis=1)
        return digest, {"images": len(attn), "grid": f"{attn.shape[1]}x{attn.shape[2]}",
                        "peak_attention": histogram_md(peak, label="max patch attention"),
                        **histogram_picture(root, "focusdc_attention", layout.cls(cidx), peak, "max patch attention"),
                        "overlays": png_md(png, f"attention overlays, class {part}"),
                        "overlays_path": root.url(layout.overlay("focusdc_attention", cidx))}

    return focusdc_attention


def _patch(vit: torch.nn.Module) -> tuple[int, int]:
    ps = vit.patch_embed.patch_size
    return (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


# ============================================================================ DFT students


def _dft_asset(params: Params, parts: Partitions, entry: str, students: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dd_asset(params, name=f"{entry}_dft_students", family="students", blocks=DFT_BLOCKS,
              group_name="students", deps=[students, "teacher", dg.AssetDep("manifest", partition_mapping=ALL)],
              partitions_def=parts.ipc_def, kinds={"pytorch", "mlflow"}, pool=GPU_POOL,
              description="FocusDC + Dynamic Fine-Tuning (App. 6.2.1): each FocusDC student fine-tuned on a fresh "
                          "IPC-per-class random real subset every epoch; reported as its own row.")
    def dft_students(run: Run):
        df, digest = _train_dft(run, parts, entry)
        acc = df["test_acc"].to_numpy()
        return digest, {"test_acc_mean": float(acc.mean()), "test_acc_std": float(acc.std(ddof=0)), "seeds": len(df)}

    return dft_students


def _train_dft(run: Run, parts: Partitions, entry: str):
    from dd_assets.core.student_training import dynamic_finetune
    from dd_assets.core.training import TrainConfig
    from dd_assets.data.loading import load_rows
    from dd_assets.methods.focusdc.dft import dynamic_finetune_subsets
    from dd_assets.models import create_model

    context, dd, p, root, ipc = run.context, run.dd, run.params, run.root, run.ipc
    data, st, dft = p.block("data"), p.block("student"), p.block("focusdc_dft")
    device = dd.torch_device()
    teacher, _ = load_teacher(root, device)
    man = read_manifest_pl(root, parts)
    train = man.filter(pl.col("split") == "train").unique("source_id", keep="first", maintain_order=True)
    val, test = man.filter(pl.col("split") == "val"), man.filter(pl.col("split") == "test")
    pools = [np.sort(train.filter(pl.col("class_index") == c)["source_id"].to_numpy().astype(np.int64))
             for c in range(len(parts.classes))]
    mean, std = data["mean"], data["std"]

    def eval_on(rows):
        return evaluator(rows, data, dd, device)

    run.upstream([(f"{entry}_students", str(ipc)), ("teacher", None)])
    meta = run.provenance()
    rows = []
    for seed in st["seeds"]:
        subsets = dynamic_finetune_subsets(pools, ipc, int(dft["epochs"]), int(seed))

        def subset(e: int, subsets=subsets):
            rows = pl.DataFrame({"source_id": np.asarray(subsets[e], np.int64)}).join(
                train, on="source_id", how="left", maintain_order="left")   # in the subset's order
            return load_rows(rows, data), rows["class_index"].to_numpy().astype(np.int64)

        model = create_model(st["arch"], len(parts.classes), in_channels=3, image_size=int(data["image_size"]),
                             **dict(st.get("arch_kwargs") or {}))
        with root.fetched(layout.student_checkpoint(entry, ipc, seed)) as (ckpt,):
            model.load_state_dict(torch.load(ckpt, map_location="cpu"))
        n = ipc * len(parts.classes)
        cfg = TrainConfig(epochs=int(dft["epochs"]), lr=float(dft["lr"]), weight_decay=float(st["weight_decay"]),
                          batch_size=min(int(dft["batch_size"]), n), optimizer=st["optimizer"], scheduler="cosine",
                          temperature=float(st["temperature"]), eval_every=int(dft["eval_every"]), seed=int(seed))
        tags = {"dagster_run_id": context.run_id, "asset_key": f"{entry}_dft_students", "partition": str(ipc),
                "code_version": meta["code_version"], "method": f"{entry}+dft", "ipc": str(ipc), "seed": str(seed),
                "profile": p.profile}
        with mlflow_run(root, f"dd_assets/{p.profile}", f"{entry}+dft_ipc{ipc}_seed{seed}", tags,
                        {"student": st, "focusdc_dft": dft, "ipc": ipc}) as mlf:
            every = max(1, int(dft["epochs"]) // 10)   # a log line every ~10 % of the fine-tuning

            def on_epoch(row: dict, mlf=mlf, seed=seed, every=every) -> None:
                mlf.log_metrics({k: float(v) for k, v in row.items() if k != "epoch" and v is not None}, step=int(row["epoch"]))
                if (int(row["epoch"]) + 1) % every == 0:
                    context.log.info(f"{entry}+dft IPC {ipc} seed {seed}: epoch {int(row['epoch']) + 1}/{dft['epochs']} "
                                     + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch" and v is not None))

            res = dynamic_finetune(model, subset, teacher, cfg, mean, std, eval_on(val), device,
                                   steps_per_epoch=int(np.ceil(n / cfg.batch_size)), on_epoch=on_epoch, progress=dd.progress)
            test_acc = eval_on(test)(model)
            mlf.log_metrics({"best_val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch})
            mlrun = mlf.active_run()
        rows.append({
            "method": f"{entry}+dft", "ipc": ipc, "seed": int(seed), "student": st["arch"],
            "epochs": int(st["epochs"]), "label_mode": "online", "best_epoch": int(res.best_epoch),
            "val_acc": float(res.best_val_acc), "test_acc": float(test_acc), "n_images": n,
            "label_bytes": 0, "mlflow_run_id": mlrun.info.run_id, "mlflow_link": run_link(mlrun),
            "code_version": meta["code_version"],
        })
    df = pl.DataFrame(rows, infer_schema_length=None)
    digest = write_table(root, layout.students(f"{entry}+dft", ipc), df, metadata=meta,
                         hash_exclude=("mlflow_run_id", "mlflow_link"))
    return df, digest


def protocol_rows(params: Params) -> list[tuple[str, str, str]]:
    """The report rows of the DFT protocol: (students asset, row name, recipe suffix) per entry."""
    dft = params.block("focusdc_dft")   # extra training on real images: its own ruler, shared with random+dft
    suffix = f"+dft{int(dft['epochs'])}-lr{float(dft['lr']):g}"
    return [(f"{m}_dft_students", f"{m}+dft", suffix) for m in dft_entries(params)]
