"""Urza upkeep (esper/urza/maintenance.py and its ``esper urza`` commands): ``verify`` reports every row against
its files, ``gc`` removes only what no row names once it is old enough, ``sign`` signs only rows whose artifact
verifies (tested beside the keys, in tests/artifacts/test_signing.py), and ``export`` writes a complete read-only
snapshot of the certified entries or nothing."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from esper.cli import cli
from esper.urza import Urza, UrzaError
from esper.urza.maintenance import export, verify
from tests.support import make_entry


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for s in statements:
            conn.execute(s)
    conn.close()


def _library(tmp_path: Path) -> Path:
    """Five entries: good, tampered, truncated, missing, and one whose checksum points outside the store."""
    db = tmp_path / "urza.db"
    with Urza(db, signer=None) as urza:
        for k, name in enumerate(("good", "tampered", "truncated", "missing", "escape")):
            make_entry(urza, tmp_path, name=name, content=f"artifact {k}".encode() * 100, status="certified")
        paths = {e.blueprint: urza.store.path_for(e.checksum) for e in urza.entries()}
    for name, damage in (("tampered", b"X" * 1000), ("truncated", b"art")):
        paths[name].chmod(0o644)
        paths[name].write_bytes(damage)
    paths["missing"].unlink()
    sql(db, "UPDATE entries SET checksum = '../../../etc/passwd' WHERE blueprint = 'escape'")
    return db


def test_verify_reports_each_row(tmp_path: Path) -> None:
    db = _library(tmp_path)
    (db.parent / "objects" / "ab").mkdir()
    (db.parent / "objects" / "ab" / ".tmp-killed.part").write_bytes(b"half")
    result = CliRunner().invoke(cli, ["urza", "verify", "--urza", str(db)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert "entry #1 good (certified): ok" in lines
    assert any(
        line.startswith("entry #2 tampered (certified): PROBLEM: ") and "checksum mismatch" in line for line in lines
    )
    assert any(line.startswith("entry #3 truncated (certified): PROBLEM: ") and "truncated" in line for line in lines)
    assert any(line.startswith("entry #4 missing (certified): PROBLEM: ") and "is missing" in line for line in lines)
    # Refused as a value (the row is unreadable), never followed as a path.
    assert any(
        line.startswith("entry #5 escape (certified): PROBLEM: ") and "'../../../etc/passwd'" in line for line in lines
    )
    assert "1 temporary file(s) of interrupted writes; `esper urza gc` removes them" in lines
    assert lines[-1] == "5 entries checked, 4 problem(s)"


def test_gc_removes_only_unreferenced_and_leftover_files(tmp_path: Path) -> None:
    db = tmp_path / "urza.db"
    with Urza(db, signer=None) as urza:
        kept = make_entry(urza, tmp_path, name="kept")
        orphan_src = tmp_path / "orphan.bin"
        orphan_src.write_bytes(b"no row names me")
        orphan = urza.store.path_for(urza.store.add(orphan_src)[0])
        kept_path = urza.store.path_for(kept.checksum)
    leftover = orphan.parent / ".tmp-abc.part"
    leftover.write_bytes(b"half a file")
    runner = CliRunner()
    young = runner.invoke(cli, ["urza", "gc", "--urza", str(db)])  # default grace: an hour
    assert young.exit_code == 0 and "kept 2 unreferenced file(s) younger than the grace period" in young.output
    assert orphan.exists() and leftover.exists()
    old = time.time() - 7200
    for p in (orphan, leftover, kept_path):
        os.utime(p, (old, old))
    dry = runner.invoke(cli, ["urza", "gc", "--dry-run", "--urza", str(db)])
    assert dry.exit_code == 0 and f"would remove {orphan}" in dry.output and f"would remove {leftover}" in dry.output
    assert orphan.exists() and leftover.exists()
    real = runner.invoke(cli, ["urza", "gc", "--urza", str(db)])
    assert real.exit_code == 0 and "removed 2 file(s)" in real.output
    assert not orphan.exists() and not leftover.exists() and kept_path.exists()
    assert CliRunner().invoke(cli, ["urza", "verify", "--urza", str(db)]).exit_code == 0


# -- export: a snapshot for read-only filesystems ---------------------------------------------------------


def test_export_holds_certified_entries_only_in_a_rollback_journal(tmp_path: Path) -> None:
    db = tmp_path / "lib" / "urza.db"
    db.parent.mkdir()
    with Urza(db, signer=None) as urza:
        make_entry(urza, tmp_path, name="draft")
        shipped = make_entry(urza, tmp_path, name="shipped", content=b"certified bytes", status="certified")
        urza.update(shipped.id, signature="ed25519:feedfacefeedface:c2ln")  # type: ignore[arg-type]
        shipped = urza.get(shipped.id)  # type: ignore[arg-type]
    dest = tmp_path / "snap"
    result = CliRunner().invoke(cli, ["urza", "export", str(dest), "--urza", str(db)])
    assert result.exit_code == 0, result.output
    assert "exported 1 certified entries and 1 artifacts" in result.output
    snap = dest / "urza.db"
    assert snap.read_bytes()[18:20] == b"\x01\x01"  # rollback journal, not WAL
    assert sorted(p.name for p in dest.iterdir()) == ["objects", "snapshot.json", "urza.db"]
    assert oct(snap.stat().st_mode & 0o777) == oct(0o444)
    with Urza(snap, readonly=True) as urza:
        assert urza.entries() == [shipped]  # same id, timestamps, evidence and signature
        assert verify(urza).ok
    again = CliRunner().invoke(cli, ["urza", "export", str(dest), "--urza", str(db)])
    assert again.exit_code == 1 and "exists and is not an empty folder" in again.output


def test_export_refuses_a_damaged_certified_entry(tmp_path: Path) -> None:
    db = _library(tmp_path)
    with Urza(db, readonly=True) as urza, pytest.raises(UrzaError, match=r"cannot export entry #\d+ \(\w+\).*verify"):
        export(urza, tmp_path / "snap")
    assert not (tmp_path / "snap").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".snap.partial-")]


def test_an_unreadable_row_is_reported_and_its_artifact_kept(tmp_path: Path) -> None:
    db = tmp_path / "urza.db"
    with Urza(db, signer=None) as urza:
        make_entry(urza, tmp_path, name="good", status="certified")
        odd = make_entry(urza, tmp_path, name="odd", content=b"odd bytes", status="certified")
        odd_path = urza.store.path_for(odd.checksum)
    sql(db, "UPDATE entries SET guards = '{not json' WHERE blueprint = 'odd'")
    old = time.time() - 7200
    os.utime(odd_path, (old, old))
    with Urza(db, readonly=True) as urza:
        report = verify(urza)
        (bad,) = [r for r in report.rows if r.problem is not None]
        assert (bad.entry_id, bad.blueprint) == (odd.id, "odd") and bad.problem.startswith("unreadable row: ")
        with pytest.raises(UrzaError, match=rf"cannot export entry #{odd.id} \(odd\): unreadable row"):
            export(urza, tmp_path / "snap")
    result = CliRunner().invoke(cli, ["urza", "gc", "--urza", str(db)])
    assert result.exit_code == 0 and "removed 0 file(s)" in result.output, result.output
    assert odd_path.exists()  # a file that a row names is never garbage, even when the row cannot be read


# -- verify checks everything Kasmina's load relies on -------------------------------


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        (
            "meta",
            '{"profiles": 5}',
            "format: column 'meta.profiles'",
        ),  # the row that crashed load while verify said "ok"
        ("meta", '{"profiles": ["nope"]}', "format: column 'meta.profiles'"),
        ("meta", '{"representative": [{"batch": -1}]}', "format: column 'meta.representative'"),
        ("meta", '{"representative": [{}]}', "format: column 'meta.representative'"),
        ("meta", "[1, 2]", "unreadable row: "),
        ("status", "bogus", "unreadable row: "),
    ],
)
def test_verify_reports_what_load_would_refuse(tmp_path: Path, column: str, value: str, expected: str) -> None:
    db = tmp_path / "urza.db"
    with Urza(db, signer=None) as urza:
        make_entry(urza, tmp_path, name="good", status="certified")
        make_entry(urza, tmp_path, name="odd", content=b"odd bytes", status="certified")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(f"UPDATE entries SET {column} = ? WHERE blueprint = 'odd'", [value])  # column: from this file
    conn.close()
    result = CliRunner().invoke(cli, ["urza", "verify", "--urza", str(db)])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert "entry #1 good (certified): ok" in lines
    (bad,) = [line for line in lines if line.startswith("entry #2 odd")]
    assert f"PROBLEM: {expected}" in bad, bad
    assert lines[-1] == "2 entries checked, 1 problem(s)"
    assert "Traceback" not in result.output


def test_verify_reports_a_guard_predicate_that_cannot_be_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.urza import maintenance

    with Urza(tmp_path / "urza.db", signer=None) as urza:
        make_entry(urza, tmp_path, name="odd", status="certified")

    def refuse(schema: object) -> None:
        raise ValueError("dim size is not an integer")

    monkeypatch.setattr(maintenance, "compile_predicate", refuse)
    with Urza(tmp_path / "urza.db", readonly=True) as urza:
        (row,) = verify(urza).rows
    assert row.problem == "format: ValueError: dim size is not an integer"


def test_verify_reports_a_damaged_database_without_a_traceback(tmp_path: Path) -> None:
    db = tmp_path / "urza.db"
    with Urza(db, signer=None) as urza:
        for k in range(40):
            make_entry(urza, tmp_path, name=f"b{k}", content=f"artifact {k}".encode() * 50, failure_reason="x" * 900)
    sql(db, "PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page : 4 * page] = b"\xa5" * (2 * page)  # garbage over two pages past the schema
    db.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["urza", "verify", "--urza", str(db)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output


def test_verify_says_a_row_signed_under_format_1_needs_re_signing(tmp_path: Path) -> None:
    from esper.artifacts import signing

    keys = signing.generate_keypair(tmp_path / "keys")
    signer = signing.Signer.from_file(keys.private)
    db = tmp_path / "urza.db"
    with Urza(db, signer=None) as urza:
        old = make_entry(urza, tmp_path, name="old", status="certified")
        forged = make_entry(urza, tmp_path, name="forged", content=b"other", status="certified")
    v1 = signer.sign_bytes(signing.legacy_payload(old))
    sql(db, f"UPDATE entries SET signature = '{v1}' WHERE blueprint = 'old'")
    sql(db, f"UPDATE entries SET signature = '{signer.sign(forged.with_(status='rejected'))}' WHERE id = {forged.id}")
    result = CliRunner().invoke(cli, ["urza", "verify", "--urza", str(db), "--public-key", str(keys.public)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(
        line.startswith(
            "entry #1 old (certified): PROBLEM: signature: signed under esper-entry/1: re-sign with `esper urza sign`"
        )
        for line in lines
    ), lines
    (tampered,) = [line for line in lines if line.startswith("entry #2")]
    assert "does not match the entry" in tampered and "esper-entry/1" not in tampered
    with Urza(db, signer=signer) as urza:
        from esper.urza.maintenance import sign_all

        sign_all(urza)
    again = CliRunner().invoke(cli, ["urza", "verify", "--urza", str(db), "--public-key", str(keys.public)])
    assert again.exit_code == 0, again.output
