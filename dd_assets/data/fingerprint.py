"""Content fingerprints of the raw ImageFolder: what ``raw_images``' data version is made of.

A fingerprint is a hash of file *content* (sha256, read in chunks: one file at a time, never
the whole folder in memory) and relative path, per class, so replacing or fixing an image's
bytes changes exactly its class's fingerprint, and rewriting identical bytes (or touching a
file) changes nothing.  The manifest records the same per-image sha256, so a class whose
files changed gets a new ``manifest`` data version and every other class keeps its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from dd_assets.data.sources import class_files

CHUNK = 1 << 20


def file_sha256(path: str | Path, chunk: int | None = None) -> str:
    """sha256 of a file's bytes, streamed in ``chunk``-byte reads (default :data:`CHUNK`)."""
    chunk = chunk or CHUNK
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def class_fingerprint(root: Path, class_name: str) -> tuple[str, int]:
    """``(hash, files)`` of one class: every candidate file of the class (all split folders,
    as the manifest lists them), by relative path and content."""
    h = hashlib.sha256()
    n = 0
    for split, paths in sorted(class_files(root, class_name).items()):
        for p in paths:
            rel = Path(p).relative_to(root).as_posix()
            h.update(f"{split}\0{rel}\0{file_sha256(p)}\n".encode())
            n += 1
    return h.hexdigest()[:16], n


def folder_fingerprint(root: Path, classes: Iterable[str]) -> tuple[str, dict[str, str], dict[str, int]]:
    """``(version, per-class hash, per-class file count)`` of the ImageFolder at ``root``."""
    per_class: dict[str, str] = {}
    counts: dict[str, int] = {}
    h = hashlib.sha256()
    for c in classes:
        per_class[c], counts[c] = class_fingerprint(root, c)
        h.update(f"{c}\0{per_class[c]}\n".encode())
    return h.hexdigest()[:16], per_class, counts
