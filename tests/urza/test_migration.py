"""The Urza of the previous release (schema version 1, built by its own code: tests/fixtures/urza_v1/build.py)
opens with today's code: migrated in place to the current schema, every row kept as it was, each row's
artifact kind filled in, and ``verify`` (signatures included) as clean as it was before."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.signing import Signer, Verifier, generate_keypair
from esper.cli import cli
from esper.urza import SCHEMA_VERSION, Urza, UrzaError
from esper.urza.db import MIGRATIONS
from esper.urza.maintenance import sign_all, verify
from tests.support import FIXTURES

PREVIOUS = FIXTURES / "urza_v1"


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """A writable copy of the previous release's Urza (migration changes the file)."""
    dest = tmp_path / "lib"
    shutil.copytree(PREVIOUS, dest, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest / "urza.db"


def raw_rows(path: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM entries ORDER BY id")]
    finally:
        conn.close()


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_fixture_is_the_previous_schema(previous: Path) -> None:
    assert user_version(previous) == 1 < SCHEMA_VERSION
    rows = raw_rows(previous)
    assert "artifact" not in rows[0]
    assert [(r["id"], r["variant"], r["status"]) for r in rows] == [
        (1, "default", "certified"),
        (2, "train", "certified"),
        (3, "freezing", "rejected"),
    ]


def test_a_reader_refuses_the_unmigrated_file_untouched(previous: Path) -> None:
    before = previous.read_bytes()
    with pytest.raises(UrzaError, match=r"schema version 1, expected \d+ \(migrate it\)"):
        Urza(previous, readonly=True)
    assert previous.read_bytes() == before


def test_a_writer_migrates_it_and_keeps_every_row(previous: Path) -> None:
    before = raw_rows(previous)
    with Urza(previous, signer=None) as urza:
        assert urza.migrate(dry_run=True) == []
        applied = [r["name"] for r in urza.db["_urza_migrations"].rows]
        entries = {e.id: e for e in urza.entries()}
    assert user_version(previous) == SCHEMA_VERSION == 2
    assert applied == [name for name, _ in MIGRATIONS]
    # Every column the previous release wrote is unchanged, ids, timestamps and signatures included.
    after = raw_rows(previous)
    assert [{k: r[k] for k in before[0]} for r in after] == before
    assert {i: (e.artifact, e.variant) for i, e in entries.items()} == {
        1: (ArtifactKind.INFERENCE, "default"),
        2: (ArtifactKind.TRAINING, "train"),
        3: (ArtifactKind.INFERENCE, "freezing"),
    }
    with Urza(previous, readonly=True) as urza:  # a reader opens the migrated file
        assert [e.id for e in urza.entries(artifact=ArtifactKind.TRAINING)] == [2]
        assert [e.id for e in urza.entries(artifact=ArtifactKind.INFERENCE)] == [3, 1]


def test_verify_is_as_clean_after_migration_as_before(previous: Path) -> None:
    Urza(previous, signer=None).close()
    with Urza(previous, readonly=True) as urza:
        report = verify(urza)
        signed_then = verify(urza, Verifier.from_file(previous.parent / "esper-signing.pub"))
    assert report.ok, report.problems
    assert [(r.entry_id, r.problem) for r in report.rows] == [(1, None), (2, None), (3, None)]
    assert not report.unreferenced and not report.leftovers
    # The previous release's signatures cover the columns of its payload format; whatever today's format makes
    # of them, the artifacts they vouch for are still whole: only the signature can be in question.
    assert [r.entry_id for r in signed_then.rows] == [1, 2, 3]
    assert all(
        r.problem is None or (r.problem.startswith("signature: ") and ";" not in r.problem) for r in signed_then.rows
    )


def test_signing_the_migrated_rows_again_makes_them_verify(previous: Path, tmp_path: Path) -> None:
    """The upgrade path for a signed library: migrate, then `esper urza sign` with the current key."""
    keys = generate_keypair(tmp_path / "keys")
    with Urza(previous, signer=Signer.from_file(keys.private)) as urza:
        report = sign_all(urza)
    assert report.signed == (1, 2, 3) and report.skipped == ()
    with Urza(previous, readonly=True) as urza:
        after = verify(urza, Verifier.from_file(keys.public))
        assert [e.artifact for e in urza.entries()] == ["inference", "training", "inference"]
    assert after.ok and after.signatures_checked, after.problems


def test_the_cli_lists_the_migrated_rows_with_their_kind(previous: Path) -> None:
    Urza(previous, signer=None).close()
    result = CliRunner().invoke(cli, ["urza", "list", "--json", "--urza", str(previous)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["id"], r["artifact"], r["variant"]) for r in rows] == [
        (3, "inference", "freezing"),
        (2, "training", "train"),
        (1, "inference", "default"),
    ]
