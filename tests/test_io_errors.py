"""Disk full and database full: a message, never a raw traceback, and nothing half-made."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from esper import io_errors
from esper.artifacts import signing
from esper.artifacts.signing import SigningError
from esper.cli import ReportedCommand, cli


def full_database(tmp_path: Path) -> sqlite3.OperationalError:
    """A real "database or disk is full" from SQLite: a page cap stands in for a full disk."""
    conn = sqlite3.connect(tmp_path / "full.db")
    conn.execute("CREATE TABLE t (x BLOB)")
    conn.execute("PRAGMA max_page_count = 3")
    try:
        conn.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    except sqlite3.OperationalError as e:
        return e
    finally:
        conn.close()
    raise AssertionError("SQLite accepted a row beyond max_page_count")


def test_io_failures_are_described_in_one_line(tmp_path: Path) -> None:
    full = full_database(tmp_path)
    assert "database or disk is full" in str(full)
    assert io_errors.describe(full, "signing") == (
        "signing: the database or its disk is full: free some space (nothing was half-written)"
    )
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/u/objects/ab/.tmp-1")
    assert io_errors.describe(enospc) == (
        "no space left on the device: free some space (esper urza gc removes unreferenced artifacts) "
        "(/u/objects/ab/.tmp-1)"
    )
    assert "read-only" in (io_errors.describe(OSError(errno.EROFS, "Read-only file system")) or "")
    assert io_errors.describe(ValueError("x")) is None
    with (
        pytest.raises(RuntimeError, match=r"^compile: no space left") as info,
        io_errors.reported(RuntimeError, "compile"),
    ):
        raise enospc
    assert info.value.__cause__ is enospc
    with pytest.raises(KeyError), io_errors.reported(RuntimeError):
        raise KeyError("not an I/O error: unchanged")


def test_keygen_on_a_full_disk_is_a_message_and_leaves_no_half_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the public key, after the private key was written whole
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(signing.os, "fsync", fsync)
    with pytest.raises(SigningError, match=r"cannot write the key pair.*no space left on the device"):
        signing.generate_keypair(tmp_path / "k")
    assert list((tmp_path / "k").iterdir()) == []  # no private key without its public key
    calls["n"] = 1
    result = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "k")])
    assert result.exit_code == 1 and "no space left on the device" in result.output
    assert "Traceback" not in result.output


def test_urza_sign_on_a_full_database_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.urza import maintenance

    def full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(maintenance, "sign_all", full)
    result = CliRunner().invoke(cli, ["urza", "sign", "--urza", str(tmp_path / "urza.db")])
    assert result.exit_code == 1 and "the database or its disk is full" in result.output
    assert not isinstance(result.exception, sqlite3.Error)


def test_compile_on_a_full_disk_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.tezzeret.compiler import Tezzeret
    from tests.support import good, write

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "objects" / ".tmp-x"))

    write(tmp_path / "bps", "lin.py", good())
    monkeypatch.setattr(Tezzeret, "compile_candidates", full)
    result = CliRunner().invoke(
        cli, ["compile", "--urza", str(tmp_path / "urza.db"), "--blueprints", str(tmp_path / "bps")]
    )
    assert result.exit_code == 1 and "no space left on the device" in result.output
    assert not isinstance(result.exception, OSError)


def _commands(group: click.Group) -> list[click.Command]:
    out: list[click.Command] = []
    for command in group.commands.values():
        out.extend(_commands(command) if isinstance(command, click.Group) else [command])
    return out


def test_every_command_reports_io_errors() -> None:
    """Wired once (esper.cli.EsperGroup), so a command added later cannot miss it."""
    commands = _commands(cli)
    assert len(commands) >= 9
    assert all(isinstance(c, ReportedCommand) for c in commands), [c.name for c in commands]


def test_a_read_only_file_system_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.urza import db

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "ro"))

    monkeypatch.setattr(db.Path, "mkdir", read_only)
    result = CliRunner().invoke(cli, ["urza", "sign", "--urza", str(tmp_path / "ro" / "urza.db")])
    assert result.exit_code == 1 and "read-only" in result.output and "urza sign" in result.output, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, OSError)
