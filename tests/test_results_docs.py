"""docs/results.md is generated from the record: every docs/results/<name>.csv has its table
embedded in docs/results.md, equal to the table generated from the CSV now."""

from pathlib import Path

import pytest

from dd_assets.evaluation.publish import embedded, generated_block
from dd_assets.evaluation.results import COLUMNS, read_csv

DOCS = Path(__file__).resolve().parent.parent / "docs"
RECORDS = sorted((DOCS / "results").glob("*.csv"))


def test_there_is_a_record():
    assert RECORDS, "docs/results/<dataset>.csv is the record of every published number"


@pytest.mark.parametrize("csv", RECORDS, ids=lambda p: p.stem)
def test_docs_table_is_generated_from_the_csv(csv):
    doc = (DOCS / "results.md").read_text(encoding="utf-8")
    table = embedded(doc, csv.stem)
    assert table is not None, f"docs/results.md has no generated block for {csv.name}; run `dd-assets results`"
    assert table == generated_block(csv), f"docs/results.md disagrees with {csv.name}; run `dd-assets results`"


@pytest.mark.parametrize("csv", RECORDS, ids=lambda p: p.stem)
def test_record_rows_are_complete(csv):
    df = read_csv(csv)
    assert list(df.columns) == COLUMNS
    assert df["test_pct_mean"].between(0, 100).all() and (df["n"] >= 1).all()
    assert df["recipe"].str.len().gt(0).all() and df["commit"].str.len().gt(0).all()
    soft = df[df["labels"] != "hard"]
    assert soft["lrs"].dropna().between(0, 1).all()
