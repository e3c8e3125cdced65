"""Group ``scoring``: the teacher's class activation maps (NRR-DD Eq. 1) of every train
image, per class partition, IPC-independent.  NRR-DD's CIDD reads them; the overlays are
pictures for people (asset metadata and ``reports/overlays/``)."""


import dagster as dg
import numpy as np

from dd_assets.defs.common import (
    check_params_current,
    code_version,
    histogram_md,
    histogram_picture,
    overlay_png,
    png_md,
    provenance,
    result,
    timed,
    upstream_versions,
)
from dd_assets.defs.io import load_teacher, read_class_manifest
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL, DDResource
from dd_assets.storage import layout
from dd_assets.storage.arrays import write_group

OVERLAY_IMAGES = 16


def build(teacher: dg.AssetsDefinition, parts: Partitions, params) -> dg.AssetsDefinition:
    @dg.asset(
        group_name="scoring",
        deps=[teacher, "manifest"],
        partitions_def=parts.class_def,
        code_version=code_version(params, "cam_maps", []),
        description=(
            "Teacher CAM (NRR-DD Eq. 1) of every train image for its own class, raw at the teacher's "
            "feature resolution (upsampled + min-max normalized on use); overlays in reports/overlays/."
        ),
        kinds={"zarr"},
        pool=GPU_POOL,
    )
    def cam_maps(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
        from dd_assets.core.imaging import as_tensor
        from dd_assets.methods.nrr.cams import raw_image_cams, upsample_cams

        p = check_params_current(context, "cam_maps", [])
        root, data = dd.root(), p.block("data")
        cidx = parts.class_index(context.partition_key)
        size = int(data["image_size"])
        device = dd.torch_device()
        with timed(root, context) as tm:
            model, _ = load_teacher(root, device)
            rows = read_class_manifest(root, cidx, ("train",)).sort_values("source_id").reset_index(drop=True)
            raws, shares, sample = [], [], []
            for x, y in dd.batches(rows, data, f"cam_maps[{context.partition_key}]"):
                raw = raw_image_cams(model, x, y, size, data["mean"], data["std"], dd.inference_batch_size, device)
                cam = upsample_cams(raw, (size, size))
                shares.append((cam >= 0.5).float().mean(dim=(1, 2)).numpy())  # Comp-DD-style critical share
                raws.append(raw.numpy())
                if sum(len(s) for s in sample) < OVERLAY_IMAGES:
                    sample.append((np.asarray(as_tensor(x)), cam.numpy()))
            cams = np.concatenate(raws).astype(np.float32)
            share = np.concatenate(shares)
            ups = upstream_versions(context, [("teacher", None), ("manifest", context.partition_key)])
            digest = write_group(root, layout.cams(cidx), {
                "source_id": rows["source_id"].to_numpy(np.int64), "cam": cams,
            }, attrs=provenance(context, p, ups) | {"model_size": size, "normalized": False})
            imgs = np.concatenate([s[0] for s in sample])[:OVERLAY_IMAGES]
            maps = np.concatenate([s[1] for s in sample])[:OVERLAY_IMAGES]
            png = overlay_png(imgs.astype(np.uint8), maps, OVERLAY_IMAGES)
            root.write_bytes(layout.overlay("cam_maps", cidx), png)
        return result(digest, {
            "images": len(cams), "cam_grid": f"{cams.shape[1]}x{cams.shape[2]}",
            "critical_share": histogram_md(share, label="share of CAM >= 0.5"),
            **histogram_picture(root, "cam_maps", layout.cls(cidx), share, "share of CAM >= 0.5"),
            "critical_share_mean": float(share.mean()) if len(share) else 0.0,
            "overlays": png_md(png, f"CAM overlays, class {context.partition_key}"),
            "overlays_path": root.url(layout.overlay("cam_maps", cidx)),
        }, tm.get("seconds"))

    return cam_maps
