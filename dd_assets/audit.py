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
from dd_assets.storage.tables import read_table_pl

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def lineage_of(root: DataRoot, method: str, ipc: int, index: int) -> dict[str, Any]:
    import polars as pl

    lin = read_table_pl(root, layout.lineage(method, ipc))
    n = int(lin["image_index"].max()) + 1 if len(lin) else 0
    if not 0 <= index < n:
        raise IndexError(f"--index {index} out of range: {method} at IPC {ipc} has {n} distilled images (0..{n - 1})")
    rows = lin.filter(pl.col("image_index") == index).sort("tile", maintain_order=True)
    meta = read_table_meta(root, layout.lineage(method, ipc))
    tiles = []
    for r in rows.iter_rows(named=True):
        score = r["score"]   # a missing score is stored as null
        tiles.append({
            "tile": int(r["tile"]),
            "dest_box": [int(r["dest_x0"]), int(r["dest_y0"]), int(r["dest_x1"]), int(r["dest_y1"])],
            "source": {"path": r["source_path"], "sha256": r["source_sha256"], "source_id": int(r["source_id"])},
            "crop_box_source_px": [int(r["src_x0"]), int(r["src_y0"]), int(r["src_x1"]), int(r["src_y1"])],
            "score": None if score is None or not np.isfinite(score) else float(score),
        })
    first = rows.row(0, named=True)
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


AUDIT_MAX_SIDE = 1024   # the audit PNG's longest side, in pixels (aspect kept)
PANEL_MAX = 256         # panel height cap (distilled image x scale), and a source panel's width cap = 2x that


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """``text`` shortened in the middle (``...``) to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 8 and font.getlength(text[: keep // 2] + "..." + text[len(text) - keep // 2:]) > width:
        keep -= 2
    return text[: keep // 2] + "..." + text[len(text) - keep // 2:]


def audit_captions(record: dict[str, Any]) -> list[str]:
    """The words of the audit picture: a title, then per tile its source file, crop box (source
    pixels) and score."""
    title = (f"{record['method']} IPC {record['ipc']} image {record['index']}: class {record.get('class_name', '?')!r}"
             f" (index {record.get('class_index', '?')})")
    lines = [title]
    for t in record["tiles"]:
        score = "n/a" if t.get("score") is None else f"{t['score']:.4g}"
        lines.append(f"tile {t['tile']}: {t['source']['path']}  box {list(t['crop_box_source_px'])}  score {score}")
    return lines


def audit_png(root: DataRoot, data: dict, record: dict[str, Any], scale: int = 4,
              max_side: int = AUDIT_MAX_SIDE) -> bytes:
    """The distilled image (left) and each source with its crop box (right), boxes coloured per
    tile, each panel labelled, and below them one line per tile: source file, box, score (in the
    tile's colour).  The longest side is at most ``max_side`` pixels (panels are scaled down,
    aspect kept); the caption lines are also in the PNG's ``Description`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    group = open_group(root, layout.distilled(record["method"], record["ipc"]))
    img = np.asarray(group["images"][record["index"]]).transpose(1, 2, 0)
    h, w = img.shape[:2]
    panel_h = max(1, min(h * scale, max(h, PANEL_MAX)))
    distilled = Image.fromarray(img).resize((max(1, round(w * panel_h / h)), panel_h), Image.NEAREST)
    fx = distilled.width / w
    draw = ImageDraw.Draw(distilled)
    panels, names = [distilled], ["distilled"]
    src_root = resolve_root(data["root"])
    for t in record["tiles"]:
        colour = COLOURS[t["tile"] % len(COLOURS)]
        x0, y0, x1, y1 = (v * fx for v in t["dest_box"])
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=2)
        with Image.open(src_root / t["source"]["path"]) as src:
            src = src.convert("RGB")
        sw, sh = src.size
        # as tall as the distilled panel, at most twice as wide (a 500 x 5 strip stays a strip)
        f = min(panel_h / max(sh, 1), 2 * panel_h / max(sw, 1))
        src = src.resize((max(1, round(sw * f)), max(1, round(sh * f))), Image.NEAREST)
        d = ImageDraw.Draw(src)
        bx0, by0, bx1, by1 = (v * f for v in t["crop_box_source_px"])
        d.rectangle([bx0, by0, max(bx0, bx1 - 1), max(by0, by1 - 1)], outline=colour, width=2)
        panels.append(src)
        names.append(f"tile {t['tile']}")
    pad, font = 8, _font(12)
    line_h = int(font.getbbox("Ag")[3]) + 4
    row_w = sum(p.width for p in panels) + pad * (len(panels) - 1)
    shrink = min(1.0, (max_side - 2 * pad) / max(row_w, 1))
    if shrink < 1.0:  # many or wide panels: scale every panel down alike
        panels = [p.resize((max(1, int(p.width * shrink)), max(1, int(p.height * shrink))), Image.NEAREST)
                  for p in panels]
    row_w = sum(p.width for p in panels) + pad * (len(panels) - 1)
    row_h = max(p.height for p in panels)
    lines = audit_captions(record)
    width = min(max_side, max(row_w + 2 * pad, 480))
    height = pad + line_h + line_h + row_h + pad + line_h * (len(lines) - 1) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), _fit(lines[0], font, width - 2 * pad), fill=(0, 0, 0), font=font)
    x, y = pad, pad + line_h
    for p, name, tile in zip(panels, names, [None, *record["tiles"]], strict=True):
        colour = (0, 0, 0) if tile is None else COLOURS[tile["tile"] % len(COLOURS)]
        draw.text((x, y), _fit(name, font, max(p.width, 40)), fill=colour, font=font)
        canvas.paste(p, (x, y + line_h))
        x += p.width + pad
    y += line_h + row_h + pad
    for t, text in zip(record["tiles"], lines[1:], strict=True):
        draw.text((pad, y), _fit(text, font, width - 2 * pad), fill=COLOURS[t["tile"] % len(COLOURS)], font=font)
        y += line_h
    if max(canvas.size) > max_side:  # very many tiles: the caption column alone is too tall
        canvas.thumbnail((max_side, max_side), Image.LANCZOS)
    info = PngInfo()
    info.add_text("Description", "\n".join(lines))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
