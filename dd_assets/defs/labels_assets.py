"""``<entry>_soft_labels``: replayable labels of an entry's distilled images (IPC-partitioned).

E augmentation views per image (crop, flip, CutMix; optionally RandAugment) and what the
teacher says about each: FKD top-k logits, DBR distances (NRR-DD Sec. 3.4), or only the view
parameters (``online`` / ``hard`` labels)."""

from __future__ import annotations

import dagster as dg

from dd_assets.config import Params
from dd_assets.core.soft_labels import label_array_bytes
from dd_assets.defs.io import load_teacher
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.partitions import Partitions
from dd_assets.defs.resources import GPU_POOL
from dd_assets.methods.entries import method_params
from dd_assets.methods.plugin import MethodPlugin
from dd_assets.storage import layout
from dd_assets.storage.arrays import read_group, write_group

LABEL_BLOCKS = ["labels", "student.epochs", "protocol.views"]   # views cover the longest budget
LABEL_KINDS = ("fkd", "online", "hard", "dbr")


def soft_labels_asset(params: Params, parts: Partitions, entry: str, plugin: MethodPlugin,
                      src: str) -> dg.AssetsDefinition:
    """Labels of ``src``'s distilled images for ``entry`` (``src == entry`` unless the entry is a
    label-only variant of another entry). An entry whose method has its own label parameters
    (``labels`` in its config) hashes its block too."""
    blocks = LABEL_BLOCKS + ([f"methods.{entry}"] if "labels" in plugin.defaults else [])

    @dd_asset(params, name=f"{entry}_soft_labels", family="soft_labels", blocks=blocks,
              group_name="labels", deps=[f"{src}_distilled", "teacher"], partitions_def=parts.ipc_def,
              kinds={"zarr"}, pool=GPU_POOL,
              description="FKD-style replayable labels: E augmentation views per image + teacher top-k logits (fp16).")
    def soft_labels(run: Run):
        from dd_assets.core.randaugment import STUDENT_RANDAUGMENT, recipe_suffix
        from dd_assets.core.soft_labels import sample_views, teacher_soft_labels
        from dd_assets.evaluation.protocol import resolve as resolve_protocol

        p, root, ipc = run.params, run.root, run.ipc
        data, lab = p.block("data"), p.block("labels")
        mp = method_params(entry, p.block("methods")[entry])
        kind = mp.get("labels", lab["mode"])
        if kind not in LABEL_KINDS:
            raise ValueError(f"label kind {kind!r} is not one of {', '.join(LABEL_KINDS)}")
        augment = mp.get("student_augment", "none")   # NRR-DD Supp. A.2: 2x RandAugment on the views
        ra = STUDENT_RANDAUGMENT if augment == "randaugment" else None
        device = run.dd.torch_device()
        arrays, _ = read_group(root, layout.distilled(src, ipc))
        images = arrays["images"]
        proto = resolve_protocol(p.raw)
        views = sample_views(len(images), proto.views, int(data["image_size"]), seed=int(lab["seed"]),
                             scale=proto.crop_scale, cutmix_alpha=proto.cutmix_alpha, randaugment=ra)
        if kind == "dbr":
            from dd_assets.core.dbr import teacher_dbr_labels

            teacher, _ = load_teacher(root, device)
            store = teacher_dbr_labels(teacher, images, arrays["labels"], views, data["mean"], data["std"],
                                       batch_size=run.dd.inference_batch_size, device=device).to_arrays()
        elif kind == "fkd":
            teacher, _ = load_teacher(root, device)
            k = min(int(lab["topk"]), len(parts.classes))
            store = teacher_soft_labels(teacher, images, views, k, data["mean"], data["std"],
                                        batch_size=run.dd.inference_batch_size, device=device).to_arrays()
        else:   # online / hard: only the views
            store = views.to_arrays()
        nbytes, view_bytes = label_array_bytes(store), views.nbytes()
        run.upstream([(f"{src}_distilled", run.partition), ("teacher", None)])
        meta = run.provenance(mode=kind, label_bytes=nbytes, view_bytes=view_bytes)
        digest = write_group(root, layout.soft_labels(entry, ipc), store, attrs=meta)
        return digest, {"mode": kind, "views_per_image": proto.views, "label_bytes": nbytes,
                        "crop_scale": str(list(proto.crop_scale)),
                        "recipe": proto.recipe + (recipe_suffix(*ra) if ra else ""),
                        "view_param_bytes": view_bytes, "images_of": src, "student_augment": augment}

    return soft_labels
