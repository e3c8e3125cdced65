"""Zarr (v3) array groups: one group per partition, written atomically.

Each class or IPC partition owns its own group (``.../class=003.zarr``, ``.../ipc=10.zarr``),
so concurrent partitions never share a chunk; the group is built in a temp directory and
renamed into place (see :class:`DataRoot.atomic_dir`).  Attributes carry a schema version
and provenance (code_version, params hash, upstream data versions).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import zarr

from dd_assets.storage.root import DataRoot

SCHEMA_VERSION = 1


def _chunks(arr: np.ndarray, rows: int) -> tuple[int, ...]:
    return (max(1, min(rows, arr.shape[0] if arr.ndim else 1)),) + tuple(arr.shape[1:])


def write_group(
    root: DataRoot,
    rel: str,
    arrays: dict[str, np.ndarray],
    attrs: dict[str, Any] | None = None,
    chunk_rows: int = 256,
) -> str:
    """Write ``arrays`` as one Zarr group at ``rel``; returns a content hash of the arrays."""
    digest = hashlib.sha256()
    with root.atomic_dir(rel) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            if arr.ndim == 0:
                arr = arr.reshape(1)
            z = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=_chunks(arr, chunk_rows))
            z[...] = arr
            digest.update(name.encode())
            digest.update(str(arr.dtype).encode())
            digest.update(str(arr.shape).encode())
            digest.update(arr.tobytes())
        content_hash = digest.hexdigest()[:16]
        group.attrs.update({"schema_version": SCHEMA_VERSION, "content_hash": content_hash, **(attrs or {})})
    return content_hash


def open_group(root: DataRoot, rel: str) -> zarr.Group:
    if not root.exists(rel):
        raise FileNotFoundError(
            f"array group {root.url(rel)} does not exist; materialize the asset that writes it first"
        )
    store = root.path(rel) if root.is_local else root.url(rel)
    return zarr.open_group(store, mode="r")


def read_group(root: DataRoot, rel: str, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    group = open_group(root, rel)
    keys = names or sorted(group.array_keys())
    return {k: group[k][...] for k in keys}, dict(group.attrs)
