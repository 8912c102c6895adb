"""One damaged row hides only itself: a row that cannot be decoded (bytes that are not UTF-8 in any text column)
is an unreadable row with its problem, and the blueprint's other rows stay usable by Kasmina."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
import torch

from esper.catalog import load_catalog
from esper.kasmina import COMPILED, EAGER, Kasmina
from esper.urza import Urza
from tests.support import TINY

COLUMNS = ["failure_reason", "meta", "profile", "variant", "guards", "parity", "created_at"]


def copy_row(db: Path, entry_id: int, **columns: object) -> int:
    """A new row copied from ``entry_id`` with ``columns`` changed; ``bytes`` values are stored as TEXT."""
    conn = sqlite3.connect(db)
    names = [r[1] for r in conn.execute("PRAGMA table_info(entries)") if r[1] != "id"]
    listed = ", ".join(names)
    new = conn.execute(
        f"INSERT INTO entries ({listed}) SELECT {listed} FROM entries WHERE id = ?", [entry_id]
    ).lastrowid
    for column, value in columns.items():
        cast = "CAST(? AS TEXT)" if isinstance(value, bytes) else "?"
        conn.execute(f"UPDATE entries SET {column} = {cast} WHERE id = ?", [value, new])
    conn.commit()
    conn.close()
    assert new is not None
    return new


NOT_UTF8 = b"A\xffB"


@pytest.mark.parametrize("column", COLUMNS)
def test_an_undecodable_rejected_row_leaves_the_certified_one_compiled(
    column: str, urza_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = copy_row(urza_copy, 1, status="rejected", **{column: NOT_UTF8})
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    assert kernel.route == COMPILED and kernel.entry is not None and kernel.entry.id == 1
    (record,) = [r for r in caplog.records if r.name == "esper.kasmina"]
    assert f"entry #{bad}" in record.getMessage() and "runs eager" not in record.getMessage()
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), load_catalog([TINY]).get("tiny_mlp").build().eval()(x))


def test_stored_rows_reports_the_undecodable_row_and_parses_the_others(urza_copy: Path) -> None:
    bad = copy_row(urza_copy, 1, status="rejected", failure_reason=NOT_UTF8)
    with Urza(urza_copy, readonly=True) as urza:
        rows = {r.id: r for r in urza.stored_rows()}
    assert rows[1].entry is not None
    assert rows[bad].entry is None and rows[bad].problem is not None
    assert "'failure_reason'" in rows[bad].problem and "UTF-8" in rows[bad].problem
    assert rows[bad].status == "rejected" and rows[bad].profile == "default"


def test_an_undecodable_certified_row_is_refused_as_a_row(urza_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The only certified row cannot be read: eager, and the WARNING names the row, not an unusable Urza."""
    conn = sqlite3.connect(urza_copy)
    conn.execute("UPDATE entries SET meta = CAST(? AS TEXT) WHERE id = 1", [NOT_UTF8])
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    assert kernel.route == EAGER
    reasons = [r.esper["reason"] for r in caplog.records if r.name == "esper.kasmina"]  # type: ignore[attr-defined]
    assert reasons == ["format"]
