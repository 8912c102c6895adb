"""Integrity: corrupt, foreign and newer databases are clear CLI errors and eager fallbacks, never overwritten;
an entry built for another platform or device is never loaded; Kasmina reads an exported snapshot from a
read-only filesystem without writing anything. (The upkeep commands themselves, verify, gc, sign and export,
are tested in tests/urza/test_maintenance.py.)"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from esper.cli import cli
from esper.kasmina import COMPILED, EAGER, Kasmina
from esper.urza import SCHEMA_VERSION, Urza
from esper.urza.maintenance import export
from tests.support import TINY


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


# -- snapshots on read-only filesystems ---------------------------------------------------------------------


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
        export(urza, tmp_path / "snap")
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
        export(urza, snap)
    script = textwrap.dedent(f"""
        import json, os, torch
        from esper.kasmina import Kasmina
        from esper.urza import Urza
        from esper.urza.maintenance import verify
        snap = {str(snap)!r}
        try:
            open(os.path.join(snap, "probe"), "w")
            writable = True
        except OSError as e:
            writable = e.strerror
        with Urza(os.path.join(snap, "urza.db"), readonly=True) as urza:
            verified = verify(urza).ok
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
