"""Group ``students``: students trained from scratch on each distilled set (one MLflow run
per seed, epoch selected on val, test reported once).  Protocol students beyond this ruler
(FocusDC's Dynamic Fine-Tuning) come from the methods' pieces (``protocol_assets``)."""


import contextlib

import dagster as dg
import numpy as np
import polars as pl
import torch

from dd_assets.config import Params
from dd_assets.defs.common import image_grid_array, provenance, upstream_versions
from dd_assets.defs.io import evaluator, load_teacher, read_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL, DDResource
from dd_assets.defs.student_resume import FinishedStudents
from dd_assets.core.soft_labels import ViewParams, label_array_bytes
from dd_assets.methods.entries import method_params
from dd_assets.methods.plugin import MethodPlugin
from dd_assets.storage import layout
from dd_assets.storage.arrays import read_group
from dd_assets.storage.tables import write_table
from dd_assets.tracking import clickable, mlflow_run, run_link

ALL = dg.AllPartitionMapping()


def _budget_md(df: pl.DataFrame) -> str:
    g = (df.group_by(["label_mode", "epochs"])
         .agg(pl.col("test_acc").mean().alias("mean"), pl.col("test_acc").std().alias("std"), pl.len().alias("count"))
         .sort(["label_mode", "epochs"]))
    lines = ["| labels | epochs | test acc (%) | students |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['label_mode']} | {r['epochs']} | {100 * r['mean']:.2f} ± "
              f"{100 * (r['std'] if r['count'] > 1 and r['std'] is not None else 0):.2f} | {r['count']} |"
              for r in g.iter_rows(named=True)]
    return "\n".join(lines)


def student_blocks(entry: str, plugin: MethodPlugin, params: Params | None = None) -> list[str]:
    """Blocks an entry's students read: the student recipe, the label mode, the budgets and
    hard-label settings, and the entry's own block when its method carries student-loss
    parameters (NRR-DD's DBR r, alpha_dbr).  ``eval.hard_seeds`` is read only by entries that
    train hard-label students, so only their versions depend on it."""
    blocks = ["student", "labels.mode", "eval.budgets", "eval.hard_labels"]
    if params is not None and "hard_seeds" in (params.raw.get("eval") or {}):
        from dd_assets.evaluation.protocol import resolve

        if resolve(params.raw).hard_for(entry):
            blocks.append("eval.hard_seeds")
    return blocks + ([f"methods.{entry}"] if "alpha_dbr" in plugin.defaults else [])


def build_students(params: Params, parts: Partitions, entry: str, plugin: MethodPlugin,
                   soft_labels: dg.AssetsDefinition | str, distilled: dg.AssetsDefinition | str,
                   src: str) -> dg.AssetsDefinition:
    """``<entry>_students``: students of entry ``entry``, trained on the distilled images of
    entry ``src`` (``entry`` itself unless it is a label-only variant)."""
    blocks = student_blocks(entry, plugin, params)

    @dd_asset(params, name=f"{entry}_students", family="students", blocks=blocks,
              group_name="students", deps=[soft_labels, distilled, "teacher", dg.AssetDep("manifest", partition_mapping=ALL)],
              partitions_def=parts.ipc_def, kinds={"pytorch", "mlflow"}, pool=GPU_POOL,
              description="Students trained from scratch on the distilled set, one per seed; epoch chosen on val, "
                          "test reported.")
    def students(run: Run):
        df, digest = _train_students(run.context, run.dd, run.params, parts, entry, run.ipc, src)
        main = df.filter((pl.col("epochs") == int(run.params.block("student")["epochs"]))
                         & (pl.col("label_mode") != "hard"))
        acc = main["test_acc"].to_numpy()
        return digest, {
            "test_acc_mean": float(acc.mean()), "test_acc_std": float(acc.std(ddof=0)),
            "val_acc_mean": float(np.mean(main["val_acc"].to_numpy())) if len(main) else float("nan"),
            "seeds": len(main), "students": len(df),
            "by_budget": dg.MetadataValue.md(_budget_md(df)),
            "mlflow_runs": dg.MetadataValue.md("\n".join(
                f"- [seed {r['seed']}, {r['epochs']} epochs, {r['label_mode']}]({clickable(r['mlflow_link'])})"
                for r in df.iter_rows(named=True))),
        }

    return students


def _train_students(context, dd: DDResource, p: Params, parts: Partitions, method: str, ipc: int, src: str):
    from dd_assets.evaluation.protocol import resolve as resolve_protocol
    from dd_assets.evaluation.protocol import student_runs
    from dd_assets.core.soft_labels import SoftLabels
    from dd_assets.core.student_training import train_student
    from dd_assets.core.training import TrainConfig
    from dd_assets.models import create_model

    root, data, st, lab = dd.root(), p.block("data"), p.block("student"), p.block("labels")
    device = dd.torch_device()
    arrays, _ = read_group(root, layout.distilled(src, ipc))
    images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    stored, attrs = read_group(root, layout.soft_labels(method, ipc))
    kind = attrs.get("mode", lab["mode"])
    mp = method_params(method, p.block("methods")[method])
    teacher = soft = dbr = views = None
    if kind == "fkd":
        soft = SoftLabels.from_arrays(stored)
    elif kind == "dbr":
        from dd_assets.core.dbr import DBRLabels

        dbr = DBRLabels.from_arrays(stored)
    else:
        views = ViewParams.from_arrays(stored)
        if kind == "online":
            teacher, _ = load_teacher(root, device)
    man = read_manifest_pl(root, parts, ("val", "test"))
    val, test = man.filter(pl.col("split") == "val"), man.filter(pl.col("split") == "test")
    mean, std = data["mean"], data["std"]

    def eval_on(rows):
        return evaluator(rows, data, dd, device)

    ups = upstream_versions(context, [(f"{method}_soft_labels", str(ipc)), (f"{src}_distilled", str(ipc)), ("teacher", None)])
    meta = provenance(context, p, ups)
    rows = []
    grid = image_grid_array(images, labels)
    proto = resolve_protocol(p.raw)
    stored_views = soft.views if soft is not None else dbr.views if dbr is not None else views
    # every budget with the entry's labels, then (eval.hard_labels) one hard-label student at the
    # main budget on the same views (CutMix-mixed one-hot targets: DD-Ranking's syn-hard for HLR)
    finished = FinishedStudents(root, method, ipc, meta["code_version"], ups)
    pending: dict[tuple[int, str], list[tuple[int, int]]] = {}   # (epochs, mode) -> [(order, seed)]
    order_of: dict[tuple[int, int, str], int] = {}
    for order, (seed, epochs, mode) in enumerate(student_runs(proto, method, kind, st["seeds"])):
        order_of[(int(seed), int(epochs), mode)] = order
        kept = finished.get(seed, epochs, mode, checkpoint=epochs == proto.epochs and mode != "hard")
        if kept is not None:   # finished before an interruption, same key: not trained again
            rows.append(kept)
            context.log.info(f"{method} IPC {ipc} seed {seed} {epochs} epochs {mode}: kept from the interrupted "
                             f"run (val {kept['val_acc']:.4f}, test {kept['test_acc']:.4f})")
            continue
        pending.setdefault((int(epochs), mode), []).append((order, int(seed)))

    def config(seed: int, epochs: int) -> TrainConfig:
        return TrainConfig(
            epochs=int(epochs), lr=float(st["lr"]), weight_decay=float(st["weight_decay"]),
            batch_size=min(int(st["batch_size"]), len(images)), optimizer=st["optimizer"], scheduler="cosine",
            temperature=float(st["temperature"]), eval_every=int(st["eval_every"]), seed=int(seed),
        )

    def fresh_model(seed: int):
        torch.manual_seed(int(seed))
        return create_model(st["arch"], len(parts.classes), in_channels=3, image_size=int(data["image_size"]),
                            **dict(st.get("arch_kwargs") or {})).to(device)

    def open_run(seed: int, epochs: int, mode: str):
        tags = {"dagster_run_id": context.run_id, "asset_key": f"{method}_students", "partition": str(ipc),
                "code_version": meta["code_version"], "method": method, "ipc": str(ipc), "seed": str(seed),
                "epochs": str(epochs), "label_mode": mode, "profile": p.profile}
        return mlflow_run(root, f"dd_assets/{p.profile}", f"{method}_ipc{ipc}_seed{seed}_e{epochs}_{mode}", tags,
                          {"student": {**st, "epochs": epochs}, "labels": lab, "label_mode": mode, "method": method,
                           "ipc": ipc, "recipe": proto.recipe})

    def record(seed: int, epochs: int, mode: str, model, res, live_mlf=None) -> None:
        """Test the selected student once, keep the main student's checkpoint, log its MLflow run
        (``live_mlf``: the run it trained in; bulk students get theirs, history included, now)."""
        main_student = epochs == proto.epochs and mode != "hard"
        with contextlib.ExitStack() as stack:
            mlf = live_mlf or stack.enter_context(open_run(seed, epochs, mode))
            if live_mlf is None:
                for row in res.history:
                    mlf.log_metrics({k: float(v) for k, v in row.items() if k != "epoch" and v is not None},
                                    step=int(row["epoch"]))
            model.load_state_dict(res.best_state)
            test_acc = eval_on(test)(model)
            if main_student:   # the main student (FocusDC's DFT fine-tunes it)
                with root.atomic_file(layout.student_checkpoint(method, ipc, seed)) as tmp:
                    torch.save(res.best_state, tmp)
                mlf.log_image(grid, "distilled_grid.png")
            mlf.log_metrics({"best_val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch})
            run = mlf.active_run()
        hard = mode == "hard"
        rows.append({
            "method": method, "ipc": ipc, "seed": int(seed), "student": st["arch"], "epochs": int(epochs),
            "label_mode": mode, "best_epoch": int(res.best_epoch), "val_acc": float(res.best_val_acc),
            "test_acc": float(test_acc), "n_images": len(images), "label_bytes": 0 if hard else label_array_bytes(stored),
            "mlflow_run_id": run.info.run_id, "mlflow_link": run_link(run), "code_version": meta["code_version"],
        })
        finished.put(seed, epochs, mode, rows[-1])
        context.log.info(f"{method} IPC {ipc} seed {seed} {epochs} epochs {mode}: val {res.best_val_acc:.4f} "
                         f"(epoch {res.best_epoch}), test {test_acc:.4f}")

    def labels_for(mode: str) -> dict:
        hard = mode == "hard"
        return {"soft": None if hard else soft, "teacher": None if hard else teacher,
                "views": stored_views if hard else views, "dbr": None if hard else dbr}

    dbr_r, dbr_alpha = float(mp.get("r", 0.4)), float(mp.get("alpha_dbr", 1.0))
    size = max(1, int(dd.student_batch))
    if size == 1:   # the historical order: student_runs' own
        chunks = [((e, m), [seed]) for e, m, _, seed in sorted(((e, m, o, sd) for (e, m), ms in pending.items()
                                                                for o, sd in ms), key=lambda t: t[2])]
    else:           # seeds of one (budget, label mode) together, up to student_batch at a time
        chunks = [(key, [sd for _, sd in ms[at:at + size]]) for key, ms in pending.items()
                  for at in range(0, len(ms), size)]
    for (epochs, mode), chunk in chunks:
        if size == 1:   # one at a time: the loop every stored result so far came from, metrics live
            seed = chunk[0]
            with open_run(seed, epochs, mode) as mlf:
                every = max(1, int(epochs) // 10)   # a log line every ~10 % (an IPC-10 CIFAR student is ~10 min)

                def on_epoch(row: dict, mlf=mlf, seed=seed, epochs=epochs, mode=mode, every=every) -> None:
                    mlf.log_metrics({k: float(v) for k, v in row.items() if k != "epoch" and v is not None},
                                    step=int(row["epoch"]))
                    if (int(row["epoch"]) + 1) % every == 0:
                        context.log.info(f"{method} IPC {ipc} seed {seed} ({mode}): epoch {int(row['epoch']) + 1}/"
                                         f"{epochs} " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                                  if k != "epoch" and v is not None))

                model = fresh_model(seed)
                lm = labels_for(mode)
                res = train_student(model, images, labels, lm["soft"], config(seed, epochs), mean, std, eval_on(val),
                                    device, teacher=lm["teacher"], views=lm["views"], dbr=lm["dbr"], dbr_r=dbr_r,
                                    dbr_alpha=dbr_alpha, on_epoch=on_epoch, progress=dd.progress)
                record(seed, epochs, mode, model, res, live_mlf=mlf)
            continue
        from dd_assets.core.bulk_students import StudentJob, train_students_bulk

        jobs = [StudentJob(fresh_model(seed), images, labels, config(seed, epochs), dbr_r=dbr_r, dbr_alpha=dbr_alpha,
                           **labels_for(mode)) for seed in chunk]
        context.log.info(f"{method} IPC {ipc}: {len(jobs)} students ({epochs} epochs, {mode}) trained at once, "
                         f"seeds {chunk}")
        results = train_students_bulk(jobs, mean, std, eval_on(val), device)
        for seed, job, res in zip(chunk, jobs, results):
            record(seed, epochs, mode, job.model, res)
    rows.sort(key=lambda r: order_of[(int(r["seed"]), int(r["epochs"]), r["label_mode"])])
    df = pl.DataFrame(rows, infer_schema_length=None)
    digest = write_table(root, layout.students(method, ipc), df, metadata=meta,
                         hash_exclude=("mlflow_run_id", "mlflow_link"))
    finished.clear()
    return df, digest


