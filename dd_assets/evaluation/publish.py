"""Publish a results record into the docs: ``docs/results/<name>.csv`` is the record and
``docs/results.md`` embeds the table generated from it between markers, so the prose can
never disagree with the numbers (``tests/test_results_docs.py`` regenerates and compares)."""

from __future__ import annotations

import re
from pathlib import Path

from dd_assets.evaluation.results import markdown_table, read_csv


def markers(name: str) -> tuple[str, str]:
    return (f"<!-- results:{name} (generated from docs/results/{name}.csv by `dd-assets results`; do not edit) -->",
            f"<!-- /results:{name} -->")


def generated_block(csv_path: str | Path) -> str:
    """The markdown table generated from one results CSV."""
    return markdown_table(read_csv(csv_path))


def embed(doc: str, name: str, table: str) -> str:
    """``doc`` with the block of ``name`` replaced by ``table`` (appended when absent)."""
    begin, end = markers(name)
    block = f"{begin}\n{table.rstrip()}\n{end}"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pat.search(doc):
        return pat.sub(lambda _m: block, doc, count=1)
    return doc.rstrip("\n") + f"\n\n{block}\n"


def embedded(doc: str, name: str) -> str | None:
    """The table currently embedded for ``name`` in ``doc`` (None when there is no block)."""
    begin, end = markers(name)
    m = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), doc, re.S)
    return None if m is None else m.group(1) + "\n"


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
