"""DDPS in the graph (docs/ddps.md, "In the graph"); built only when a ``methods`` entry
uses ``ddps``.

* ``diffusion_model`` (group ``models``): the small class-conditional pixel U-Net trained
  here on the train split (loss curve in the metadata, one MLflow run), or -- when
  ``diffusion.weights`` names a local diffusers Stable Diffusion v1.5 folder -- that folder,
  validated (every component present) and recorded.
* ``ddps_scores`` (``scoring``, per class): ``R(p|c)`` (Eq. 6) of every candidate window of
  every pooled train image (Stage I).
* ``dift_features`` (``scoring``, per class): each image's best window(s) under ``prefer``
  and their DIFT features (Stage II).
* ``ddps_clusters`` (``scoring``, per class): k-means clusters, their ranking by median R
  and each patch's distance to its centre -- the table every DDPS selection reads.

All four are IPC-independent; ``<entry>_selection`` (``chain.select_method``) takes the
IPC-dependent share from the stored cluster table only.  Each level's code version hashes
only the parameters that level reads (``SCORE_KEYS`` < ``FEATURE_KEYS`` < ``CLUSTER_KEYS``),
and entries whose parameters agree up to a level share that level's asset: a variant that
differs in selection parameters only (``top_clusters``, ``cluster``, ...) reads the same
``ddps_clusters``; one with another ``prefer`` gets ``<entry>_dift_features`` and
``<entry>_ddps_clusters`` but shares ``ddps_scores``.

The pure stage functions (:mod:`dd_assets.methods.ddps.stages`: ``score_windows``,
``window_features``, ``cluster_candidates``) compute those three levels (one generator
stream per level and class; tested in tests/test_ddps.py and tests/test_ddps_graph.py).
"""

import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import torch

from dd_assets.config import PROJECT_ROOT, Params, block_hash, load_params
from dd_assets.data.loading import iter_batches, load_rows
from dd_assets.defs.common import (
    MODULE_VERSIONS,
    check_params_current,
    code_version,
    histogram_md,
    histogram_picture,
    image_grid_png,
    overlay_png,
    png_md,
    provenance,
    result,
    timed,
    upstream_versions,
    versioned,
)
from dd_assets.defs.io import read_class_manifest, read_manifest
from dd_assets.defs.model_assets import pool_rows, state_digest
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL, DDResource
from dd_assets.methods.ddps.config import DDPSConfig
from dd_assets.methods.ddps.pixel_diffusion import (
    PixelDiffusionConfig,
    load_pixel_diffusion,
    save_pixel_diffusion,
    train_class_diffusion,
)
from dd_assets.methods.ddps.select import tiles_per_image
from dd_assets.methods.ddps.stable_diffusion import load_diffusers_folder, missing_sd_components
from dd_assets.methods.ddps.stages import cluster_candidates, cluster_grid, score_windows, window_features
from dd_assets.methods_catalog import base_method, method_params
from dd_assets.pictures import loss_curve_png
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group, write_group
from dd_assets.storage.tables import read_table, write_table
from dd_assets.tracking import mlflow_run, run_link

ALL = dg.AllPartitionMapping()
DIFFUSION_BLOCKS = ["diffusion"]
DIFFUSION = "diffusion_model"

#: Parameters each IPC-independent level reads (each level also reads everything before it).
SCORE_KEYS = ("mipc", "image_size", "patch_size", "patch_stride", "n_draws", "t_range", "seed")
FEATURE_KEYS = SCORE_KEYS + ("patches_per_image", "prefer", "dift_t", "dift_up_block", "dift_ensemble", "dift_input")
CLUSTER_KEYS = FEATURE_KEYS + ("n_clusters", "kmeans_n_init")
#: Read only by the IPC-dependent ``<entry>_selection``.
SELECT_KEYS = ("top_clusters", "cluster", "concat_max_ipc", "tiles", "low_res_tiles", "grouping")
LEVELS = {"ddps_scores": SCORE_KEYS, "dift_features": FEATURE_KEYS, "ddps_clusters": CLUSTER_KEYS}
PICTURE_IMAGES = 16


# ============================================================================ naming and versions


def ddps_entries(params: Params) -> list[str]:
    mblock = params.block("methods")
    return [n for n in params.methods if base_method(n, mblock[n]) == "ddps"]


def level_params(params: Params, entry: str, level: str) -> dict:
    mp = method_params(entry, params.block("methods")[entry])
    return {k: mp[k] for k in LEVELS[level]}


def asset_name(params: Params, entry: str, level: str) -> str:
    """The asset holding ``level`` for ``entry``: the first DDPS entry with the same
    parameters up to that level owns it; the first entry's assets have the plain names."""
    entries = ddps_entries(params)
    mine = level_params(params, entry, level)
    owner = next(e for e in entries if level_params(params, e, level) == mine)
    return level if owner == entries[0] else f"{owner}_{level}"


def clusters_asset(params: Params, entry: str) -> str:
    """The cluster table asset the selection of ``entry`` reads."""
    return asset_name(params, entry, "ddps_clusters")


def level_version(params: Params, entry: str, level: str) -> str:
    return versioned(block_hash(MODULE_VERSIONS[level], level_params(params, entry, level)), [f"methods.{entry}"])


def _check_current(context: dg.AssetExecutionContext, entry: str, level: str) -> Params:
    p = load_params()
    expected = context.assets_def.code_versions_by_key.get(context.asset_key)
    if entry not in ddps_entries(p) or level_version(p, entry, level) != expected:
        raise dg.Failure(
            f"params.yaml changed since the Dagster definitions were loaded (methods.{entry}, {level}); "
            "reload the code location (UI: Deployment > Reload, or restart `dagster dev`)"
        )
    return p


# ============================================================================ parameters -> configs


def ddps_config(mp: dict, data_size: int, batch_size: int = 8, latent: bool = False) -> DDPSConfig:
    """:class:`DDPSConfig` of a methods entry for working images of ``data_size`` px.

    * Low-resolution data (working images smaller than ``patch_size``) get the paper's
      low-resolution setting (Sec. 4.2, "same setting as RDED"): R of the whole image
      (``patch_size = None``).
    * ``image_size`` (the resize to the model's input, 256 for SD) applies to latent models
      (``latent``, SD); the pixel model is trained here at the working resolution, so its
      images are not resized (``image_size = None``).
    """
    image_size, patch_size = mp["image_size"], mp["patch_size"]
    if patch_size is not None and int(data_size) < int(patch_size):
        patch_size = None
    if not latent:
        image_size = None
    return DDPSConfig(
        image_size=None if image_size is None else int(image_size),
        patch_size=None if patch_size is None else int(patch_size),
        patch_stride=int(mp["patch_stride"]), patches_per_image=int(mp["patches_per_image"]),
        n_draws=int(mp["n_draws"]), t_range=(float(mp["t_range"][0]), float(mp["t_range"][1])),
        prefer=str(mp["prefer"]), dift_t=float(mp["dift_t"]), dift_up_block=int(mp["dift_up_block"]),
        dift_ensemble=int(mp["dift_ensemble"]), dift_input=str(mp["dift_input"]),
        n_clusters=int(mp["n_clusters"]), kmeans_n_init=int(mp["kmeans_n_init"]), seed=int(mp["seed"]),
        batch_size=max(1, int(batch_size)),
    )


def check_entry(params: Params, entry: str) -> None:
    """Raise a ValueError naming ``methods.<entry>.<key>`` for a value DDPS cannot use."""
    mp = method_params(entry, params.block("methods")[entry])
    where = f"methods.{entry}"
    try:
        ddps_config(mp, int(params.block("data")["image_size"]))
    except (ValueError, TypeError, IndexError) as err:
        raise ValueError(f"{where}: {err}") from err
    if not isinstance(mp["cluster"], bool):
        raise ValueError(f"{where}.cluster must be true (cluster-based picks) or false (w/o Cluster ablation), got {mp['cluster']!r}")
    if mp["grouping"] not in ("contiguous", "interleave"):
        raise ValueError(f"{where}.grouping must be 'contiguous' or 'interleave', got {mp['grouping']!r}")
    if int(mp["mipc"]) < 1 or int(mp["top_clusters"]) < 1:
        raise ValueError(f"{where}: mipc and top_clusters must be >= 1")
    try:
        tiles_per_image(1, int(mp["concat_max_ipc"]), int(mp["tiles"]))
    except ValueError as err:
        raise ValueError(f"{where}.tiles: {err}") from err
    try:
        tiles_per_image(1, int(mp["concat_max_ipc"]), int(mp["low_res_tiles"]))
    except ValueError as err:
        raise ValueError(f"{where}.low_res_tiles: {err}") from err


def pixel_config(d: dict, image_size: int) -> PixelDiffusionConfig:
    """The small pixel model of params block ``diffusion``, trained at the working resolution."""
    return PixelDiffusionConfig(
        image_size=int(image_size), block_out_channels=tuple(int(c) for c in d["block_out_channels"]),
        layers_per_block=int(d["layers_per_block"]), cross_attention_dim=int(d["cross_attention_dim"]),
        attention_head_dim=int(d["attention_head_dim"]),
        attention_from_level=int(d.get("attention_from_level", 0)), num_train_timesteps=int(d["num_train_timesteps"]),
        cond_dropout=float(d["cond_dropout"]), steps=int(d["steps"]), batch_size=int(d["batch_size"]),
        lr=float(d["lr"]), seed=int(d["seed"]),
    )


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


# ============================================================================ assets


def build(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    entries = ddps_entries(params)
    for e in entries:
        check_entry(params, e)
    d = params.block("diffusion")
    try:
        pixel_config(d, int(params.block("data")["image_size"]))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{params.path}: diffusion: {err}") from err
    diffusion = _diffusion_asset(params, parts)
    made: dict[str, dg.AssetsDefinition] = {}
    for e in entries:
        s = asset_name(params, e, "ddps_scores")
        if s not in made:
            made[s] = _scores_asset(params, parts, e, s)
        f = asset_name(params, e, "dift_features")
        if f not in made:
            made[f] = _features_asset(params, parts, e, f, s)
        c = asset_name(params, e, "ddps_clusters")
        if c not in made:
            made[c] = _clusters_asset(params, parts, e, c, f)
    return [diffusion, *made.values()]


def _diffusion_asset(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    @dg.asset(
        name=DIFFUSION,
        group_name="models",
        deps=[dg.AssetDep("manifest", partition_mapping=ALL)],
        code_version=code_version(params, DIFFUSION, DIFFUSION_BLOCKS),
        description=(
            "DDPS's class-conditional diffusion model: a small pixel-space U-Net (learned class + null "
            "embeddings, condition dropout) trained on the train split, or, with diffusion.weights, a local "
            "diffusers Stable Diffusion v1.5 folder (validated and recorded; loaded by the scoring assets)."
        ),
        kinds={"pytorch", "mlflow"},
        pool=GPU_POOL,
    )
    def diffusion_model(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = check_params_current(context, DIFFUSION, DIFFUSION_BLOCKS)
        if p.block("diffusion").get("weights"):
            return _record_folder(context, dd, p, parts)
        return _train_pixel(context, dd, p, parts)

    return diffusion_model


def _record_folder(context: dg.AssetExecutionContext, dd: DDResource, p: Params, parts: Partitions) -> dg.MaterializeResult:
    root, d = dd.root(), p.block("diffusion")
    problem = folder_problem(d["weights"])
    if problem:
        raise dg.Failure(problem)
    if importlib.util.find_spec("transformers") is None:
        raise dg.Failure(f"diffusion.weights = {d['weights']!r}: Stable Diffusion's CLIP text encoder needs the "
                         "'transformers' package (pip install transformers), or set diffusion.weights: null")
    path = weights_path(d["weights"])
    with timed(root, context) as tm:
        files = {}
        for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
            for f in sorted((path / sub).iterdir()):
                if f.is_file():
                    files[f"{sub}/{f.name}"] = (f.read_text() if f.suffix == ".json" else f.stat().st_size)
        info = {"backend": "stable_diffusion_folder", "path": str(path), "files": files,
                "prompt_template": d["prompt_template"], "null_prompt": d["null_prompt"], "dtype": d["dtype"],
                "class_names": parts.classes}
        digest = block_hash(info)
        meta = provenance(context, p, upstream_versions(context, [("manifest", c) for c in parts.classes]))
        root.write_bytes(layout.model_metrics(DIFFUSION), json.dumps({**info, **meta}, indent=1).encode())
    null = d["prompt_template"].format("") if d["null_prompt"] is None else d["null_prompt"]
    return result(digest, {
        "backend": "Stable Diffusion v1.5 (diffusers folder)", "path": str(path), "files": len(files),
        "prompts": dg.MetadataValue.md(f"- class 0: `{d['prompt_template'].format(parts.classes[0])}`\n- null: `{null}`"),
        "record": dd.root().url(layout.model_metrics(DIFFUSION)),
    }, tm.get("seconds"))


class _Epochs:
    """Re-iterable train batches in [-1, 1], reshuffled (seeded) on every pass."""

    def __init__(self, rows: pd.DataFrame, data: dict, batch_size: int, seed: int, workers: int) -> None:
        self.rows, self.data, self.batch_size, self.seed, self.workers = rows, data, batch_size, seed, workers
        self.epoch = 0

    def __iter__(self):
        self.epoch += 1
        for x, y in iter_batches(self.rows, self.data, self.batch_size, shuffle_seed=self.seed * 10_000 + self.epoch,
                                 num_workers=self.workers):
            yield x.float().div(255.0).mul(2.0).sub(1.0), y


def _train_pixel(context: dg.AssetExecutionContext, dd: DDResource, p: Params, parts: Partitions) -> dg.MaterializeResult:
    root, data, d = dd.root(), p.block("data"), p.block("diffusion")
    device = dd.torch_device()
    train = read_manifest(root, parts, ("train",)).sort_values("source_id").reset_index(drop=True)
    if len(train) == 0:
        raise dg.Failure("the train split is empty; the diffusion model has nothing to learn from")
    cfg = pixel_config(d, int(data["image_size"]))
    ups = upstream_versions(context, [("manifest", c) for c in parts.classes])
    tags = {"dagster_run_id": context.run_id, "asset_key": DIFFUSION, "partition": "",
            "code_version": context.assets_def.code_versions_by_key[context.asset_key], "profile": p.profile}
    every = max(1, cfg.steps // 100)
    with timed(root, context) as tm, mlflow_run(root, f"dd_assets/{p.profile}", DIFFUSION, tags,
                                                {"diffusion": d, "data": data}) as mlf:
        t0 = time.perf_counter()

        def on_step(step: int, loss: float) -> None:
            if step % every == 0 or step == cfg.steps - 1:
                mlf.log_metric("loss", loss, step=step)
            if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
                context.log.info(f"diffusion step {step + 1}/{cfg.steps}: loss={loss:.4g} "
                                 f"({time.perf_counter() - t0:.0f}s)")

        model, losses = train_class_diffusion(_Epochs(train, data, cfg.batch_size, cfg.seed, dd.num_workers), None,
                                              len(parts.classes), cfg, device, on_step)
        tail = float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else float("nan")
        png = loss_curve_png(losses)
        root.write_bytes(layout.curve(DIFFUSION, "loss"), png)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "loss_curve.png").write_bytes(png)
            mlf.log_artifact(str(Path(tmp) / "loss_curve.png"))
        mlf.log_metrics({"final_loss": tail, "train_images": float(len(train))})
        run = mlf.active_run()
        meta = provenance(context, p, ups)
        with root.atomic_file(layout.model_checkpoint(DIFFUSION)) as tmp:
            save_pixel_diffusion(tmp, model.cpu(), parts.classes, extra=meta)
        n_params = int(sum(t.numel() for t in model.parameters()))
        root.write_bytes(layout.model_metrics(DIFFUSION), json.dumps({
            "backend": "pixel_unet", "losses": losses, "final_loss": tail, "parameters": n_params,
            "train_images": len(train), "mlflow_run_id": run.info.run_id, **meta}, indent=1).encode())
        digest = state_digest(model, parts.classes)
    return result(digest, {
        "backend": "small pixel U-Net (trained here)", "steps": cfg.steps, "final_loss": tail,
        "parameters": n_params, "train_images": len(train), "loss_curve": png_md(png, "diffusion loss"),
        "loss_curve_path": root.url(layout.curve(DIFFUSION, "loss")), "mlflow_run": dg.MetadataValue.url(run_link(run)),
        "checkpoint": root.url(layout.model_checkpoint(DIFFUSION)),
    }, tm.get("seconds"))


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


#: Images per forward pass (each runs 2x: class and null condition): the smaller of the
#: operational ``dd.inference_batch_size`` and this cap, which bounds the attention memory.
MAX_BATCH = 32


def _config(mp: dict, data: dict, dd: DDResource, predictor) -> DDPSConfig:
    latent = int(getattr(predictor, "latent_scale", 1)) > 1
    return ddps_config(mp, int(data["image_size"]), min(dd.inference_batch_size, MAX_BATCH), latent=latent)


def _progress(dd: DDResource, desc: str, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, disable=not dd.progress, leave=False)

    def step(done: int, _n: int) -> None:
        bar.update(done - bar.n)

    return bar, step


def _pool_images(root: DataRoot, data: dict, cidx: int, ids: np.ndarray | None, mp: dict) -> tuple[pd.DataFrame, torch.Tensor]:
    """The class's pooled train images (``mipc`` seeded, RDED's pool) in ascending source_id,
    or the rows with the given ``ids``."""
    rows = read_class_manifest(root, cidx, ("train",))
    if ids is None:
        rows = pool_rows(rows, int(mp["mipc"]), int(mp["seed"]), cidx)
    else:
        rows = rows.set_index("source_id")
        missing = sorted(set(ids.tolist()) - set(rows.index))
        if missing:
            raise dg.Failure(f"{len(missing)} scored images are no longer train images (e.g. {missing[:3]}); "
                             "re-materialize the DDPS scores of this class")
        rows = rows.loc[ids].reset_index()
    return rows, torch.from_numpy(load_rows(rows, data))


def _scores_asset(params: Params, parts: Partitions, entry: str, name: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=name,
        group_name="scoring",
        deps=[DIFFUSION, "manifest"],
        partitions_def=parts.class_def,
        code_version=level_version(params, entry, "ddps_scores"),
        description=(
            "DDPS Stage I (Sec. 3.2, Eq. 4-6): R(p|c) = mean over the patch of the class-minus-null denoising "
            "error, n_draws (t, eps) draws, for every candidate window of mipc pooled train images (whole "
            "image for low-resolution data). IPC-independent; lower R = more class-relevant."
        ),
        kinds={"parquet"},
        pool=GPU_POOL,
    )
    def scores(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = _check_current(context, entry, "ddps_scores")
        root, data = dd.root(), p.block("data")
        mp = method_params(entry, p.block("methods")[entry])
        cidx = parts.class_index(context.partition_key)
        device = dd.torch_device()
        with timed(root, context) as tm:
            predictor = load_predictor(root, p, parts, device)
            cfg = _config(mp, data, dd, predictor)
            rows, images = _pool_images(root, data, cidx, None, mp)
            if len(rows) == 0:
                raise dg.Failure(f"class {context.partition_key!r} has no train images to score")
            bar, step = _progress(dd, f"{name}[{context.partition_key}]", len(rows))
            t0 = time.perf_counter()
            try:
                table, maps = score_windows(predictor, images, rows["source_id"].to_numpy(np.int64), cidx, cfg,
                                            device=device, on_progress=step, keep_maps=PICTURE_IMAGES)
            except ValueError as err:
                raise dg.Failure(f"{name}[{context.partition_key}]: {err}") from err
            finally:
                bar.close()
            score_s = time.perf_counter() - t0
            table.insert(0, "class_index", cidx)
            table["asset"] = name
            ups = upstream_versions(context, [(DIFFUSION, None), ("manifest", context.partition_key)])
            setting = "whole image (low resolution)" if cfg.patch_size is None else f"{cfg.patch_size}-px windows"
            digest = write_table(root, layout.ddps_scores(cidx, name), table,
                                 metadata=provenance(context, p, ups) | {"setting": setting})
            png = overlay_png(images[: len(maps)].numpy(), -maps, PICTURE_IMAGES)  # hot = the class prompt helps
            root.write_bytes(layout.overlay(name, cidx), png)
        best = table.groupby("source_id")["r"].min().to_numpy()
        return result(digest, {
            "images": int(len(rows)), "windows": int(len(table)), "setting": setting,
            "model_image": "source size" if cfg.image_size is None else f"shortest edge {cfg.image_size}",
            "forward_passes": int(len(rows)) * cfg.n_draws * 2, "images_per_second": round(len(rows) / max(score_s, 1e-9), 2),
            "r_histogram": histogram_md(table["r"].to_numpy(), label="R"),
            **histogram_picture(root, name, layout.cls(cidx), best, "lowest R per image"),
            "evidence_maps": png_md(png, f"-D maps (class evidence), class {context.partition_key}"),
            "evidence_maps_path": root.url(layout.overlay(name, cidx)),
        }, tm.get("seconds"))

    return scores


def _features_asset(params: Params, parts: Partitions, entry: str, name: str, scores_name: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=name,
        group_name="scoring",
        deps=[DIFFUSION, scores_name, "manifest"],
        partitions_def=parts.class_def,
        code_version=level_version(params, entry, "dift_features"),
        description=(
            "DDPS Stage II (Sec. 3.3, Alg. 1 l. 12-14): each pooled image's best window(s) by R under `prefer` "
            "and their DIFT features (U-Net up-block activations at t = dift_t * T). IPC-independent."
        ),
        kinds={"zarr"},
        pool=GPU_POOL,
    )
    def features(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = _check_current(context, entry, "dift_features")
        root, data = dd.root(), p.block("data")
        mp = method_params(entry, p.block("methods")[entry])
        cidx = parts.class_index(context.partition_key)
        device = dd.torch_device()
        with timed(root, context) as tm:
            table = read_table(root, layout.ddps_scores(cidx, scores_name))
            ids = np.unique(table["source_id"].to_numpy(np.int64))
            predictor = load_predictor(root, p, parts, device)
            cfg = _config(mp, data, dd, predictor)
            _, images = _pool_images(root, data, cidx, ids, mp)
            bar, step = _progress(dd, f"{name}[{context.partition_key}]", len(ids))
            try:
                arrays = window_features(predictor, images, ids, table, cidx, cfg, device=device, on_progress=step)
            except ValueError as err:
                raise dg.Failure(f"{name}[{context.partition_key}]: {err}") from err
            finally:
                bar.close()
            ups = upstream_versions(context, [(DIFFUSION, None), (scores_name, context.partition_key)])
            digest = write_group(root, layout.dift(cidx, name), arrays,
                                 attrs=provenance(context, p, ups) | {"prefer": cfg.prefer, "dift_t": cfg.dift_t})
        f = arrays["features"]
        return result(digest, {
            "patches": int(len(f)), "dim": int(f.shape[1]) if f.ndim == 2 else 0, "prefer": cfg.prefer,
            "feature_norm": histogram_md(np.linalg.norm(f, axis=1), label="L2 norm"),
        }, tm.get("seconds"))

    return features


def _clusters_asset(params: Params, parts: Partitions, entry: str, name: str, features_name: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=name,
        group_name="scoring",
        deps=[features_name, "manifest"],
        partitions_def=parts.class_def,
        code_version=level_version(params, entry, "ddps_clusters"),
        description=(
            "DDPS Stage II (Sec. 3.3): k-means (n_clusters) on the DIFT features; clusters ranked by the median "
            "R of their patches, patches by distance to their centre. The table every DDPS selection reads "
            "(IPC-independent); grids of the top clusters under reports/grids/."
        ),
        kinds={"parquet"},
    )
    def clusters(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        p = _check_current(context, entry, "ddps_clusters")
        root, data = dd.root(), p.block("data")
        mp = method_params(entry, p.block("methods")[entry])
        cfg = ddps_config(mp, int(data["image_size"]))
        cidx = parts.class_index(context.partition_key)
        with timed(root, context) as tm:
            arrays, _ = read_group(root, layout.dift(cidx, features_name))
            cands, cl = cluster_candidates(arrays, cidx, cfg)
            df = pd.DataFrame(cands.to_table())
            df.insert(0, "class_index", cidx)
            sizes = np.bincount(cl.labels, minlength=len(cl.median_r))
            df["cluster_size"] = sizes[cl.labels].astype(np.int64)
            df["cluster_median_r"] = cl.median_r[cl.labels].astype(np.float64)
            df["asset"] = name
            ups = upstream_versions(context, [(features_name, context.partition_key)])
            digest = write_table(root, layout.ddps_clusters(cidx, name), df, metadata=provenance(context, p, ups))
            ids = np.unique(cands.source_id[cands.cluster_rank < 10])
            rows = read_class_manifest(root, cidx).set_index("source_id").loc[ids].reset_index()
            by_id = dict(zip(ids.tolist(), load_rows(rows, data), strict=True))
            grid, ranks = cluster_grid(by_id, cands, int(data["image_size"]))
            png = image_grid_png(grid, ranks) if len(grid) else b""
            if png:
                root.write_bytes(layout.cluster_grid(name, cidx), png)
        top = [f"| {k} | {int(sizes[c])} | {cl.median_r[c]:.4g} |" for k, c in enumerate(cl.order[:10])]
        return result(digest, {
            "patches": int(len(df)), "clusters": int(len(cl.order)), "prefer": cfg.prefer,
            "top_clusters": dg.MetadataValue.md("| rank | patches | median R |\n| --- | --- | --- |\n" + "\n".join(top)),
            "cluster_sizes": histogram_md(sizes[sizes > 0], label="patches per cluster"),
            **({"top_cluster_grid": png_md(png, f"top clusters, class {context.partition_key}"),
                "top_cluster_grid_path": root.url(layout.cluster_grid(name, cidx))} if png else {}),
        }, tm.get("seconds"))

    return clusters
