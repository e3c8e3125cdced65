"""NRR-DD's ``cam_maps[class]`` (group ``scoring``): the teacher's class activation maps (NRR-DD
Eq. 1) of every train image, IPC-independent.  CIDD (``cidd_scores``) reads them; the overlays
are pictures for people (asset metadata and ``reports/overlays/``).  A helper of the NRR-DD piece
(:mod:`dd_assets.defs.methods.nrr`), not a piece itself."""

from __future__ import annotations

import dagster as dg
import numpy as np

from dd_assets.config import Params
from dd_assets.defs.common import histogram_md, histogram_picture, overlay_png, png_md
from dd_assets.defs.io import load_teacher, read_class_manifest_pl
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.storage import layout
from dd_assets.storage.arrays import write_group

OVERLAY_IMAGES = 16


def build(params: Params, parts: Partitions) -> dg.AssetsDefinition:
    @dd_asset(params, name="cam_maps", family="cam_maps", blocks=[],
              group_name="scoring", deps=["teacher", "manifest"], partitions_def=parts.class_def,
              kinds={"zarr"}, pool=GPU_POOL,
              description=(
                  "Teacher CAM (NRR-DD Eq. 1) of every train image for its own class, raw at the teacher's "
                  "feature resolution (upsampled + min-max normalized on use); overlays in reports/overlays/."))
    def cam_maps(run: Run):
        from dd_assets.core.imaging import as_tensor
        from dd_assets.methods.nrr.cams import raw_image_cams, upsample_cams

        root, data, dd = run.root, run.params.block("data"), run.dd
        cidx = parts.class_index(run.partition)
        size = int(data["image_size"])
        device = dd.torch_device()
        model, _ = load_teacher(root, device)
        rows = read_class_manifest_pl(root, cidx, ("train",)).sort("source_id", maintain_order=True)
        raws, shares, sample = [], [], []
        for x, y in dd.batches(rows, data, f"cam_maps[{run.partition}]"):
            raw = raw_image_cams(model, x, y, size, data["mean"], data["std"], dd.inference_batch_size, device)
            cam = upsample_cams(raw, (size, size))
            shares.append((cam >= 0.5).float().mean(dim=(1, 2)).numpy())  # Comp-DD-style critical share
            raws.append(raw.numpy())
            if sum(len(s) for s in sample) < OVERLAY_IMAGES:
                sample.append((np.asarray(as_tensor(x)), cam.numpy()))
        cams = np.concatenate(raws).astype(np.float32)
        share = np.concatenate(shares)
        run.upstream([("teacher", None), ("manifest", run.partition)])
        digest = write_group(root, layout.cams(cidx), {
            "source_id": rows["source_id"].to_numpy().astype(np.int64), "cam": cams,
        }, attrs=run.provenance(model_size=size, normalized=False))
        imgs = np.concatenate([s[0] for s in sample])[:OVERLAY_IMAGES]
        maps = np.concatenate([s[1] for s in sample])[:OVERLAY_IMAGES]
        png = overlay_png(imgs.astype(np.uint8), maps, OVERLAY_IMAGES)
        root.write_bytes(layout.overlay("cam_maps", cidx), png)
        return digest, {
            "images": len(cams), "cam_grid": f"{cams.shape[1]}x{cams.shape[2]}",
            "critical_share": histogram_md(share, label="share of CAM >= 0.5"),
            **histogram_picture(root, "cam_maps", layout.cls(cidx), share, "share of CAM >= 0.5"),
            "critical_share_mean": float(share.mean()) if len(share) else 0.0,
            "overlays": png_md(png, f"CAM overlays, class {run.partition}"),
            "overlays_path": root.url(layout.overlay("cam_maps", cidx)),
        }

    return cam_maps
