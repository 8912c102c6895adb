"""Urza upkeep: check every row against its files (``verify``), remove what no row names (``gc``), and write a
read-only snapshot for shipping (``export``). Reached through :class:`esper.urza.Urza` methods and the CLI.
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

from esper.urza.store import SHA256_RE, ArtifactError

if TYPE_CHECKING:
    from esper.signing import Verifier
    from esper.urza.db import Urza

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

    @property
    def problems(self) -> list[str]:
        out = [r.describe() for r in self.rows if r.problem is not None]
        if self.integrity != "ok":
            out.insert(0, f"database integrity check failed: {self.integrity}")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """A per-row report for people, problems included, ending in a one-line verdict."""
        out = [r.describe() for r in self.rows]
        if self.integrity != "ok":
            out.append(f"database integrity check failed: {self.integrity}")
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
    """Check each row's artifact (present, whole, hashing to its checksum, inside the store) and, given a
    ``verifier``, its signature. Reads only."""
    from esper.signing import SignatureError

    checks = []
    entries = urza.entries()
    for entry in reversed(entries):
        problem = None
        if verifier is not None:
            try:
                verifier.verify(entry)
            except SignatureError as e:
                problem = f"signature: {e}"
        try:
            urza.store.verify(entry.checksum, entry.artifact_size)
        except ArtifactError as e:
            problem = f"{problem}; {e}" if problem else str(e)
        checks.append(RowCheck(entry.id or 0, entry.blueprint, entry.status, problem))
    integrity = "; ".join(str(r[0]) for r in urza.conn.execute("PRAGMA integrity_check").fetchall())
    unreferenced = tuple(_unreferenced(urza, {e.checksum for e in entries}))
    return VerifyReport(tuple(checks), integrity, verifier is not None, tuple(urza.store.leftovers()), unreferenced)


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed (or, with ``dry_run``, would remove), and what it left because it was too new."""

    removed: tuple[Path, ...]
    bytes: int
    kept_recent: tuple[Path, ...]
    dry_run: bool

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [f"{verb} {p}" for p in self.removed]
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
    referenced = {e.checksum for e in urza.entries()}
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
    return GcReport(tuple(removed), freed, tuple(kept), dry_run)


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


@dataclass(frozen=True)
class ExportReport:
    path: Path
    entries: int
    artifacts: int
    bytes: int


def export(urza: Urza, dest: Path) -> ExportReport:
    """Write ``dest/urza.db`` plus ``dest/objects/``: the certified entries (ids, signatures and evidence kept)
    and the artifacts they name, each verified first.

    The snapshot's database uses a rollback journal, not WAL, so it opens from a read-only filesystem; its
    files are made read-only. It is built in a temporary folder beside ``dest`` and renamed into place, so
    ``dest`` is either complete or absent. ``dest`` must not exist, or be an empty folder.
    """
    from esper.urza.db import Urza, UrzaError

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UrzaError(f"{dest} exists and is not an empty folder; refusing to overwrite it")
    certified = urza.entries(status="certified")
    sources = {}
    for e in certified:
        try:
            sources[e.checksum] = urza.store.verify(e.checksum, e.artifact_size)
        except ArtifactError as err:
            raise UrzaError(f"cannot export entry #{e.id} ({e.blueprint}): {err}; run `esper urza verify`") from err
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
        finally:
            conn.close()
        if mode != "delete":
            raise UrzaError(f"could not switch the snapshot to a rollback journal (journal_mode is {mode})")
        for leftover in ("-wal", "-shm"):
            Path(f"{staging / SNAPSHOT_DB}{leftover}").unlink(missing_ok=True)
        os.chmod(staging / SNAPSHOT_DB, 0o444)
        staging.chmod(0o755)
        if dest.exists():
            dest.rmdir()
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in (dest / "objects").rglob("*") if p.is_file())
    return ExportReport(dest, len(certified), len(sources), size)


@dataclass(frozen=True)
class SignReport:
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
    from esper.urza.db import UrzaError

    if urza.signer is None:
        raise UrzaError("no signing key: set $ESPER_SIGNING_KEY to the private key (see `esper keygen`)")
    signed, skipped = [], []
    for entry in reversed(urza.entries()):
        try:
            urza.store.verify(entry.checksum, entry.artifact_size)
        except ArtifactError as e:
            skipped.append(f"entry #{entry.id} {entry.blueprint}: {e}")
            continue
        urza.update(entry.id)  # type: ignore[arg-type]
        signed.append(entry.id or 0)
    return SignReport(tuple(signed), tuple(skipped))
