"""Tables: one Parquet file per partition, written atomically, plus a DuckDB catalog.

DuckDB allows one writer process, so the catalog holds only *views* over the Parquet
files and is rebuilt by the single process that asks for it (the report asset or the
CLI); partition writers never touch it.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import shutil
import tempfile

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


def sql_identifier(name: str) -> str:
    """``name`` as a DuckDB identifier: double-quoted, embedded quotes doubled."""
    return '"' + str(name).replace('"', '""') + '"'


def sql_literal(value: str) -> str:
    """``value`` as a DuckDB string literal: single-quoted, embedded quotes doubled.

    (DuckDB takes no prepared-statement parameters in DDL such as ``CREATE VIEW``.)"""
    return "'" + str(value).replace("'", "''") + "'"


def escaped_glob(base: str, pattern: str) -> str:
    """A glob matching ``pattern`` (relative, may hold ``*``) under the literal folder ``base``:
    ``*``, ``?`` and ``[`` in ``base`` are escaped (``[[]``), a syntax fsspec, Python and
    DuckDB globbing all read as the literal character."""
    return f"{glob.escape(base.rstrip('/'))}/{pattern.lstrip('/')}"


def refresh_catalog(root: DataRoot, views: dict[str, str]) -> str:
    """(Re)create DuckDB views ``name -> parquet glob (relative to root)``; local roots only.

    The root's path is data, never SQL: it is glob-escaped and quoted as a literal, the view
    name quoted as an identifier, so quotes, brackets, spaces or non-ASCII characters in the
    data root neither break the statement nor change what the glob matches.
    The catalog is built in a private temporary folder and moved into place (DuckDB derives its
    write-ahead-log path by string surgery that breaks on a ``?`` in the folder name; readers
    never see a half-rebuilt catalog either).  Objects already in it are kept."""
    path = root.local(CATALOG)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dd-catalog-") as tmpdir:
        work = os.path.join(tmpdir, CATALOG)
        if path.is_file():
            shutil.copyfile(path, work)
        con = duckdb.connect(work)
        try:
            for name, rel_glob in views.items():
                pattern = escaped_glob(root.base, rel_glob)
                view = sql_identifier(name)
                if root.fs.glob(pattern):
                    con.execute(
                        f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet({sql_literal(pattern)}, union_by_name=true)"
                    )
                else:
                    con.execute(f"DROP VIEW IF EXISTS {view}")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        with root.atomic_file(CATALOG) as tmp:
            shutil.copyfile(work, tmp)
    return str(path)
