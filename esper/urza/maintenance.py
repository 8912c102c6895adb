"""Urza upkeep: check every row against its files (:func:`verify`), remove what no row names
(:func:`collect_garbage`), sign every row again (:func:`sign_all`), and write a read-only snapshot for shipping
(:func:`export`). Each is a function of an open :class:`~esper.urza.Urza`; the ``esper urza`` commands call
them. This module sits above :mod:`esper.urza.db`, which never imports it.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from esper.artifacts.guards import compile_predicate
from esper.artifacts.validate import EntryFormatError
from esper.urza import snapshot
from esper.urza.db import FROM_ENV, StoredRow, Urza, UrzaError
from esper.urza.schema import Entry, EntryMeta, EntryStatus
from esper.urza.store import SHA256_RE, ArtifactError

if TYPE_CHECKING:
    from esper.artifacts.signing import Signer, Verifier

SNAPSHOT_DB = "urza.db"


@dataclass(frozen=True)
class RowCheck:
    """One row's verdict: ``problem`` is ``None`` when its artifact (and signature, if checked) is good."""

    entry_id: int
    blueprint: str
    status: str
    problem: str | None

    def describe(self) -> str:
        verdict = "ok" if self.problem is None else f"PROBLEM: {self.problem}"
        return f"entry #{self.entry_id} {self.blueprint} ({self.status}): {verdict}"


@dataclass(frozen=True)
class VerifyReport:
    """Every row's verdict, the database's own integrity check, and files that no row names."""

    rows: tuple[RowCheck, ...]
    integrity: str
    signatures_checked: bool
    leftovers: tuple[Path, ...]
    unreferenced: tuple[Path, ...]
    snapshot: str | None = None  # the snapshot version line, for an exported snapshot
    snapshot_problem: str | None = None

    @property
    def problems(self) -> list[str]:
        out = [r.describe() for r in self.rows if r.problem is not None]
        if self.integrity != "ok":
            out.insert(0, f"database integrity check failed: {self.integrity}")
        if self.snapshot_problem is not None:
            out.append(f"snapshot: PROBLEM: {self.snapshot_problem}")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """A per-row report for people, problems included, ending in a one-line verdict."""
        out = [r.describe() for r in self.rows]
        if self.integrity != "ok":
            out.append(f"database integrity check failed: {self.integrity}")
        if self.snapshot is not None:
            out.append(self.snapshot)
        if self.snapshot_problem is not None:
            out.append(f"snapshot: PROBLEM: {self.snapshot_problem}")
        if not self.signatures_checked:
            out.append("signatures not checked (no public key: --public-key or $ESPER_PUBLIC_KEY)")
        if self.leftovers:
            out.append(f"{len(self.leftovers)} temporary file(s) of interrupted writes; `esper urza gc` removes them")
        if self.unreferenced:
            out.append(f"{len(self.unreferenced)} artifact file(s) no row names; `esper urza gc` removes them")
        bad = len(self.problems)
        n = len(self.rows)
        out.append(f"{n} entries checked, {bad} problem(s)" if bad else f"{n} entries checked: all ok")
        return out


def verify(urza: Urza, verifier: Verifier | None = None) -> VerifyReport:
    """Check everything Kasmina's load relies on, row by row: the row parses (:meth:`Entry.from_row`), its
    ``meta`` does (:meth:`EntryMeta.from_entry`: pre-warm shapes, profiles, constant schema), its guard
    predicate can be built, its artifact is present, whole, hashing to its checksum and inside the store, and,
    given a ``verifier``, its signature. Each problem is a line of the report, never an exception; a database
    whose rows cannot be read at all is one problem. Reads only."""
    checks = []
    try:
        rows = urza.stored_rows()
    except UrzaError as e:
        rows = []
        checks.append(RowCheck(0, "?", "?", f"cannot read the entries: {e}"))
    for row in rows:
        if row.entry is None:
            checks.append(RowCheck(row.id, row.blueprint, row.status, f"unreadable row: {row.problem}"))
            continue
        problems = [p for p in (_signature(row.entry, verifier), value_problem(row.entry)) if p]
        try:
            urza.store.verify(row.entry.checksum, row.entry.artifact_size, rehash=True)
        except ArtifactError as e:
            problems.append(str(e))
        checks.append(RowCheck(row.id, row.blueprint, row.status, "; ".join(problems) or None))
    try:
        integrity = "; ".join(str(r[0]) for r in urza.conn.execute("PRAGMA integrity_check").fetchall())
    except sqlite3.DatabaseError as e:
        integrity = str(e)
    unreferenced = tuple(_unreferenced(urza, _named(rows)))
    line, problem = _snapshot(urza, verifier)
    return VerifyReport(
        tuple(checks), integrity, verifier is not None, tuple(urza.store.leftovers()), unreferenced, line, problem
    )


def _snapshot(urza: Urza, verifier: Verifier | None) -> tuple[str | None, str | None]:
    """For an exported snapshot (a ``snapshot.json`` beside the database): its version line, or its problem."""
    if not (urza.path.parent / snapshot.MANIFEST).exists():
        return None, None
    try:
        manifest = snapshot.read(urza) if verifier is None else snapshot.check(urza, verifier, 1)
    except snapshot.SnapshotError as e:
        return None, str(e)
    signed = "signature checked" if verifier is not None else "signed" if manifest.signature else "unsigned"
    return f"snapshot version {manifest.version} of {manifest.created_at} ({signed}, rows match)", None


def _signature(entry: Entry, verifier: Verifier | None) -> str | None:
    if verifier is None:
        return None
    from esper.artifacts.signing import SignatureError

    try:
        verifier.verify(entry)
    except SignatureError as e:
        return f"signature: {e}"
    return None


def value_problem(entry: Entry) -> str | None:
    """Why Kasmina could not act on ``entry``'s values (its ``meta`` and guard predicate), else ``None``."""
    try:
        EntryMeta.from_entry(entry)
        if entry.guards is not None:
            compile_predicate(entry.guards)
    except EntryFormatError as e:
        return f"format: {e}"
    except Exception as e:  # whatever else a hostile row provokes is a problem line, not a traceback
        return f"format: {type(e).__name__}: {e}"
    return None


def _named(rows: list[StoredRow]) -> set[str]:
    """Every checksum a row names, readable or not: a file that any row names is never garbage."""
    return {r.checksum for r in rows if r.checksum is not None}


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed (or, with ``dry_run``, would remove), and what it left because it was too new."""

    removed: tuple[Path, ...]
    bytes: int
    kept_recent: tuple[Path, ...]
    dry_run: bool
    unreadable: tuple[str, ...] = ()  # one line per row that could not be read (its files are kept if named)

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [f"unreadable {u}" for u in self.unreadable]
        out += [f"{verb} {p}" for p in self.removed]
        if self.kept_recent:
            out.append(
                f"kept {len(self.kept_recent)} unreferenced file(s) younger than the grace period "
                "(a writer may be about to publish them)"
            )
        out.append(f"{verb} {len(self.removed)} file(s), {self.bytes} bytes")
        return out


def collect_garbage(urza: Urza, *, dry_run: bool = False, grace_seconds: float = 3600.0) -> GcReport:
    """Remove artifact files that no row names and temporary files of interrupted writes.

    A writer stores the artifact before it commits the row that names it, and a temporary file is being
    written until it is renamed: so only files older than ``grace_seconds`` are removed, never one that a
    writer running now may still publish. The database is only read.
    """
    rows = urza.stored_rows()
    referenced = _named(rows)
    unreadable = tuple(f"entry #{r.id} ({r.blueprint}): {r.problem}" for r in rows if r.entry is None)
    now = time.time()
    candidates = _unreferenced(urza, referenced) + urza.store.leftovers()
    removed, kept, freed = [], [], 0
    for path in sorted(candidates):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if now - st.st_mtime < grace_seconds:
            kept.append(path)
            continue
        if not dry_run:
            path.unlink(missing_ok=True)
        removed.append(path)
        freed += st.st_size
    if not dry_run:
        for folder in urza.store.root.glob("??"):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return GcReport(tuple(removed), freed, tuple(kept), dry_run, unreadable)


def _unreferenced(urza: Urza, referenced: set[str]) -> list[Path]:
    """Artifact-named files no row names (one in the wrong fan-out folder counts: it is never loaded)."""
    root = urza.store.root
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.glob("??/*")
        if SHA256_RE.match(p.name) and not p.is_dir() and (p.name not in referenced or p.parent.name != p.name[:2])
    )


class ExportError(UrzaError):
    """Certified rows that cannot be exported (unreadable rows, bad artifacts): one line each in ``problems``.
    A snapshot holds every certified row or is not written."""

    def __init__(self, problems: list[str]):
        self.problems = tuple(problems)
        super().__init__("; ".join(f"cannot export {p}" for p in problems) + "; run `esper urza verify`")


@dataclass(frozen=True)
class ExportReport:
    """Where a snapshot was written, how many entries and artifact files it holds, their total size, and the
    snapshot's version (``signed``: whether its ``snapshot.json`` is signed)."""

    path: Path
    entries: int
    artifacts: int
    bytes: int
    version: int = 0
    signed: bool = False


def export(
    urza: Urza, dest: str | Path, *, signer: Signer | str | None = FROM_ENV, version: int | None = None
) -> ExportReport:
    """Write ``dest/urza.db`` plus ``dest/objects/``: the certified entries (ids, signatures and evidence kept)
    and the artifacts they name, each verified first, plus ``dest/snapshot.json``: the snapshot's version,
    signed (see :mod:`esper.urza.snapshot`).

    The version is numbered by ``urza`` (:meth:`Urza.number_snapshot`: ``version``, else one above the last
    exported from it); that is the one write to ``urza``, done even when it was opened read-only. ``signer``
    signs the version: by default ``urza``'s signer, else the key named by ``$ESPER_SIGNING_KEY``; ``None`` or
    no key leaves it unsigned (readers that require a minimum version then refuse the snapshot).

    The snapshot's database uses a rollback journal, not WAL, so it opens from a read-only filesystem; its
    files are made read-only. It is built in a temporary folder beside ``dest`` and renamed into place, so
    ``dest`` is either complete or absent. ``dest`` must not exist, or be an empty folder.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UrzaError(f"{dest} exists and is not an empty folder; refusing to overwrite it")
    certified = []
    sources = {}
    problems = []
    for row in urza.stored_rows():
        if row.status != EntryStatus.CERTIFIED:
            continue
        if row.entry is None:
            problems.append(f"entry #{row.id} ({row.blueprint}): unreadable row: {row.problem}")
            continue
        e = row.entry
        try:
            sources[e.checksum] = urza.store.verify(e.checksum, e.artifact_size, rehash=True)
        except ArtifactError as err:
            problems.append(f"entry #{e.id} ({e.blueprint}): {err}")
            continue
        certified.append(e)
    if problems:
        raise ExportError(problems)
    snapshot_signer = _snapshot_signer(urza, signer)
    number = _number(urza, version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        with Urza(staging / SNAPSHOT_DB, signer=None) as snap:
            for path in sources.values():
                snap.store.add(path)
            snap.import_entries(certified)
        conn = sqlite3.connect(staging / SNAPSHOT_DB)
        try:
            mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            manifest = snapshot.new_manifest(conn, number, snapshot_signer)
        finally:
            conn.close()
        if mode != "delete":
            raise UrzaError(f"could not switch the snapshot to a rollback journal (journal_mode is {mode})")
        for leftover in ("-wal", "-shm"):
            Path(f"{staging / SNAPSHOT_DB}{leftover}").unlink(missing_ok=True)
        snapshot.write(staging, manifest)
        os.chmod(staging / SNAPSHOT_DB, 0o444)
        staging.chmod(0o755)
        if dest.exists():
            dest.rmdir()
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in (dest / "objects").rglob("*") if p.is_file())
    return ExportReport(dest, len(certified), len(sources), size, number, manifest.signature is not None)


def _snapshot_signer(urza: Urza, signer: Signer | str | None) -> Signer | None:
    if signer != FROM_ENV:
        return signer  # type: ignore[return-value]
    if urza.signer is not None:
        return urza.signer
    from esper.artifacts.signing import SigningError, signer_from_env

    try:
        return signer_from_env()
    except SigningError as e:
        raise UrzaError(f"cannot sign the snapshot's version: {e}") from e


def _number(urza: Urza, version: int | None) -> int:
    if not urza.readonly:
        return urza.number_snapshot(version)
    with Urza(urza.path, signer=None) as writer:
        return writer.number_snapshot(version)


@dataclass(frozen=True)
class SignReport:
    """The ids of the rows signed, and one line per row left unsigned because its artifact did not verify."""

    signed: tuple[int, ...]
    skipped: tuple[str, ...]

    def lines(self) -> list[str]:
        return [f"not signed: {s}" for s in self.skipped] + [
            f"signed {len(self.signed)} entries" + (f", skipped {len(self.skipped)}" if self.skipped else "")
        ]


def sign_all(urza: Urza) -> SignReport:
    """Sign every row again with ``urza``'s signer (after turning signing on, or rotating the key).

    Only rows whose artifact verifies are signed: a signature vouches for the file as it is now.
    """
    if urza.signer is None:
        raise UrzaError("no signing key: set $ESPER_SIGNING_KEY to the private key (see `esper keygen`)")
    signed, skipped = [], []
    for row in urza.stored_rows():
        if row.entry is None:
            skipped.append(f"entry #{row.id} {row.blueprint}: unreadable row: {row.problem}")
            continue
        try:
            urza.store.verify(row.entry.checksum, row.entry.artifact_size, rehash=True)
        except ArtifactError as e:
            skipped.append(f"entry #{row.id} {row.blueprint}: {e}")
            continue
        urza.update(row.id)
        signed.append(row.id)
    return SignReport(tuple(signed), tuple(skipped))
