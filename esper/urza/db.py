"""Urza: the artifact library, a SQLite database (through sqlite-utils) plus an :class:`ArtifactStore`.

Writers (Tezzeret, certification) open it read-write in WAL mode with a busy timeout; every write is one short
``BEGIN IMMEDIATE`` transaction, so concurrent writers queue for the lock instead of failing or interleaving a
read-modify-write. When a signing key is configured (``$ESPER_SIGNING_KEY`` or ``Urza(signer=...)``) every
row a writer stores is signed here, in the one place rows are written. Readers (Kasmina) open it read-only, so
nothing a training process does can change it; a snapshot on a read-only filesystem is opened immutable.

Upkeep (verify, gc, sign, export) is in :mod:`esper.urza.maintenance`: functions that take an :class:`Urza`,
so this module knows nothing of them and the two never import each other.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esper.artifacts.compat import CompatKey
from esper.artifacts.guards import SchemaVersionError
from esper.urza.schema import Entry
from esper.urza.store import ArtifactStore

if TYPE_CHECKING:
    import sqlite_utils

    from esper.artifacts.signing import Signer

BUSY_TIMEOUT_MS = 30_000
MIGRATIONS_TABLE = "_urza_migrations"
# Versions of the snapshots exported from this Urza (esper.urza.snapshot). Created by the first export, not by a
# migration: readers never need it, and a migration would make every existing snapshot an older schema.
SNAPSHOTS_TABLE = "_urza_snapshots"
FROM_ENV = "env"  # Urza(signer=FROM_ENV): sign with the key named by $ESPER_SIGNING_KEY, if it is set
SQLITE_MAGIC = b"SQLite format 3\x00"


class UrzaError(RuntimeError):
    """Urza cannot be used: not a database, a newer schema, a missing table, an unknown entry."""


@dataclass(frozen=True)
class StoredRow:
    """One stored row as upkeep sees it: its id, blueprint, status and checksum columns as stored, and either
    the parsed ``entry`` or the ``problem`` that makes it unreadable. ``profile``: the profile column when it
    is readable text (an unreadable row may still say which shape profile it was for)."""

    id: int
    blueprint: str
    status: str
    checksum: str | None
    entry: Entry | None
    problem: str | None
    profile: str | None = None


class Undecodable(bytes):
    """A text value that is not valid UTF-8, as its raw bytes: what a row's column holds instead of a
    ``str`` when it cannot be decoded, so the row is reported unreadable and the others still are read."""

    def __str__(self) -> str:
        return self.decode("utf-8", errors="backslashreplace")


def _text(data: bytes) -> str | Undecodable:
    """SQLite's text to ``str``; undecodable bytes to :class:`Undecodable` rather than an error that would
    abort the whole query (and with it every other row)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Undecodable(data)


def _m001_entries(db: sqlite_utils.Database) -> None:
    db.table("entries").create(
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
    db.table("entries").create_index(["blueprint", "status"])
    db.table("entries").create_index(
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


def _m002_artifact(db: sqlite_utils.Database) -> None:
    """An explicit artifact kind per row. Before it, training rows were told apart by ``variant = 'train'``;
    those rows keep that variant (it is signed) and are marked ``training`` here, every other row
    ``inference``. New rows carry the Inductor variant in ``variant`` and the kind in ``artifact``."""
    db.table("entries").add_column("artifact", str, not_null_default="inference")
    db.execute("UPDATE entries SET artifact = 'training' WHERE variant = 'train'")
    db.table("entries").create_index(["blueprint", "artifact", "status"])


# Append only: the schema version is the number of migrations, and each runs once, in order, atomically.
MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_entries", _m001_entries),
    ("002_artifact", _m002_artifact),
]
SCHEMA_VERSION = len(MIGRATIONS)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _journal(path: Path) -> str | None:
    """``"wal"`` or ``"rollback"`` from the file header (bytes 18-19), ``None`` if it is not SQLite."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return None
    if len(header) < 20 or not header.startswith(SQLITE_MAGIC):
        return None
    return "wal" if header[18] == 2 else "rollback"


def _read_only_folder(path: Path) -> bool:
    # access() answers EROFS for a read-only mount even for root, for whom permission bits do not count.
    return not os.access(path.resolve().parent, os.W_OK)


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        if _read_only_folder(path) and _journal(path) == "rollback":
            # A snapshot on a read-only filesystem: nobody can write it, so SQLite need take no locks and look
            # for no hot journal (which it could not create or remove anyway).
            uri += "&immutable=1"
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    else:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000)
    conn.text_factory = _text
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _plain(value: Any) -> str | None:
    """A column's value when it is readable text, else ``None``."""
    return value if type(value) is str else None


def _os_problem(e: OSError) -> str:
    return f"{e.strerror or type(e).__name__}" + (f" ({e.filename})" if e.filename else "")


def _resolve_signer(signer: Signer | str | None) -> Signer | None:
    if signer != FROM_ENV:
        return signer  # type: ignore[return-value]
    from esper.artifacts.signing import SigningError, signer_from_env

    try:
        return signer_from_env()
    except SigningError as e:
        raise UrzaError(f"cannot sign Urza entries: {e}") from e


class Urza:
    """One Urza library: ``path`` is the database; artifacts live in ``objects/`` beside it.

    ``signer`` (writers only): a :class:`esper.artifacts.signing.Signer` that signs every row written, ``None`` for
    none, or by default the key named by ``$ESPER_SIGNING_KEY``.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, signer: Signer | str | None = FROM_ENV):
        self.path = Path(path)
        self.readonly = readonly
        self.store = ArtifactStore(self.path.parent / "objects")
        try:
            exists = self.path.is_file()
        except OSError as e:  # a folder on the way that cannot be searched, a symlink loop, ...
            raise UrzaError(f"Urza database {self.path} cannot be reached: {_os_problem(e)}") from e
        if readonly and not exists:
            raise UrzaError(f"Urza database {self.path} does not exist")
        self.signer = None if readonly else _resolve_signer(signer)
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = None
        try:
            conn = _connect(self.path, readonly)
            self.conn = conn
            self._db: sqlite_utils.Database | None = None
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        except (sqlite3.DatabaseError, OSError, RuntimeError) as e:  # RuntimeError: resolve() of a symlink loop
            if conn is not None:
                conn.close()
            hint = ""
            if readonly and _journal(self.path) == "wal" and _read_only_folder(self.path):
                hint = " (a WAL-mode database cannot be read from a read-only folder: ship `esper urza export`)"
            raise UrzaError(f"{self.path} is not a usable Urza database: {e}{hint}") from e
        try:
            self._check_schema(version)
        except sqlite3.DatabaseError as e:
            self.conn.close()
            if not readonly:
                raise  # a writer's failure (a full disk during a migration): the caller reports it as such
            # A reader's damaged schema (sqlite_master, the header's text encoding): not a usable database.
            raise UrzaError(f"{self.path} is not a usable Urza database: {e}") from e
        except BaseException:
            self.conn.close()
            raise

    @property
    def db(self) -> sqlite_utils.Database:
        """The sqlite-utils view of the connection, for schema work. Imported on first use: readers (Kasmina)
        query with plain sqlite3 and never pay sqlite-utils' import (~40 ms)."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn)
        return self._db

    def _tables(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]

    def _check_schema(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise UrzaError(
                f"{self.path} has Urza schema version {version}, newer than this Esper's {SCHEMA_VERSION}: "
                "upgrade Esper; the file was left untouched"
            )
        if version < SCHEMA_VERSION:
            if self.readonly:
                self._refuse_foreign(version)
                raise UrzaError(f"{self.path} has schema version {version}, expected {SCHEMA_VERSION} (migrate it)")
            self.migrate()
        if "entries" not in self._tables():
            raise UrzaError(f"{self.path} has no 'entries' table: not an Urza database, or damaged")

    def _refuse_foreign(self, version: int) -> None:
        """Never migrate a database that some other program wrote: it would be altered under its owner."""
        tables = set(self._tables())
        if version == 0 and tables - {MIGRATIONS_TABLE}:
            raise UrzaError(
                f"{self.path} is a SQLite database of something else (tables: {sorted(tables)}); refusing to modify it"
            )

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction that takes the write lock up front (``BEGIN IMMEDIATE``).

        Waiting happens at ``BEGIN`` under the busy timeout, never halfway through: reads inside see the
        latest commit and no other writer commits before this one does, so a read-modify-write loses nothing.
        """
        self._writable()
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    # -- schema -------------------------------------------------------------------------------------

    def _applied(self) -> set[str]:
        if MIGRATIONS_TABLE not in self._tables():
            return set()
        return {r[0] for r in self.conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")}

    def migrate(self, *, dry_run: bool = False) -> list[str]:
        """Apply pending migrations in order; returns their names. ``dry_run`` only lists them.

        Each migration runs in its own write transaction that first re-reads what is applied, so two
        processes opening a new Urza at once apply each migration exactly once.
        """
        if dry_run:
            done = self._applied()
            return [n for n, _ in MIGRATIONS if n not in done]
        self._writable()
        # Refuse a foreign database before anything (even the journal mode) is changed. Version and tables
        # are read in one read transaction, so another process's migration is seen entirely or not at all.
        self.conn.execute("BEGIN")
        try:
            self._refuse_foreign(self.conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            self.conn.rollback()
        if self.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self.conn.execute("PRAGMA journal_mode = WAL")
        applied = []
        for number, (name, fn) in enumerate(MIGRATIONS, start=1):
            with self._write():
                if name in self._applied():
                    continue
                self._refuse_foreign(self.conn.execute("PRAGMA user_version").fetchone()[0])
                fn(self.db)
                self.db.table(MIGRATIONS_TABLE).insert({"name": name, "applied_at": _now()}, pk="name")
                self.conn.execute(f"PRAGMA user_version = {number}")
                applied.append(name)
        return applied

    # -- rows ---------------------------------------------------------------------------------------

    def _raw(self, where: str, params: list[Any], order: str = "id DESC") -> Iterator[dict[str, Any]]:
        try:
            cursor = self.conn.execute(f"SELECT * FROM entries WHERE {where} ORDER BY {order}", params)
            names = [d[0] for d in cursor.description]
            for values in cursor:
                yield dict(zip(names, values, strict=True))
        except sqlite3.DatabaseError as e:
            raise UrzaError(f"{self.path}: unreadable entry: {e}") from e

    def _parse(self, row: dict[str, Any]) -> Entry:
        try:
            undecodable = [k for k, value in row.items() if isinstance(value, Undecodable)]
            if undecodable:
                shown = ", ".join(f"{k!r} ({str(row[k])[:40]})" for k in undecodable)
                raise ValueError(f"column {shown} is not valid UTF-8 text")
            return Entry.from_row(row)
        except (SchemaVersionError, KeyError, ValueError, TypeError) as e:
            raise UrzaError(f"{self.path}: unreadable entry: {e}") from e

    def _rows(self, where: str, params: list[Any], order: str = "id DESC") -> Iterator[Entry]:
        for row in self._raw(where, params, order):
            yield self._parse(row)

    def stored_rows(self, blueprint: str | None = None, *, newest_first: bool = False) -> list[StoredRow]:
        """Every row (of ``blueprint``, when given) in id order, each parsed on its own: one unreadable row is
        reported as such, not raised, so upkeep (``esper urza verify``, ``gc``, ``export``, ``sign``) and
        Kasmina can go on with the others."""
        out = []
        where, params = ("blueprint = ?", [blueprint]) if blueprint is not None else ("1", [])
        for row in self._raw(where, params, order="id DESC" if newest_first else "id"):
            try:
                entry, problem = self._parse(row), None
            except UrzaError as e:
                entry, problem = None, str(e.__cause__ or e)
            out.append(
                StoredRow(
                    id=row["id"] if isinstance(row.get("id"), int) else 0,
                    blueprint=str(row.get("blueprint")),
                    status=str(row.get("status")),
                    checksum=_plain(row.get("checksum")),
                    entry=entry,
                    problem=problem,
                    profile=_plain(row.get("profile")),
                )
            )
        return out

    def get(self, entry_id: int) -> Entry:
        for e in self._rows("id = ?", [entry_id]):
            return e
        raise UrzaError(f"no Urza entry with id {entry_id}")

    def entries(
        self, blueprint: str | None = None, *, status: str | None = None, artifact: str | None = None
    ) -> list[Entry]:
        """Entries, newest first, optionally of one blueprint, status and/or artifact kind."""
        clauses, params = [], []
        if blueprint is not None:
            clauses.append("blueprint = ?")
            params.append(blueprint)
        if artifact is not None:
            clauses.append("artifact = ?")
            params.append(str(artifact))
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
        artifact: str = "inference",
    ) -> Entry | None:
        """The newest entry with exactly this identity, or ``None``."""
        where = (
            "blueprint = ? AND blueprint_version = ? AND artifact = ? AND profile = ? AND variant = ? "
            "AND content_hash = ? AND torch_version = ? AND platform = ? AND isa = ? AND device_type = ?"
        )
        params = [
            blueprint,
            blueprint_version,
            str(artifact),
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
        """Insert ``entry`` (its artifact must already be in the store); returns it with its id.

        Signed with this writer's key, if it has one.
        """
        now = _now()
        row = self._signed(entry.with_(created_at=now, updated_at=now)).to_row()
        with self._write():
            cursor = self._insert(row)
        return self.get(int(cursor.lastrowid or 0))

    def update(self, entry_id: int, **changes: Any) -> Entry:
        """Change an entry's status and/or evidence in one transaction; returns the new entry.

        The row is read and written under the write lock, so concurrent updates of other columns are kept.
        With a signer the row is signed again (a new status needs a new signature); without one, a
        signature that no longer matches the signed columns is dropped rather than left stale.
        """
        with self._write():
            current = self.get(entry_id)
            row = self._signed(current.with_(**changes, updated_at=_now()), before=current).to_row()
            self.conn.execute(
                f"UPDATE entries SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ?",
                [*row.values(), entry_id],
            )
        return self.get(entry_id)

    def import_entries(self, entries: Iterable[Entry], *, keep_ids: bool = True) -> int:
        """Insert entries verbatim, in id order, in one transaction: timestamps and signatures included, never
        signed again (a signature is over a row's content, not its id). ``keep_ids``: with their ids (how a
        snapshot is filled); otherwise each gets the next id here, in the same order (how a merge adds them).
        Their artifacts must already be in the store."""
        n = 0
        with self._write():
            for e in sorted(entries, key=lambda e: e.id or 0):
                self._insert({"id": e.id, **e.to_row()} if keep_ids else e.to_row())
                n += 1
        return n

    def number_snapshot(self, version: int | None = None) -> int:
        """Number the next snapshot exported from this Urza: ``version`` when given (it must be above every
        version numbered here before), else one above the last. Recorded in one write transaction, so two
        exports at once never share a number, and numbers only ever increase."""
        with self._write():
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SNAPSHOTS_TABLE} (version INTEGER PRIMARY KEY, created_at TEXT NOT NULL)"
            )
            last = self.conn.execute(f"SELECT MAX(version) FROM {SNAPSHOTS_TABLE}").fetchone()[0] or 0
            if version is None:
                version = last + 1
            elif version <= last:
                raise UrzaError(
                    f"snapshot version {version} is not above {last}, the last one exported from {self.path}: "
                    "versions only increase (readers refuse older ones)"
                )
            self.conn.execute(f"INSERT INTO {SNAPSHOTS_TABLE} VALUES (?, ?)", [version, _now()])
        return version

    def _insert(self, row: dict[str, Any]) -> sqlite3.Cursor:
        return self.conn.execute(
            f"INSERT INTO entries ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", list(row.values())
        )

    def _signed(self, entry: Entry, *, before: Entry | None = None) -> Entry:
        if self.signer is not None:
            return entry.with_(signature=self.signer.sign(entry))
        if before is not None and before.signature and entry.signature == before.signature:
            from esper.artifacts.signing import payload

            if payload(entry) != payload(before):
                return entry.with_(signature=None)
        return entry

    def _writable(self) -> None:
        if self.readonly:
            raise UrzaError(f"{self.path} was opened read-only")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Urza:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
