"""Tables: one Parquet file per partition, written atomically, plus a DuckDB catalog.

DuckDB allows one writer process, so the catalog holds only *views* over the Parquet
files and is rebuilt by the single process that asks for it (the report asset or the
CLI); partition writers never touch it.
"""

from __future__ import annotations

import hashlib
import io

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dd_assets.storage.root import DataRoot

CATALOG = "catalog.duckdb"


def write_table(
    root: DataRoot,
    rel: str,
    df: pd.DataFrame,
    metadata: dict[str, str] | None = None,
    hash_exclude: tuple[str, ...] = (),
) -> str:
    """Write ``df`` to Parquet at ``rel`` atomically; returns a hash of the table content.

    ``hash_exclude`` names columns left out of the hash (run ids and other values that
    differ between identical runs), so the hash can serve as the data version.
    """
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({f"dd_assets.{k}".encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    hashed = table.drop_columns([c for c in hash_exclude if c in table.column_names])
    pq.write_table(hashed.replace_schema_metadata(None), buf)  # content hash without metadata
    content_hash = hashlib.sha256(buf.getvalue()).hexdigest()[:16]
    with root.atomic_file(rel) as tmp:
        pq.write_table(table, tmp)
    return content_hash


def read_table(root: DataRoot, rel: str) -> pd.DataFrame:
    if not root.exists(rel):
        raise FileNotFoundError(f"table {root.url(rel)} does not exist; materialize the asset that writes it first")
    with root.fs.open(root.path(rel), "rb") as fh:
        return pq.read_table(fh).to_pandas()


def read_tables(root: DataRoot, rels: list[str]) -> pd.DataFrame:
    frames = [read_table(root, r) for r in rels]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def refresh_catalog(root: DataRoot, views: dict[str, str]) -> str:
    """(Re)create DuckDB views ``name -> parquet glob (relative to root)``; local roots only."""
    path = root.local(CATALOG)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    try:
        for name, glob in views.items():
            full = root.path(glob)
            if root.fs.glob(full):
                con.execute(
                    f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{full}', union_by_name=true)"
                )
            else:
                con.execute(f"DROP VIEW IF EXISTS {name}")
    finally:
        con.close()
    return str(path)
