"""The I/O around the pure selection and composition stages: read candidates of every
class, call the registered ``select``/``compose`` implementations, return tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dd_assets.data.loading import load_rows
from dd_assets.methods import registry
from dd_assets.core.types import CandidateCrops
from dd_assets.storage import DataRoot, layout
from dd_assets.storage.arrays import read_group
from dd_assets.storage.tables import read_table

SELECTION_COLUMNS = ["class_index", "image_index", "tile", "source_id", "x0", "y0", "x1", "y1", "score"]


def _full_boxes(n: int, size: int) -> np.ndarray:
    return np.tile(np.array([[0, 0, size, size]], np.int32), (n, 1))


def _need(cname: str, have: int, need: int, what: str) -> None:
    if have < need:
        raise ValueError(
            f"class {cname!r} has {have} {what} but IPC needs {need}; lower the IPC or add images to the class"
        )


def ddps_tiles(mp: dict, data_size: int) -> int:
    """Patches per DDPS image below ``concat_max_ipc``: ``tiles`` (2x2, Sec. 3.4) at high
    resolution; at low resolution -- working images smaller than ``patch_size``, the same
    trigger as whole-image R -- ``low_res_tiles`` (default 1: Sec. 4.2 keeps "the same
    setting as in RDED" for low-resolution data, and RDED's CIFAR setting is factor 1)."""
    if mp["patch_size"] is not None and int(data_size) < int(mp["patch_size"]):
        return int(mp["low_res_tiles"])
    return int(mp["tiles"])


def tiles_per_side(method: str, mp: dict, ipc: int | None = None, data_size: int | None = None) -> int:
    """Tiles per side of a distilled image: RDED's ``factor``; FocusDC's sqrt(m + n); NRR-DD's
    sqrt(beta), ``beta: auto`` = RDED's factor at ``data_size`` squared
    (:func:`dd_assets.methods.nrr.cidd.resolve_beta`); DDPS: sqrt(:func:`ddps_tiles`) for
    ``IPC <= concat_max_ipc``, else 1 (Sec. 3.4; needs ``ipc`` and the working ``data_size``)."""
    if method == "ddps":
        from dd_assets.methods.ddps.select import tiles_per_image

        if ipc is None or data_size is None:
            raise ValueError("methods.ddps: tiles per image depend on the IPC and the image size; pass both")
        try:
            per = tiles_per_image(int(ipc), int(mp["concat_max_ipc"]), ddps_tiles(mp, data_size))
        except ValueError as err:
            raise ValueError(f"methods.ddps: {err}") from err
        return int(round(per**0.5))
    if method == "nrr":
        from dd_assets.methods.nrr.cidd import beta_to_factor, resolve_beta

        if data_size is None and mp["beta"] in (None, "auto"):
            raise ValueError("methods.nrr.beta: 'auto' follows the image size; pass data_size")
        return beta_to_factor(resolve_beta(mp["beta"], int(data_size or 0), "methods.nrr.beta"))
    if method == "focusdc":
        n = int(mp["m"]) + int(mp["n"])
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"methods.{method}: m + n = {n} must be a square number (1, 4, 9, ...)")
        return side
    return int(mp.get("factor", 1))


def _focusdc_rows(mp: dict, ipc: int, root: DataRoot, cidx: int, cname: str, size: int) -> pd.DataFrame:
    from dd_assets.methods.focusdc.realism import scores_from_attention
    from dd_assets.methods.focusdc.selection import arrange

    arrays, _ = read_group(root, layout.attention(cidx))
    ids, m, n = arrays["source_id"], int(mp["m"]), int(mp["n"])
    _need(cname, len(ids), (m + n) * ipc, "train images (FocusDC needs m*IPC key + n*IPC context images)")
    sc = scores_from_attention(
        arrays["attention"], arrays["logits"], np.full(len(ids), cidx, np.int64), ids, cidx,
        tuple(int(v) for v in arrays["patch_size"]), (size, size), float(mp["alpha"]), float(mp["eta"]),
        mp["confidence"], mp["window"], int(mp["seed"]), area=mp["area_score"],
    )
    sel = registry.get("select", "focusdc")(sc, ipc, m_factor=m, variant=mp["variant"], seed=int(mp["seed"]),
                                             context_sampling=mp["context_sampling"], class_index=cidx, n_factor=n)
    key, ctx, cw = arrange(sel, ipc, m, n, cidx, int(mp["seed"]))
    rows = []
    for i in range(ipc):
        for t, k in enumerate(key[i * m : (i + 1) * m]):
            rows.append((i, t, sc.source_id[k], *sc.boxes[k], sc.score[k]))
        for j, c in enumerate(ctx[i * n : (i + 1) * n]):  # low-resolution view: the whole image
            rows.append((i, m + j, sc.source_id[c], 0, 0, size, size, cw[i * n + j]))
    df = pd.DataFrame(rows, columns=["image_index", "tile", "source_id", "x0", "y0", "x1", "y1", "score"])
    df.insert(0, "class_index", cidx)
    return df.astype({"source_id": np.int64, "x0": np.int32, "y0": np.int32, "x1": np.int32, "y1": np.int32,
                      "score": np.float32})


def _ddps_rows(mp: dict, ipc: int, root: DataRoot, cidx: int, cname: str, per_class: int, source: str,
               size: int) -> pd.DataFrame:
    """DDPS (Sec. 4.2, supp. 5) from the stored cluster table only: the patches nearest the
    centres of the top clusters, then the best remaining by R; image ``i`` holds picks
    ``per*i .. per*i + per-1`` (``grouping: contiguous``) or RDED's interleaved order."""
    from dd_assets.methods.ddps.clusters import DDPSCandidates

    table = read_table(root, layout.ddps_clusters(cidx, source))
    cands = DDPSCandidates.from_table(table, cidx, prefer=mp["prefer"])
    _need(cname, len(cands.source_id), per_class,
          "candidate patches (methods.ddps: mipc pooled train images x patches_per_image)")
    order = np.asarray(registry.get("select", "ddps")(
        cands, ipc, top_clusters=int(mp["top_clusters"]), use_clusters=bool(mp["cluster"]),
        concat_max_ipc=int(mp["concat_max_ipc"]), tiles=ddps_tiles(mp, size)), np.int64)
    pos = np.arange(len(order))
    per = per_class // ipc
    if mp["grouping"] == "contiguous":
        image_index, tile = pos // per, pos % per
    elif mp["grouping"] == "interleave":
        image_index, tile = pos % ipc, pos // ipc
    else:
        raise ValueError(f"methods.ddps.grouping must be 'contiguous' or 'interleave', got {mp['grouping']!r}")
    return pd.DataFrame({
        "class_index": cidx, "image_index": image_index, "tile": tile,
        "source_id": cands.source_id[order],
        "x0": cands.boxes[order, 0], "y0": cands.boxes[order, 1], "x1": cands.boxes[order, 2], "y1": cands.boxes[order, 3],
        "score": cands.score[order].astype(np.float32),
    })


def select_method(method: str, mp: dict, ipc: int, root: DataRoot, classes: list[str], data: dict,
                  source: str | None = None) -> pd.DataFrame:
    """Selection table (``SELECTION_COLUMNS``) of one method at one IPC, all classes.

    ``source``: the asset whose stored table the selection reads, where an entry's
    variants may have their own (DDPS: the entry's cluster table asset, ``ddps_clusters``
    unless given)."""
    if ipc < 1:
        raise ValueError(f"IPC must be >= 1, got {ipc}")
    size = int(data["image_size"])
    factor = tiles_per_side(method, mp, ipc, size)
    per_class = ipc * factor * factor
    frames = []
    for cidx, cname in enumerate(classes):
        if method == "focusdc":
            frames.append(_focusdc_rows(mp, ipc, root, cidx, cname, size))
            continue
        if method == "ddps":
            frames.append(_ddps_rows(mp, ipc, root, cidx, cname, per_class, source or "ddps_clusters", size))
            continue
        if method == "random":
            rows = read_table(root, layout.manifest(cidx))
            ids = rows.loc[rows["split"] == "train", "source_id"].to_numpy(np.int64)
            _need(cname, len(ids), ipc, "train images")
            chosen = registry.get("select", "random")(ids, ipc, int(mp["seed"]), cidx)
            cands = CandidateCrops(cidx, chosen, _full_boxes(len(chosen), size), np.full(len(chosen), np.nan, np.float32))
            order = np.arange(len(chosen))
        elif method in ("rded", "nrr"):
            scorer = "rded" if method == "rded" else "cidd"
            sc = read_table(root, layout.scores(scorer, cidx))
            cands = CandidateCrops(cidx, sc["source_id"].to_numpy(np.int64),
                                   sc[["x0", "y0", "x1", "y1"]].to_numpy(np.int32), sc["score"].to_numpy(np.float32))
            _need(cname, len(sc), per_class, f"scored crops (methods.{method}.mipc pool)")
            # RDED: lowest observer CE; NRR-DD CIDD: lowest teacher confidence (Sec. 3.2, Alg. 1)
            if method == "rded":
                order = registry.get("select", "rded")(cands, per_class)
            else:  # least confident first: highest true-class CE or lowest max-probability
                order = registry.get("select", "cidd")(cands, per_class, confidence=mp["confidence"])
        elif method in ("herding", "kmeans"):
            arrays, _ = read_group(root, layout.features(cidx))
            feats, ids = arrays["features"], arrays["source_id"]
            _need(cname, len(ids), ipc, "train images with features")
            fn = registry.get("select", method)
            order = fn(feats, ipc) if method == "herding" else fn(feats, ipc, seed=int(mp["seed"]), n_init=int(mp["n_init"]))
            cands = CandidateCrops(cidx, ids, _full_boxes(len(ids), size), np.full(len(ids), np.nan, np.float32))
        else:
            raise KeyError(f"no selection wiring for method {method!r}")
        order = np.asarray(order, np.int64)
        pos = np.arange(len(order))
        frames.append(pd.DataFrame({
            "class_index": cidx,
            # RDED's mix_images: tile t of image i is the (t * IPC + i)-th best crop, so every
            # image gets one crop from each score band (identical to 1 tile/image at factor 1).
            "image_index": pos % ipc,
            "tile": pos // ipc,
            "source_id": cands.source_id[order],
            "x0": cands.boxes[order, 0], "y0": cands.boxes[order, 1],
            "x1": cands.boxes[order, 2], "y1": cands.boxes[order, 3],
            "score": cands.score[order].astype(np.float32),
        }))
    return pd.concat(frames, ignore_index=True)[SELECTION_COLUMNS]


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
