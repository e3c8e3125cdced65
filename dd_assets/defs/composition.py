"""Composition I/O: the selected crops of every distilled image are read from their source
images and stitched (:func:`dd_assets.core.compose.compose_images`), with one lineage row per
tile back to the source file and pixels."""

from __future__ import annotations

import numpy as np
import polars as pl

from dd_assets.data.loading import load_rows

#: one lineage row per tile: where it lands (``dest_*``), its source image and crop box at the
#: working resolution (``box_*``) and in source pixels (``src_*``)
LINEAGE_SCHEMA = pl.Schema({
    "image_index": pl.Int64, "class_index": pl.Int64, "class_name": pl.String, "image_in_class": pl.Int64,
    "tile": pl.Int64, "dest_x0": pl.Int64, "dest_y0": pl.Int64, "dest_x1": pl.Int64, "dest_y1": pl.Int64,
    "source_id": pl.Int64, "source_path": pl.String, "source_sha256": pl.String,
    "box_x0": pl.Int64, "box_y0": pl.Int64, "box_x1": pl.Int64, "box_y1": pl.Int64,
    "src_x0": pl.Int64, "src_y0": pl.Int64, "src_x1": pl.Int64, "src_y1": pl.Int64,
    "score": pl.Float64, "params_hash": pl.String, "scorer_version": pl.String,
})


def compose_method(sel: pl.DataFrame, manifest: pl.DataFrame, data: dict, factor: int):
    """Distilled images ``[N, 3, S, S] uint8``, labels ``[N]`` and one lineage row per tile
    (:data:`LINEAGE_SCHEMA`), from the selection (``SELECTION_COLUMNS``) and manifest rows.

    Crop boxes in the lineage are given in the working resolution (``box_*``) and mapped
    back to source pixels (``src_*``) with the manifest's width/height.
    """
    from dd_assets.core.compose import compose_images

    size = int(data["image_size"])
    ids = sorted(set(sel["source_id"].to_list()))
    src = manifest.filter(pl.col("source_id").is_in(ids)).unique("source_id", keep="first", maintain_order=True)
    missing = sorted(set(ids) - set(src["source_id"].to_list()))
    if missing:
        raise ValueError(f"{len(missing)} selected images are not in the manifest (e.g. {missing[:3]}); re-materialize the selection")
    src = src.sort("source_id")
    pix = dict(zip(ids, load_rows(src, data), strict=True))
    info = {r["source_id"]: r for r in src.select("source_id", "class_name", "path", "sha256", "width", "height")
            .iter_rows(named=True)}
    extra = {c: c in sel.columns for c in ("params_hash", "scorer_version")}
    images, labels, lineage = [], [], []
    ordered = sel.sort(["class_index", "image_index", "tile"], maintain_order=True)
    for (cidx, img_idx), grp in ordered.group_by(["class_index", "image_index"], maintain_order=True):
        boxes = grp.select("x0", "y0", "x1", "y1").to_numpy()
        srcs = grp["source_id"].to_list()
        scores = grp["score"].cast(pl.Float64).fill_null(float("nan")).to_list()   # a missing score is NaN
        image, tiles = compose_images([pix[s] for s in srcs], boxes, size, factor, srcs, scores)
        n = len(images)
        images.append(np.asarray(image))
        labels.append(int(cidx))
        tags = {c: (grp[c][0] if extra[c] else "") for c in extra}
        for t, tile in enumerate(tiles):
            s = info[tile.source_id]
            sx, sy = float(s["width"]) / size, float(s["height"]) / size
            lineage.append({
                "image_index": n, "class_index": int(cidx), "class_name": s["class_name"], "image_in_class": int(img_idx),
                "tile": t, "dest_x0": tile.dest.x0, "dest_y0": tile.dest.y0, "dest_x1": tile.dest.x1, "dest_y1": tile.dest.y1,
                "source_id": int(tile.source_id), "source_path": s["path"], "source_sha256": s["sha256"],
                "box_x0": tile.box.x0, "box_y0": tile.box.y0, "box_x1": tile.box.x1, "box_y1": tile.box.y1,
                "src_x0": int(round(tile.box.x0 * sx)), "src_y0": int(round(tile.box.y0 * sy)),
                "src_x1": int(round(tile.box.x1 * sx)), "src_y1": int(round(tile.box.y1 * sy)),
                "score": float(tile.score), "params_hash": tags["params_hash"], "scorer_version": tags["scorer_version"],
            })
    table = pl.DataFrame(lineage, schema=LINEAGE_SCHEMA, orient="row")
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.int64), table
