"""Artifact storage: a data root (fsspec URI), atomic writes, Zarr arrays, Parquet + DuckDB."""

from dd_assets.storage.root import DataRoot

__all__ = ["DataRoot"]
