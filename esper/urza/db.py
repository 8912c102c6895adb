"""Urza: the artifact library, a SQLite database (through sqlite-utils) plus an :class:`ArtifactStore`.

Writers (Tezzeret, certification) open it read-write in WAL mode with a busy timeout and keep transactions
short; readers (Kasmina) open it read-only, so nothing a training process does can change it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from esper.compat import CompatKey
from esper.guards import SchemaVersionError
from esper.urza.schema import Entry
from esper.urza.store import ArtifactStore

BUSY_TIMEOUT_MS = 30_000
MIGRATIONS_TABLE = "_urza_migrations"


class UrzaError(RuntimeError):
    """Urza cannot be used: not a database, a newer schema, a missing table, an unknown entry."""


def _m001_entries(db: sqlite_utils.Database) -> None:
    db["entries"].create(
        {
            "id": int,
            "blueprint": str,
            "blueprint_version": int,
            "profile": str,
            "variant": str,
            "content_hash": str,
            "torch_version": str,
            "platform": str,
            "isa": str,
            "device_type": str,
            "kind": str,
            "status": str,
            "checksum": str,
            "artifact_size": int,
            "guards": str,
            "parity": str,
            "performance": str,
            "meta": str,
            "failure_reason": str,
            "failed_check": str,
            "signature": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null={"blueprint", "blueprint_version", "profile", "variant", "content_hash", "kind", "status"},
    )
    db["entries"].create_index(["blueprint", "status"])
    db["entries"].create_index(
        [
            "blueprint",
            "blueprint_version",
            "profile",
            "variant",
            "torch_version",
            "platform",
            "isa",
            "device_type",
            "content_hash",
        ]
    )


# Append only: the schema version is the number of migrations, and each runs once, in order, atomically.
MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_entries", _m001_entries),
]
SCHEMA_VERSION = len(MIGRATIONS)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    else:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


class Urza:
    """One Urza library: ``path`` is the database; artifacts live in ``objects/`` beside it."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.store = ArtifactStore(self.path.parent / "objects")
        if readonly and not self.path.is_file():
            raise UrzaError(f"Urza database {self.path} does not exist")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite_utils.Database(_connect(self.path, readonly))
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise UrzaError(f"{self.path} is not a usable Urza database: {e}") from e
        if version > SCHEMA_VERSION:
            raise UrzaError(
                f"{self.path} has Urza schema version {version}, newer than this Esper's {SCHEMA_VERSION}: "
                "upgrade Esper; the file was left untouched"
            )
        if version < SCHEMA_VERSION:
            if readonly:
                raise UrzaError(f"{self.path} has schema version {version}, expected {SCHEMA_VERSION} (migrate it)")
            self._refuse_foreign(version)
            self.migrate()
        if "entries" not in self.db.table_names():
            raise UrzaError(f"{self.path} has no 'entries' table: not an Urza database, or damaged")

    def _refuse_foreign(self, version: int) -> None:
        """Never migrate a database that some other program wrote: it would be altered under its owner."""
        tables = set(self.db.table_names())
        if version == 0 and tables - {MIGRATIONS_TABLE}:
            raise UrzaError(
                f"{self.path} is a SQLite database of something else (tables: {sorted(tables)}); refusing to modify it"
            )

    # -- schema -------------------------------------------------------------------------------------

    def migrate(self, *, dry_run: bool = False) -> list[str]:
        """Apply pending migrations in order; returns their names. ``dry_run`` only lists them."""
        done = set()
        if MIGRATIONS_TABLE in self.db.table_names():
            done = {r["name"] for r in self.db[MIGRATIONS_TABLE].rows}
        pending = [(n, fn) for n, fn in MIGRATIONS if n not in done]
        if dry_run:
            return [n for n, _ in pending]
        self.db.execute("PRAGMA journal_mode = WAL")
        for number, (name, fn) in enumerate(MIGRATIONS, start=1):
            if name not in done:
                with self.db.conn:
                    fn(self.db)
                    self.db[MIGRATIONS_TABLE].insert({"name": name, "applied_at": _now()}, pk="name")
                    self.db.execute(f"PRAGMA user_version = {number}")
        return [n for n, _ in pending]

    # -- rows ---------------------------------------------------------------------------------------

    def _rows(self, where: str, params: list[Any], order: str = "id DESC") -> Iterator[Entry]:
        try:
            for row in self.db["entries"].rows_where(where, params, order_by=order):
                yield Entry.from_row(row)
        except (sqlite3.DatabaseError, SchemaVersionError, KeyError, ValueError) as e:
            raise UrzaError(f"{self.path}: unreadable entry: {e}") from e

    def get(self, entry_id: int) -> Entry:
        for e in self._rows("id = ?", [entry_id]):
            return e
        raise UrzaError(f"no Urza entry with id {entry_id}")

    def entries(self, blueprint: str | None = None, *, status: str | None = None) -> list[Entry]:
        """Entries, newest first, optionally of one blueprint and/or status."""
        clauses, params = [], []
        if blueprint is not None:
            clauses.append("blueprint = ?")
            params.append(blueprint)
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        return list(self._rows(" AND ".join(clauses) or "1", params))

    def find(
        self,
        blueprint: str,
        blueprint_version: int,
        content_hash: str,
        compat: CompatKey,
        *,
        profile: str,
        variant: str,
    ) -> Entry | None:
        """The newest entry with exactly this identity, or ``None``."""
        where = (
            "blueprint = ? AND blueprint_version = ? AND profile = ? AND variant = ? AND content_hash = ? "
            "AND torch_version = ? AND platform = ? AND isa = ? AND device_type = ?"
        )
        params = [
            blueprint,
            blueprint_version,
            profile,
            variant,
            content_hash,
            compat.torch_version,
            compat.platform,
            compat.isa,
            compat.device_type,
        ]
        return next(self._rows(where, params), None)

    def publish(self, entry: Entry) -> Entry:
        """Insert ``entry`` (its artifact must already be in the store); returns it with its id."""
        self._writable()
        now = _now()
        row = entry.with_(created_at=now, updated_at=now).to_row()
        with self.db.conn:
            cursor = self.db.execute(
                f"INSERT INTO entries ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                list(row.values()),
            )
        return self.get(int(cursor.lastrowid or 0))

    def update(self, entry_id: int, **changes: Any) -> Entry:
        """Change an entry's status and/or evidence in one transaction; returns the new entry."""
        self._writable()
        current = self.get(entry_id)
        row = current.with_(**changes, updated_at=_now()).to_row()
        with self.db.conn:
            self.db.execute(
                f"UPDATE entries SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ?",
                [*row.values(), entry_id],
            )
        return self.get(entry_id)

    def _writable(self) -> None:
        if self.readonly:
            raise UrzaError(f"{self.path} was opened read-only")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Urza:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
