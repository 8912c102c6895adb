"""Disk full, database full, read-only: I/O failures as one-line messages instead of tracebacks.

A full disk during a compile or a full database during ``esper urza sign`` loses nothing (every write is
atomic: see docs/security.md), but the user must be told what happened and what to do. :func:`describe`
turns the exceptions such failures raise (``OSError`` with ``ENOSPC``/``EDQUOT``/``EROFS``/``EACCES``/``EIO``,
``sqlite3.OperationalError`` "database or disk is full", "attempt to write a readonly database", "disk I/O
error", ``sqlite3.DatabaseError`` "file is not a database" / "database disk image is malformed") into such a
message; :func:`reported` re-raises them as the caller's error type (the CLI passes ``click.ClickException``).
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Callable, Iterator

_ERRNO_HINTS = {
    errno.ENOSPC: "no space left on the device: free some space (esper urza gc removes unreferenced artifacts)",
    errno.EDQUOT: "disk quota exceeded: free some space or raise the quota",
    errno.EROFS: "the file system is read-only: use a writable Urza, or export a snapshot for readers",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "an I/O error from the device",
}
_SQLITE_HINTS = (
    ("database or disk is full", "the database or its disk is full: free some space (nothing was half-written)"),
    ("readonly database", "the database is read-only: open a writable copy, or export a snapshot for readers"),
    ("disk i/o error", "a disk I/O error while reading or writing the database"),
    ("malformed", "the database file is damaged (database disk image is malformed): restore it or re-export"),
    ("not a database", "the file is not an SQLite database"),
    ("unable to open", "the database cannot be opened (missing folder or no permission)"),
)

IO_ERRORS: tuple[type[BaseException], ...] = (OSError, sqlite3.DatabaseError)


def describe(e: BaseException, what: str = "") -> str | None:
    """A one-line message for an I/O failure ``e`` (while doing ``what``), ``None`` when ``e`` is not one."""
    prefix = f"{what}: " if what else ""
    if isinstance(e, OSError):
        hint = _ERRNO_HINTS.get(e.errno or -1, e.strerror or str(e))
        where = f" ({e.filename})" if e.filename else ""
        return f"{prefix}{hint}{where}"
    if isinstance(e, sqlite3.DatabaseError):
        text = str(e).lower()
        for needle, hint in _SQLITE_HINTS:
            if needle in text:
                return f"{prefix}{hint}"
        return f"{prefix}database error: {e}"
    return None


@contextlib.contextmanager
def reported(error: Callable[[str], BaseException], what: str = "") -> Iterator[None]:
    """Run the body; an I/O failure leaves it as ``error(message)`` (chained), anything else unchanged."""
    try:
        yield
    except IO_ERRORS as e:
        message = describe(e, what)
        assert message is not None
        raise error(message) from e
