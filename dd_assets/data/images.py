"""Decoding image files into uint8 ``[3, S, S]`` arrays, whatever their mode."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """A file that is not a decodable image; the message names it."""


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    size_bytes: int
    width: int
    height: int
    mode: str


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def inspect_image(path: Path) -> ImageInfo:
    """Hash and fully decode ``path``; raises BadImageError for truncated/non-image files."""
    data = Path(path).read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_bytes_io(data)) as img:
                img.load()  # full decode: catches truncated files
                w, h, mode = img.width, img.height, img.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise BadImageError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    return ImageInfo(hashlib.sha256(data).hexdigest(), len(data), w, h, mode)


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Decode to RGB uint8 ``[3, H, W]``; resized to ``size x size`` (bilinear) when given."""
    try:
        with Image.open(path) as img:
            img = _to_rgb(img)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadImageError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_images(paths: list[str], size: int) -> np.ndarray:
    """uint8 ``[N, 3, size, size]``."""
    if not paths:
        return np.zeros((0, 3, size, size), np.uint8)
    return np.stack([load_image(p, size) for p in paths])
