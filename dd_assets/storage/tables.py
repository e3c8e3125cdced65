"""Tables: one Parquet file per partition, written atomically, plus a DuckDB catalog.

Table code builds and reads Polars frames; :func:`write_table` also takes pandas and writes
both through one Arrow normalization, so a table's bytes -- and its content hash, the asset's
data version -- do not depend on which library built it (:func:`arrow_table`).
:func:`read_table_pl` / :func:`read_tables_pl` read Polars; :func:`read_table` gives pandas
(tests and notebooks; no pipeline code reads it).

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
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dd_assets.storage.root import DataRoot

CATALOG = "catalog.duckdb"

Frame = pd.DataFrame | pl.DataFrame


def _pandas_type(t: pa.DataType, nested: bool = False) -> pa.DataType:
    """The Arrow type ``pa.Table.from_pandas`` gives the values Polars holds as ``t``: a column
    of pandas' ``str`` dtype is ``large_string``, strings inside list cells (Python objects)
    ``string``, list cells ``list`` (not ``large_list``), bytes ``binary``."""
    if pa.types.is_string_view(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.string() if nested else pa.large_string()
    if pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
        return pa.binary()
    if (pa.types.is_large_list(t) or pa.types.is_list(t) or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t) or pa.types.is_fixed_size_list(t)):
        return pa.list_(_pandas_type(t.value_type, nested=True))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _pandas_type(f.type, nested=True), f.nullable) for f in t])
    return t


def _nan_to_null(dtype: pl.DataType, expr: pl.Expr) -> pl.Expr:
    """``expr`` with float NaN as null, also inside lists (pandas' missing-value convention,
    which ``from_pandas`` applies when it converts)."""
    if dtype.is_float():
        return expr.fill_nan(None)
    if isinstance(dtype, (pl.List, pl.Array)) and (dtype.inner.is_float() or isinstance(dtype.inner, (pl.List, pl.Array))):
        return expr.list.eval(_nan_to_null(dtype.inner, pl.element())) if isinstance(dtype, pl.List) else expr
    return expr


def arrow_table(df: Frame, schema: pa.Schema | None = None) -> pa.Table:
    """``df`` as the Arrow table :func:`write_table` stores.

    pandas: ``pa.Table.from_pandas`` (index dropped), as always.  Polars: the same Arrow a
    pandas frame of the same values gives -- NaN stored as null, ``large_string`` strings,
    ``list`` lists, one chunk -- so the Parquet bytes and the content hash do not change
    when a table's code moves to Polars.  ``schema`` (optional) casts the result to exactly
    these columns and types (e.g. a column pandas stored as ``string`` or ``null``)."""
    if isinstance(df, pl.DataFrame):
        fixed = df.with_columns([_nan_to_null(dt, pl.col(name)) for name, dt in df.schema.items()
                                 if dt.is_float() or isinstance(dt, pl.List)])
        table = fixed.rechunk().to_arrow()
        table = table.cast(pa.schema([pa.field(f.name, _pandas_type(f.type), f.nullable) for f in table.schema]))
        table = table.replace_schema_metadata(None).combine_chunks()
    elif isinstance(df, pd.DataFrame):
        table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    else:
        raise TypeError(f"write_table takes a pandas or Polars DataFrame, got {type(df).__name__}")
    if schema is not None:
        missing = [n for n in schema.names if n not in table.column_names]
        if missing:
            raise ValueError(f"table lacks columns {missing} of its declared schema")
        table = table.select(schema.names).cast(pa.schema(list(schema)), safe=True)
    return table


def write_table(
    root: DataRoot,
    rel: str,
    df: Frame,
    metadata: dict[str, str] | None = None,
    hash_exclude: tuple[str, ...] = (),
    schema: pa.Schema | None = None,
) -> str:
    """Write ``df`` (pandas or Polars) to Parquet at ``rel`` atomically; returns a hash of the
    table content.

    ``hash_exclude`` names columns left out of the hash (run ids and other values that
    differ between identical runs), so the hash can serve as the data version.  A Polars
    frame hashes exactly as the pandas frame of the same values (:func:`arrow_table`);
    ``schema`` casts to declared columns and Arrow types first.
    """
    table = arrow_table(df, schema)
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


def read_table_pl(root: DataRoot, rel: str, columns: list[str] | None = None) -> pl.DataFrame:
    """The table at ``rel`` as a Polars frame (``columns``: only these)."""
    if not root.exists(rel):
        raise FileNotFoundError(f"table {root.url(rel)} does not exist; materialize the asset that writes it first")
    with root.fs.open(root.path(rel), "rb") as fh:
        return pl.from_arrow(pq.read_table(fh, columns=columns).replace_schema_metadata(None))


def concat_pl(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Stack tables by column name (pandas ``concat`` semantics: a column missing from a frame
    is null there, types widen to a common one)."""
    frames = [f for f in frames if f.width]
    if not frames:
        return pl.DataFrame()
    if len(frames) == 1:
        return frames[0]
    return pl.concat(frames, how="diagonal_relaxed")


def read_tables_pl(root: DataRoot, rels: list[str], columns: list[str] | None = None) -> pl.DataFrame:
    """The tables at ``rels`` stacked into one Polars frame (an empty frame for none)."""
    return concat_pl([read_table_pl(root, r, columns) for r in rels])


def as_polars(df: Frame | None) -> pl.DataFrame | None:
    """A pandas frame (index dropped) as Polars; a Polars frame (or None) as it is."""
    if df is None or isinstance(df, pl.DataFrame):
        return df
    if isinstance(df, pd.DataFrame):
        return pl.from_pandas(df.reset_index(drop=True))
    raise TypeError(f"expected a pandas or Polars DataFrame, got {type(df).__name__}")


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
