"""DDPS's ``diffusion_model`` asset (group ``models``) and the noise predictor behind it.

The small class-conditional pixel U-Net trained here on the train split (loss curve in the
metadata, one MLflow run), or -- when ``diffusion.weights`` names a local diffusers Stable
Diffusion v1.5 folder -- that folder, validated (every component present) and recorded.
:func:`load_predictor` gives the level assets (:mod:`dd_assets.defs.methods.ddps_levels`) and
the benchmarks the model either way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import torch

from dd_assets.config import PROJECT_ROOT, Params, block_hash
from dd_assets.data.loading import iter_batches
from dd_assets.defs.common import png_md
from dd_assets.defs.io import read_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.methods.ddps import DIFFUSION
from dd_assets.defs.model_assets import state_digest
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.methods.ddps.pixel_diffusion import (
    load_pixel_diffusion,
    pixel_config,
    save_pixel_diffusion,
    train_class_diffusion,
)
from dd_assets.methods.ddps.stable_diffusion import load_diffusers_folder, missing_sd_components
from dd_assets.pictures import loss_curve_png
from dd_assets.storage import DataRoot, layout
from dd_assets.tracking import mlflow_run, run_link

ALL = dg.AllPartitionMapping()
DIFFUSION_BLOCKS = ["diffusion"]


def check_diffusion(params: Params) -> None:
    """Refuse (at load) a ``diffusion`` block the pixel model cannot be built from."""
    try:
        pixel_config(params.block("diffusion"), int(params.block("data")["image_size"]))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{params.path}: diffusion: {err}") from err


def weights_path(weights: str) -> Path:
    """``diffusion.weights`` as a path (``~`` expanded, relative to the repository root)."""
    path = Path(os.path.expanduser(str(weights)))
    return path if path.is_absolute() else PROJECT_ROOT / path


def folder_problem(weights: str) -> str | None:
    """Why ``diffusion.weights`` cannot be used (``missing_sd_components``), or None."""
    path = weights_path(weights)
    if not path.is_dir():
        return (f"diffusion.weights = {weights!r}: no such folder ({path}); put a Stable Diffusion v1.5 "
                "checkpoint in diffusers layout there (vae/, unet/, text_encoder/, tokenizer/, scheduler/), "
                "or set diffusion.weights: null to train the small pixel-space model here")
    missing = missing_sd_components(path)
    if missing:
        return (f"diffusion.weights = {weights!r}: the Stable Diffusion folder {path} is incomplete: missing "
                f"{'; '.join(missing)}. Copy the complete diffusers SD v1.5 folder there, or set "
                "diffusion.weights: null to train the small pixel-space model here")
    return None


def diffusion_asset(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    @dd_asset(
        params, name=DIFFUSION, family=DIFFUSION, blocks=DIFFUSION_BLOCKS,
        group_name="models",
        deps=[dg.AssetDep("manifest", partition_mapping=ALL)],
        description=(
            "DDPS's class-conditional diffusion model: a small pixel-space U-Net (learned class + null "
            "embeddings, condition dropout) trained on the train split, or, with diffusion.weights, a local "
            "diffusers Stable Diffusion v1.5 folder (validated and recorded; loaded by the scoring assets)."
        ),
        kinds={"pytorch", "mlflow"},
        pool=GPU_POOL,
    )
    def diffusion_model(run: Run):
        if run.params.block("diffusion").get("weights"):
            return _record_folder(run, parts)
        return _train_pixel(run, parts)

    return diffusion_model


def _record_folder(run: Run, parts: Partitions):
    root, d = run.root, run.params.block("diffusion")
    problem = folder_problem(d["weights"])
    if problem:
        raise dg.Failure(problem)
    if importlib.util.find_spec("transformers") is None:
        raise dg.Failure(f"diffusion.weights = {d['weights']!r}: Stable Diffusion's CLIP text encoder needs the "
                         "'transformers' package (pip install transformers), or set diffusion.weights: null")
    path = weights_path(d["weights"])
    files = {}
    for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        for f in sorted((path / sub).iterdir()):
            if f.is_file():
                files[f"{sub}/{f.name}"] = (f.read_text() if f.suffix == ".json" else f.stat().st_size)
    info = {"backend": "stable_diffusion_folder", "path": str(path), "files": files,
            "prompt_template": d["prompt_template"], "null_prompt": d["null_prompt"], "dtype": d["dtype"],
            "class_names": parts.classes}
    digest = block_hash(info)
    run.upstream([("manifest", c) for c in parts.classes])
    root.write_bytes(layout.model_metrics(DIFFUSION), json.dumps({**info, **run.provenance()}, indent=1).encode())
    null = d["prompt_template"].format("") if d["null_prompt"] is None else d["null_prompt"]
    return digest, {
        "backend": "Stable Diffusion v1.5 (diffusers folder)", "path": str(path), "files": len(files),
        "prompts": dg.MetadataValue.md(f"- class 0: `{d['prompt_template'].format(parts.classes[0])}`\n- null: `{null}`"),
        "record": root.url(layout.model_metrics(DIFFUSION)),
    }


class _Epochs:
    """Re-iterable train batches in [-1, 1], reshuffled (seeded) on every pass."""

    def __init__(self, rows: pl.DataFrame, data: dict, batch_size: int, seed: int, workers: int) -> None:
        self.rows, self.data, self.batch_size, self.seed, self.workers = rows, data, batch_size, seed, workers
        self.epoch = 0

    def __iter__(self):
        self.epoch += 1
        for x, y in iter_batches(self.rows, self.data, self.batch_size, shuffle_seed=self.seed * 10_000 + self.epoch,
                                 num_workers=self.workers):
            yield x.float().div(255.0).mul(2.0).sub(1.0), y


def resume_path() -> str:
    """The training checkpoint of ``diffusion_model`` (data root), kept while it trains and
    removed when it succeeds: a killed or failed run continues from it."""
    return f"models/{DIFFUSION}/resume.pt"


def _resume_state(run: Run, key: dict) -> dict | None:
    """The stored training state when it belongs to these parameters and this data (``key``:
    the code version and the manifest versions read); else None (logged)."""
    rel = resume_path()
    if not run.root.exists(rel):
        return None
    with run.root.fs.open(run.root.path(rel), "rb") as fh:
        saved = torch.load(fh, map_location="cpu", weights_only=False)
    if saved.get("key") != key:
        run.log.info(f"{run.root.url(rel)}: a checkpoint of other parameters or data; training from step 0")
        return None
    return saved["state"]


def _train_pixel(run: Run, parts: Partitions):
    p, root, context = run.params, run.root, run.context
    data, d = p.block("data"), p.block("diffusion")
    device = run.dd.torch_device()
    train = read_manifest_pl(root, parts, ("train",)).sort("source_id", maintain_order=True)
    if len(train) == 0:
        raise dg.Failure("the train split is empty; the diffusion model has nothing to learn from")
    cfg = pixel_config(d, int(data["image_size"]))
    run.upstream([("manifest", c) for c in parts.classes])
    tags = {"dagster_run_id": context.run_id, "asset_key": DIFFUSION, "partition": "",
            "code_version": context.assets_def.code_versions_by_key[context.asset_key], "profile": p.profile}
    every = max(1, cfg.steps // 100)
    key = {"code_version": tags["code_version"], "upstream": dict(sorted(run.ups.items()))}
    state = _resume_state(run, key)
    first = int(state["step"]) if state else 0
    if state:
        run.log.info(f"diffusion: resuming from step {first}/{cfg.steps} ({run.root.url(resume_path())})")

    def save(st: dict) -> None:
        with root.atomic_file(resume_path()) as tmp:
            torch.save({"key": key, "state": st}, tmp)

    with mlflow_run(root, f"dd_assets/{p.profile}", DIFFUSION, tags, {"diffusion": d, "data": data}) as mlf:
        t0 = time.perf_counter()

        def on_step(step: int, loss: float) -> None:
            if step % every == 0 or step == cfg.steps - 1:
                mlf.log_metric("loss", loss, step=step)
            if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
                context.log.info(f"diffusion step {step + 1}/{cfg.steps}: loss={loss:.4g} "
                                 f"({time.perf_counter() - t0:.0f}s)")

        # a checkpoint every 5 % of the steps (50 of the CIFAR budget's 1,000: minutes of CPU)
        model, losses = train_class_diffusion(_Epochs(train, data, cfg.batch_size, cfg.seed, run.dd.num_workers),
                                              None, len(parts.classes), cfg, device, on_step, resume=state,
                                              on_checkpoint=save, checkpoint_every=max(1, cfg.steps // 20))
        tail = float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else float("nan")
        png = loss_curve_png(losses)
        root.write_bytes(layout.curve(DIFFUSION, "loss"), png)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "loss_curve.png").write_bytes(png)
            mlf.log_artifact(str(Path(tmp) / "loss_curve.png"))
        mlf.log_metrics({"final_loss": tail, "train_images": float(len(train))})
        mrun = mlf.active_run()
        meta = run.provenance()
        with root.atomic_file(layout.model_checkpoint(DIFFUSION)) as tmp:
            save_pixel_diffusion(tmp, model.cpu(), parts.classes, extra=meta)
        n_params = int(sum(t.numel() for t in model.parameters()))
        root.write_bytes(layout.model_metrics(DIFFUSION), json.dumps({
            "backend": "pixel_unet", "losses": losses, "final_loss": tail, "parameters": n_params,
            "train_images": len(train), "mlflow_run_id": mrun.info.run_id, **meta}, indent=1).encode())
        digest = state_digest(model, parts.classes)
    if root.exists(resume_path()):
        root.fs.rm(root.path(resume_path()))
    return digest, {
        "backend": "small pixel U-Net (trained here)", "steps": cfg.steps, "final_loss": tail,
        "resumed_from_step": first,
        "parameters": n_params, "train_images": len(train), "loss_curve": png_md(png, "diffusion loss"),
        "loss_curve_path": root.url(layout.curve(DIFFUSION, "loss")), "mlflow_run": dg.MetadataValue.url(run_link(mrun)),
        "checkpoint": root.url(layout.model_checkpoint(DIFFUSION)),
    }


def load_predictor(root: DataRoot, p: Params, parts: Partitions, device: torch.device):
    """The :class:`NoisePredictor` behind ``diffusion_model`` (on ``device``, eval mode)."""
    d = p.block("diffusion")
    if d.get("weights"):
        problem = folder_problem(d["weights"])
        if problem:
            raise dg.Failure(problem)
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if d["dtype"] not in dtypes:
            raise dg.Failure(f"diffusion.dtype must be one of {sorted(dtypes)}, got {d['dtype']!r}")
        return load_diffusers_folder(weights_path(d["weights"]), parts.classes, device, dtypes[d["dtype"]],
                                     d["prompt_template"], d["null_prompt"])
    rel = layout.model_checkpoint(DIFFUSION)
    if not root.exists(rel):
        raise dg.Failure(f"diffusion checkpoint {root.url(rel)} is missing; materialize the '{DIFFUSION}' asset")
    if root.is_local:
        model, meta = load_pixel_diffusion(root.local(rel), device)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "diffusion.pt")
            root.fs.get_file(root.path(rel), local)
            model, meta = load_pixel_diffusion(local, device)
    if list(meta["class_names"]) != list(parts.classes):
        raise dg.Failure(f"diffusion_model was trained on classes {meta['class_names'][:5]}..., the data now has "
                         f"{parts.classes[:5]}...; re-materialize diffusion_model")
    return model
