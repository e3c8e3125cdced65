"""Data roots whose path holds SQL or glob syntax: the DuckDB catalog views still exist and
read exactly the root's own Parquet files (storage/tables.py quotes and glob-escapes paths)."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

from dd_assets.storage import DataRoot
from dd_assets.storage.tables import refresh_catalog, sql_identifier, sql_literal, write_table

NASTY = ["it's", "[exp1]", "a b", "données ü", "x*?"]


@pytest.mark.parametrize("name", NASTY + [" ".join(NASTY)])
def test_catalog_views_exist_and_read_the_rows_under_a_nasty_root(tmp_path, name):
    root = DataRoot(str(tmp_path / name))
    write_table(root, "manifest/class_0000.parquet", pd.DataFrame({"x": [1, 2]}))
    write_table(root, "manifest/class_0001.parquet", pd.DataFrame({"x": [3]}))
    path = refresh_catalog(root, {"manifest": "manifest/*.parquet", "results": "reports/results.parquet"})
    con = duckdb.connect(path, read_only=True)
    try:
        views = {r[0] for r in con.execute("select view_name from duckdb_views() where not internal").fetchall()}
        assert "manifest" in views and "results" not in views  # absent tables: no view
        assert con.execute("select sum(x), count(*) from manifest").fetchone() == (6, 3)
    finally:
        con.close()
    # a second refresh (over the existing catalog) picks up a new table
    write_table(root, "reports/results.parquet", pd.DataFrame({"acc": [0.5]}))
    con = duckdb.connect(refresh_catalog(root, {"manifest": "manifest/*.parquet", "results": "reports/results.parquet"}),
                         read_only=True)
    try:
        assert con.execute("select acc from results").fetchone()[0] == 0.5
        assert con.execute("select count(*) from manifest").fetchone()[0] == 3
    finally:
        con.close()


def test_glob_syntax_in_the_root_never_matches_a_sibling(tmp_path):
    """``[exp1]`` unescaped is a character class: ``d [exp1]/t/*`` would read ``d e/t/*``."""
    root = DataRoot(str(tmp_path / "d [exp1]"))
    sibling = DataRoot(str(tmp_path / "d e"))
    write_table(root, "t/a.parquet", pd.DataFrame({"x": [1]}))
    write_table(sibling, "t/a.parquet", pd.DataFrame({"x": [100]}))
    con = duckdb.connect(refresh_catalog(root, {"t": "t/*.parquet"}), read_only=True)
    try:
        assert con.execute("select sum(x), count(*) from t").fetchone() == (1, 1)
    finally:
        con.close()


def test_quoting_helpers_round_trip_through_duckdb():
    con = duckdb.connect()
    for s in ["plain", "it's", 'say "hi"', "[exp1] données", "'; drop table x; --"]:
        assert con.execute(f"select {sql_literal(s)}").fetchone()[0] == s
        con.execute(f"create or replace view {sql_identifier(s)} as select 1 as one")
        assert con.execute(f"select one from {sql_identifier(s)}").fetchone()[0] == 1
