"""Where a distilled image came from: its lineage rows and a picture of the source images
with their crop boxes next to the distilled image.  No Dagster imports."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dd_assets.data.sources import resolve_root
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import open_group
from dd_assets.storage.tables import read_table

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def lineage_of(root: DataRoot, method: str, ipc: int, index: int) -> dict[str, Any]:
    lin = read_table(root, layout.lineage(method, ipc))
    n = int(lin["image_index"].max()) + 1 if len(lin) else 0
    if not 0 <= index < n:
        raise IndexError(f"--index {index} out of range: {method} at IPC {ipc} has {n} distilled images (0..{n - 1})")
    rows = lin[lin["image_index"] == index].sort_values("tile")
    meta = read_table_meta(root, layout.lineage(method, ipc))
    tiles = []
    for r in rows.itertuples():
        tiles.append({
            "tile": int(r.tile),
            "dest_box": [int(r.dest_x0), int(r.dest_y0), int(r.dest_x1), int(r.dest_y1)],
            "source": {"path": r.source_path, "sha256": r.source_sha256, "source_id": int(r.source_id)},
            "crop_box_source_px": [int(r.src_x0), int(r.src_y0), int(r.src_x1), int(r.src_y1)],
            "score": None if not np.isfinite(r.score) else float(r.score),
        })
    first = rows.iloc[0]
    return {
        "method": method, "ipc": ipc, "index": index, "class_index": int(first["class_index"]),
        "class_name": first["class_name"], "seed": int(first["seed"]), "params_hash": first["params_hash"],
        "scorer_asset": first["scorer_asset"], "scorer_version": first["scorer_version"],
        "code_version": meta.get("code_version", ""), "upstream": json.loads(meta.get("upstream", "{}") or "{}"),
        "dagster_run_id": meta.get("dagster_run_id", ""), "tiles": tiles,
    }


def read_table_meta(root: DataRoot, rel: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    with root.fs.open(root.path(rel), "rb") as fh:
        md = pq.read_schema(fh).metadata or {}
    return {k.decode()[len("dd_assets."):]: v.decode() for k, v in md.items() if k.startswith(b"dd_assets.")}


def audit_png(root: DataRoot, data: dict, record: dict[str, Any], scale: int = 4) -> bytes:
    """The distilled image (left) and each source with its crop box (right), boxes coloured per tile."""
    group = open_group(root, layout.distilled(record["method"], record["ipc"]))
    img = np.asarray(group["images"][record["index"]]).transpose(1, 2, 0)
    h, w = img.shape[:2]
    distilled = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(distilled)
    panels = [distilled]
    src_root = resolve_root(data["root"])
    for t in record["tiles"]:
        colour = COLOURS[t["tile"] % len(COLOURS)]
        x0, y0, x1, y1 = (v * scale for v in t["dest_box"])
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=2)
        with Image.open(src_root / t["source"]["path"]) as src:
            src = src.convert("RGB")
            sw, sh = src.size
            f = max(1, (h * scale) // max(sh, 1))
            src = src.resize((sw * f, sh * f), Image.NEAREST)
        d = ImageDraw.Draw(src)
        bx0, by0, bx1, by1 = (v * f for v in t["crop_box_source_px"])
        d.rectangle([bx0, by0, bx1 - 1, by1 - 1], outline=colour, width=2)
        panels.append(src)
    pad = 8
    width = sum(p.width for p in panels) + pad * (len(panels) + 1)
    height = max(p.height for p in panels) + 2 * pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = pad
    for p in panels:
        canvas.paste(p, (x, pad))
        x += p.width + pad
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
