"""Urza: rows round-trip, migrations are code, foreign or newer databases are refused untouched, and the
artifact store only ever hands out files that hash to what the row says."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from esper.artifacts.compat import CompatKey, current
from esper.urza import SCHEMA_VERSION, ArtifactError, Entry, Urza, UrzaError
from esper.urza.db import MIGRATIONS
from esper.urza.store import ArtifactStore
from tests.support import GUARDS, make_entry


def test_entry_round_trip(tmp_path: Path) -> None:
    with Urza(tmp_path / "urza.db") as urza:
        entry = make_entry(urza, tmp_path)
        assert entry.id is not None and entry.created_at
        again = urza.get(entry.id)
    assert again == entry
    assert again.guards == GUARDS
    with Urza(tmp_path / "urza.db", readonly=True) as ro:
        assert ro.find("b", 1, "c" * 64, current(), profile="default", variant="default") == entry
        assert ro.entries("b", status="compiled") == [entry]
        assert ro.entries("b", status="certified") == []


def test_update_changes_status_and_evidence(tmp_path: Path) -> None:
    with Urza(tmp_path / "urza.db") as urza:
        entry = make_entry(urza, tmp_path)
        certified = urza.update(entry.id, status="certified", parity={"certify": {"cases": 3}})  # type: ignore[arg-type]
    assert certified.status == "certified" and certified.parity == {"certify": {"cases": 3}}
    assert certified.created_at == entry.created_at and certified.updated_at >= entry.updated_at  # type: ignore[operator]


def test_invalid_status_is_refused() -> None:
    with pytest.raises(ValueError, match="status 'great'"):
        Entry("b", 1, "c", current(), "aoti", "great", "0" * 64, 1, None)


def test_migrations_are_recorded_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "urza.db"
    Urza(path).close()
    with Urza(path) as urza:
        assert urza.migrate(dry_run=True) == []
        names = [r["name"] for r in urza.db["_urza_migrations"].rows]
        assert names == [n for n, _ in MIGRATIONS]
        assert urza.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert urza.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "urza.db"
    Urza(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(UrzaError, match="newer than this Esper"):
        Urza(path)
    assert path.read_bytes() == before


def test_garbage_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "urza.db"
    path.write_bytes(b"not a database at all" * 100)
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(UrzaError, match="not a usable Urza database"):
            Urza(path, readonly=readonly)
    assert path.read_bytes() == before


def test_foreign_sqlite_database_is_not_migrated(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(UrzaError, match="database of something else"):
        Urza(path)
    assert [r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")] == ["customers"]


def test_missing_table_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "urza.db"
    Urza(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE entries")
    conn.commit()
    conn.close()
    with pytest.raises(UrzaError, match="no 'entries' table"):
        Urza(path, readonly=True)


def test_readonly_refuses_writes_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UrzaError, match="does not exist"):
        Urza(tmp_path / "nope.db", readonly=True)
    with Urza(tmp_path / "urza.db") as urza:
        entry = make_entry(urza, tmp_path)
    with Urza(tmp_path / "urza.db", readonly=True) as ro, pytest.raises(UrzaError, match="read-only"):
        ro.update(entry.id, status="certified")  # type: ignore[arg-type]


def test_store_verifies_size_and_hash(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "objects")
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 1000)
    checksum, size = store.add(src)
    assert store.add(src) == (checksum, size)
    path = store.verify(checksum, size)
    assert path == store.path_for(checksum) and path.read_bytes() == b"x" * 1000
    path.chmod(0o644)
    path.write_bytes(b"x" * 999)
    with pytest.raises(ArtifactError, match="truncated"):
        store.verify(checksum, size)
    path.write_bytes(b"y" * 1000)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        store.verify(checksum, size)
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        store.verify(checksum, size)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ab" * 32 + "/../x", "A" * 64, "", "0" * 63])
def test_store_refuses_anything_but_a_digest(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ArtifactError, match="not a sha256 hex digest"):
        ArtifactStore(tmp_path).path_for(bad)


def test_compat_mismatch_names_each_difference() -> None:
    here = current()
    other = CompatKey("1.0", here.platform, "AVX2" if here.isa != "AVX2" else "AVX512", here.device_type)
    why = here.mismatch(other)
    assert why is not None and "torch_version '1.0'" in why and "isa" in why and "platform" not in why
    assert here.mismatch(here) is None


def test_store_add_repairs_a_damaged_file_in_place(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "objects")
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 1000)
    checksum, size = store.add(src)
    path = store.path_for(checksum)
    path.chmod(0o644)
    path.write_bytes(b"y" * 1000)  # same size, wrong content
    assert store.add(src) == (checksum, size)
    assert store.verify(checksum, size).read_bytes() == b"x" * 1000
    assert store.leftovers() == []
