"""Integrity and upkeep: `esper urza verify` checks every row against its files, `gc` removes what no row
names, `export` writes a snapshot that Kasmina reads from a read-only filesystem without writing anything;
corrupt, foreign and newer databases are clear CLI errors and eager fallbacks, never overwritten; an entry
built for another platform or device is never loaded."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from esper.cli import cli
from esper.kasmina import COMPILED, EAGER, Kasmina
from esper.urza import SCHEMA_VERSION, Urza, UrzaError
from esper.urza.store import ArtifactStore

from .conftest import TINY
from .test_urza import make_entry


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for s in statements:
            conn.execute(s)
    conn.close()


def kasmina_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


# -- corrupt, foreign and newer databases ------------------------------------------------------------------


def _garbage(p: Path) -> None:
    p.write_bytes(b"garbage" * 1000)


def _newer(p: Path) -> None:
    Urza(p, signer=None).close()
    sql(p, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")


def _missing_table(p: Path) -> None:
    Urza(p, signer=None).close()
    sql(p, "DROP TABLE entries")


def _foreign(p: Path) -> None:
    sql(p, "CREATE TABLE customers (id INTEGER, name TEXT)", "INSERT INTO customers VALUES (1, 'Ada')")


DAMAGES = [
    (_garbage, "not a usable Urza database"),
    (_newer, "newer than this Esper"),
    (_missing_table, "no 'entries' table"),
    (_foreign, "a SQLite database of something else"),
]
COMMANDS = [
    ["urza", "list"],
    ["urza", "show", "tiny_mlp"],
    ["urza", "verify"],
    ["urza", "gc"],
    ["urza", "export", "{tmp}/snapshot"],
    ["compile", "tiny_mlp", "--blueprints", str(TINY)],
]


def _files(folder: Path) -> dict[str, bytes]:
    """The folder's files and their bytes, except SQLite's shared-memory sidecars: any reader of a WAL
    database creates ``-wal``/``-shm`` beside it (that is how WAL readers coordinate), which changes nothing
    in the database itself."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not _sidecar(p)}


def _sidecar(p: Path) -> bool:
    if not p.name.endswith(("-wal", "-shm")):
        return False
    db = p.with_name(p.name[:-4])
    return db.read_bytes()[18:20] == b"\x02\x02"  # only a WAL-mode database has them


@pytest.mark.parametrize(("damage", "fragment"), DAMAGES, ids=lambda v: getattr(v, "__name__", ""))
def test_every_command_gives_a_clear_error_and_leaves_the_file_alone(
    tmp_path: Path, damage: Callable[[Path], None], fragment: str
) -> None:
    db = tmp_path / "lib" / "urza.db"
    db.parent.mkdir()
    damage(db)
    before = _files(db.parent)
    runner = CliRunner()
    for command in COMMANDS:
        args = [a.replace("{tmp}", str(tmp_path)) for a in command]
        result = runner.invoke(cli, [*args, "--urza", str(db)])
        assert result.exit_code == 1, (command, result.output)
        assert fragment in result.output and "Traceback" not in result.output, (command, result.output)
    assert _files(db.parent) == before  # same files, same bytes: no -wal, no -shm, no migration
    assert not (tmp_path / "snapshot").exists()


@pytest.mark.parametrize(("damage", "fragment"), DAMAGES, ids=lambda v: getattr(v, "__name__", ""))
def test_kasmina_runs_eager_with_a_warning_on_a_bad_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None], fragment: str
) -> None:
    db = tmp_path / "urza.db"
    damage(db)
    before = _files(tmp_path)
    kernel = Kasmina(db, blueprint_paths=[TINY]).load("tiny_mlp")
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), kernel.eager_module()(x))
    assert kernel.route == EAGER
    (message,) = kasmina_warnings(caplog)
    assert "(urza-unavailable)" in message and fragment in message
    assert _files(tmp_path) == before


# -- compatibility -------------------------------------------------------------------------------------------


@pytest.mark.compiles
@pytest.mark.parametrize(
    ("column", "value"),
    [("platform", "windows-AMD64"), ("device_type", "cuda"), ("isa", "AVX512_BF16"), ("torch_version", "2.99.0")],
)
def test_entry_built_elsewhere_is_never_loaded(
    urza_copy: Path, caplog: pytest.LogCaptureFixture, column: str, value: str
) -> None:
    sql(urza_copy, f"UPDATE entries SET {column} = '{value}'")
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    assert kernel.route == EAGER
    (message,) = kasmina_warnings(caplog)
    assert "(incompatible)" in message and f"{column} '{value}'" in message


# -- the store repairs, verify reports ------------------------------------------------------------------------


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
    assert "entry #5 escape (certified): PROBLEM: checksum '../../../etc/passwd' is not a sha256 hex digest" in lines
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
    assert sorted(p.name for p in dest.iterdir()) == ["objects", "urza.db"]
    assert oct(snap.stat().st_mode & 0o777) == oct(0o444)
    with Urza(snap, readonly=True) as urza:
        assert urza.entries() == [shipped]  # same id, timestamps, evidence and signature
        assert urza.verify().ok
    again = CliRunner().invoke(cli, ["urza", "export", str(dest), "--urza", str(db)])
    assert again.exit_code == 1 and "exists and is not an empty folder" in again.output


def test_export_refuses_a_damaged_certified_entry(tmp_path: Path) -> None:
    db = _library(tmp_path)
    with Urza(db, readonly=True) as urza, pytest.raises(UrzaError, match=r"cannot export entry #\d+ \(\w+\).*verify"):
        urza.export(tmp_path / "snap")
    assert not (tmp_path / "snap").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".snap.partial-")]


def _tree(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
    } | {".": (0, folder.stat().st_mtime_ns, folder.stat().st_mode)}


@pytest.mark.compiles
def test_kasmina_loads_a_snapshot_without_changing_anything_in_it(
    urza_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Urza(urza_copy, readonly=True) as urza:
        urza.export(tmp_path / "snap")
    before = _tree(tmp_path / "snap")
    kernel = Kasmina(tmp_path / "snap" / "urza.db", blueprint_paths=[TINY]).load("tiny_mlp")
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), kernel.eager_module()(x), atol=1e-5, rtol=1e-5)
    assert kernel.route == COMPILED and kasmina_warnings(caplog) == []
    # No -wal, -shm or -journal file, no changed byte or mtime (root ignores permission bits, so this is the
    # check that the reader did not write, rather than that it could not).
    assert _tree(tmp_path / "snap") == before


def _can_mount_read_only() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.compiles
@pytest.mark.skipif(not _can_mount_read_only(), reason="needs `unshare -rm` (user and mount namespaces)")
def test_kasmina_loads_a_snapshot_from_a_read_only_mount(urza_copy: Path, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    with Urza(urza_copy, readonly=True) as urza:
        urza.export(snap)
    script = textwrap.dedent(f"""
        import json, os, torch
        from esper.kasmina import Kasmina
        from esper.urza import Urza
        snap = {str(snap)!r}
        try:
            open(os.path.join(snap, "probe"), "w")
            writable = True
        except OSError as e:
            writable = e.strerror
        with Urza(os.path.join(snap, "urza.db"), readonly=True) as urza:
            verified = urza.verify().ok
        kernel = Kasmina(os.path.join(snap, "urza.db"), blueprint_paths=[{str(TINY)!r}]).load("tiny_mlp")
        x = torch.randn(5, 8)
        with torch.no_grad():
            err = float((kernel(x) - kernel.eager_module()(x)).abs().max())
        print(json.dumps({{"writable": writable, "verified": verified, "route": kernel.route,
                          "path": kernel.last_path, "err": err}}))
    """)
    mount = f'mount --bind {snap} {snap} && mount -o remount,bind,ro {snap} && exec {sys.executable} -c "$0"'
    out = subprocess.run(["unshare", "-rm", "sh", "-c", mount, script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["writable"] == "Read-only file system"
    assert result == {**result, "verified": True, "route": COMPILED, "path": COMPILED}
    assert result["err"] <= 1e-5
