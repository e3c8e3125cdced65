"""Composition I/O: the selected crops of every distilled image are read from their source
images and stitched (:func:`dd_assets.core.compose.compose_images`), with one lineage row per
tile back to the source file and pixels."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dd_assets.data.loading import load_rows


def compose_method(sel: pd.DataFrame, manifest: pd.DataFrame, data: dict, factor: int):
    """Distilled images ``[N, 3, S, S] uint8``, labels ``[N]`` and one lineage row per tile.

    Crop boxes in the lineage are given in the working resolution (``box_*``) and mapped
    back to source pixels (``src_*``) with the manifest's width/height.
    """
    from dd_assets.core.compose import compose_images

    size = int(data["image_size"])
    man = manifest.set_index("source_id")
    missing = set(sel["source_id"]) - set(man.index)
    if missing:
        raise ValueError(f"{len(missing)} selected images are not in the manifest (e.g. {sorted(missing)[:3]}); re-materialize the selection")
    ids = sorted(set(sel["source_id"].tolist()))
    pix = dict(zip(ids, load_rows(man.loc[ids].reset_index(), data), strict=True))
    images, labels, lineage = [], [], []
    for (cidx, img_idx), grp in sel.groupby(["class_index", "image_index"], sort=True):
        grp = grp.sort_values("tile")
        boxes = grp[["x0", "y0", "x1", "y1"]].to_numpy()
        srcs = grp["source_id"].tolist()
        image, tiles = compose_images([pix[s] for s in srcs], boxes, size, factor, srcs, grp["score"].tolist())
        n = len(images)
        images.append(np.asarray(image))
        labels.append(int(cidx))
        for t, tile in enumerate(tiles):
            src = man.loc[tile.source_id]
            sx, sy = float(src["width"]) / size, float(src["height"]) / size
            lineage.append({
                "image_index": n, "class_index": int(cidx), "class_name": src["class_name"], "image_in_class": int(img_idx),
                "tile": t, "dest_x0": tile.dest.x0, "dest_y0": tile.dest.y0, "dest_x1": tile.dest.x1, "dest_y1": tile.dest.y1,
                "source_id": int(tile.source_id), "source_path": src["path"], "source_sha256": src["sha256"],
                "box_x0": tile.box.x0, "box_y0": tile.box.y0, "box_x1": tile.box.x1, "box_y1": tile.box.y1,
                "src_x0": int(round(tile.box.x0 * sx)), "src_y0": int(round(tile.box.y0 * sy)),
                "src_x1": int(round(tile.box.x1 * sx)), "src_y1": int(round(tile.box.y1 * sy)),
                "score": float(tile.score), "params_hash": grp["params_hash"].iloc[0] if "params_hash" in grp else "",
                "scorer_version": grp["scorer_version"].iloc[0] if "scorer_version" in grp else "",
            })
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.int64), pd.DataFrame(lineage)
