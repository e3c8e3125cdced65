"""Helpers shared by the asset modules: code versions, provenance, timing, metadata."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import numpy as np

from dd_assets.config import Params, block_hash
from dd_assets.storage import DataRoot, layout

# Bump a family's version when its code changes outputs; it feeds code_version.
MODULE_VERSIONS = {
    "raw_images": "1",
    "manifest": "1",
    "teacher": "1",
    "full_data_student": "1",
    "teacher_features": "1",
    "rded_scores": "1",
    "vit_scorer": "1",
    "focusdc_attention": "1",
    "cam_maps": "1",
    "cidd_scores": "2",
    "diffusion_model": "1",
    "expert_trajectories": "1",
    "comp_dd_complexity": "1",
    "edf_distilled": "1",
    "ddps_scores": "1",
    "dift_features": "1",
    "ddps_clusters": "1",
    "selection": "1",
    "distilled": "1",
    "soft_labels": "1",
    "students": "1",
    "report": "1",
    "udd_distilled": "1",
    "utilization": "1",
}


def _block_value(params: Params, name: str):
    """A block as hashed: ``methods.<entry>`` is the entry's *resolved* parameters (plugin
    defaults overlaid with the user's block), so a changed paper default re-versions the entry
    too, plus the method's code ``version`` when it is not "1".  A parameter at its
    ``MethodPlugin.compat`` value (added after outputs existed, at the value that reproduces
    them) is left out, so adding it changes no existing code version."""
    if name.startswith("methods.") and name.count(".") == 1:
        from dd_assets.methods import registry
        from dd_assets.methods.entries import base_method, hashed_params

        entry = name.split(".", 1)[1]
        mblock = params.block("methods")
        if entry in mblock and base_method(entry, mblock[entry]) in registry.PLUGINS:
            plugin = registry.get(base_method(entry, mblock[entry]))
            resolved = hashed_params(entry, mblock[entry])
            return resolved if plugin.version == "1" else {"params": resolved, "version": plugin.version}
    if name == "protocol.views":   # views stored per image: labels.views or the longest student budget
        from dd_assets.evaluation.protocol import resolve

        return resolve(params.raw).views
    return params.block(name)


# code version -> the params blocks it hashes (``methods.<entry>``, ``data.mean``, ...): the DVC
# stages list exactly these (dd_assets/dvc_pipeline.py). Filled as the definitions are built.
_BLOCKS_READ: dict[str, tuple[str, ...]] = {}


def versioned(version: str, blocks: list[str] | tuple[str, ...]) -> str:
    """Record which params blocks ``version`` hashes; return it unchanged."""
    _BLOCKS_READ[version] = tuple(blocks)
    return version


def blocks_read(version: str | None) -> tuple[str, ...] | None:
    """The params blocks behind an asset's code version (None: not built by this process)."""
    return _BLOCKS_READ.get(version) if version else None


def code_version(params: Params, family: str, blocks: list[str]) -> str:
    return versioned(block_hash(MODULE_VERSIONS[family], {b: _block_value(params, b) for b in blocks}), blocks)


def partition_of(context: dg.AssetExecutionContext) -> str | None:
    return context.partition_key if context.has_partition_key else None


DATA_VERSION_TAG = "dagster/data_version"
PARTITION_BATCH = 500   # partitions per batched query (well under SQLite's bound-parameter limit)


def upstream_versions(context: dg.AssetExecutionContext, keys: list[tuple[str, str | None]]) -> dict[str, str]:
    """Latest data version of each (asset, partition) this output was computed from.

    The partitions of one asset are looked up together (two queries per batch, not one per
    partition: an asset reading every class partition costs O(1) queries, not O(classes));
    an (asset, partition) never materialized is left out, a materialization without a data
    version reads ``"?"``."""
    instance = context.instance
    partitions: dict[str, list[str]] = {}
    for name, part in keys:
        if part:
            partitions.setdefault(name, []).append(part)
    found = {name: _latest_partition_versions(instance, dg.AssetKey(name), list(dict.fromkeys(parts)))
             for name, parts in partitions.items()}
    out: dict[str, str] = {}
    for name, part in keys:
        if part:
            if part in found[name]:
                out[f"{name}[{part}]"] = found[name][part]
            continue
        recs = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(name)), limit=1).records
        if recs:
            out[name] = (recs[0].asset_materialization.tags or {}).get(DATA_VERSION_TAG, "?")
    return out


def _latest_partition_versions(instance: dg.DagsterInstance, key: dg.AssetKey, parts: list[str]) -> dict[str, str]:
    """``partition -> data version`` of the latest materialization of each of ``parts``
    that has one (the same records ``fetch_materializations(..., limit=1)`` returns per partition)."""
    storage, mat = instance.event_log_storage, dg.DagsterEventType.ASSET_MATERIALIZATION
    out: dict[str, str] = {}
    for i in range(0, len(parts), PARTITION_BATCH):
        batch = parts[i : i + PARTITION_BATCH]
        latest = storage.get_latest_storage_id_by_partition(key, mat, set(batch))
        tags = storage.get_latest_tags_by_partition(key, mat, [DATA_VERSION_TAG], asset_partitions=batch)
        for part in latest:
            out[part] = (tags.get(part) or {}).get(DATA_VERSION_TAG, "?")
    return out


def provenance(context: dg.AssetExecutionContext, params: Params, upstream: dict[str, str]) -> dict[str, str]:
    """What every artifact records about how it was made."""
    return {
        "asset": context.asset_key.to_user_string(),
        "partition": partition_of(context) or "",
        "code_version": context.assets_def.code_versions_by_key.get(context.asset_key) or "",
        "profile": params.profile,
        "dagster_run_id": context.run_id,
        "upstream": json.dumps(upstream, sort_keys=True),
    }


@contextmanager
def timed(root: DataRoot, context: dg.AssetExecutionContext) -> Iterator[dict[str, float]]:
    """Measure the asset's wall time and store it for the report."""
    t0 = time.perf_counter()
    box: dict[str, float] = {}
    yield box
    box["seconds"] = time.perf_counter() - t0
    name = context.asset_key.to_user_string()
    part = partition_of(context)
    root.write_bytes(
        layout.timing(name, part),
        json.dumps({"asset": name, "partition": part, "seconds": box["seconds"], "run_id": context.run_id}).encode(),
    )


def histogram_md(values: np.ndarray, bins: int = 10, label: str = "score") -> dg.MetadataValue:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return dg.MetadataValue.md("(no values)")
    counts, edges = np.histogram(values, bins=bins)
    lines = [f"| {label} range | count |", "| --- | --- |"]
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        lines.append(f"| {lo:.3g} – {hi:.3g} | {c} {'█' * int(30 * c / max(1, counts.max()))} |")
    return dg.MetadataValue.md("\n".join(lines))


def histogram_picture(root, asset: str, part: str, values: np.ndarray, label: str) -> dict[str, Any]:
    """Write ``layout.histogram(asset, part)``; metadata entries (inline picture + path)."""
    from dd_assets.pictures import histogram_png
    from dd_assets.storage import layout

    png = histogram_png(values, label, f"{asset} {part}")
    root.write_bytes(layout.histogram(asset, part), png)
    return {"histogram_png": png_md(png, f"{asset} {part}"), "histogram_path": root.url(layout.histogram(asset, part))}


def png_md(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def result(data_version: str, metadata: dict[str, Any], seconds: float | None = None) -> dg.MaterializeResult:
    md = dict(metadata)
    if seconds is not None:
        md["wall_seconds"] = dg.MetadataValue.float(round(seconds, 3))
    return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(data_version))


def overlay_png(images: np.ndarray, maps: np.ndarray, n: int = 16) -> bytes:
    """PNG of the first ``n`` images next to their heat-map overlays (CAM / attention)."""
    from dd_assets.pictures import heat_overlay, side_by_side

    images, maps = images[:n], maps[:n]
    return image_grid_png(side_by_side(images, heat_overlay(images, maps)), ncol=8)


def image_grid_png(images: np.ndarray, labels: np.ndarray | None = None, ncol: int | None = None) -> bytes:
    """uint8 ``[N, 3, H, W]`` -> PNG bytes of a grid (rows = classes when labels given)."""
    from PIL import Image

    img = Image.fromarray(image_grid_array(images, labels, ncol))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def image_grid_array(images: np.ndarray, labels: np.ndarray | None = None, ncol: int | None = None) -> np.ndarray:
    """uint8 ``[N, 3, H, W]`` -> uint8 ``[rows, cols, 3]`` grid, upscaled to >= 256 px wide."""
    n, c, h, w = images.shape
    if labels is not None and n:
        classes = sorted(set(labels.tolist()))
        per = max(int((labels == k).sum()) for k in classes)
        rows = [[i for i in range(n) if labels[i] == k] for k in classes]
        ncol = per
    else:
        ncol = ncol or int(np.ceil(np.sqrt(max(n, 1))))
        rows = [list(range(i, min(i + ncol, n))) for i in range(0, n, ncol)]
    pad = 2
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for r, idxs in enumerate(rows):
        for j, i in enumerate(idxs):
            y, x = pad + r * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    scale = max(1, 256 // max(1, canvas.shape[1]))
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else canvas
