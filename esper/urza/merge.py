"""Fleets: merge Urza libraries into one (``esper urza merge SRC... --into DEST``).

A team certifies per machine class (CPU ISA, GPU) in a CI matrix, each job into its own Urza, and ships one
library. :func:`merge` adds every source's rows and artifact files to ``dest`` (created if missing):

- with a ``verifier`` (a public key), a row is taken only if it is signed by that key (unsigned rows are
  refused), and only if Kasmina could act on its values (``meta``, guard predicate: what ``esper urza verify``
  checks);
- an artifact is verified (size and sha256) in the source, copied into ``dest``'s content-addressed store, and
  verified again there before the row naming it commits;
- rows keep their signatures, timestamps and evidence (a signature is over a row's content, not its id) and
  get new ids, in source order then id order: a later source's rows are newer;
- a row already in ``dest`` with the same content (identity, status, evidence and signature) is a duplicate and
  is skipped, so merging twice adds nothing;
- a *conflict* is a certified row whose identity (:func:`identity`: blueprint, version, artifact kind, profile,
  variant, content hash, compatibility key) already has a certified row with another artifact (checksum) in
  ``dest`` or in an earlier source: it is reported and not merged, and what ``dest`` holds is never
  overwritten. (Two certified rows of one identity inside one source are that source's own history: Kasmina
  uses the newest, and so it is kept.)

Refused rows and conflicts make the report not ``ok`` (the CLI exits 1); everything else is merged. Sources are
only read. The merged library verifies, exports and loads like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from esper.urza.db import Urza, UrzaError
from esper.urza.maintenance import SNAPSHOT_DB, value_problem
from esper.urza.schema import Entry, EntryStatus
from esper.urza.store import ArtifactError

if TYPE_CHECKING:
    from esper.artifacts.signing import Verifier

Identity = tuple[str, int, str, str, str, str, str, str, str, str]


def identity(entry: Entry) -> Identity:
    """What makes two rows the same candidate: blueprint, version, artifact kind, profile, variant, content hash
    and compatibility key (torch version, platform, ISA, device type)."""
    c = entry.compat
    return (
        entry.blueprint,
        entry.blueprint_version,
        str(entry.artifact),
        entry.profile,
        entry.variant,
        entry.content_hash,
        c.torch_version,
        c.platform,
        c.isa,
        c.device_type,
    )


def describe_identity(key: Identity) -> str:
    name, version, artifact, profile, variant, content, torch_version, platform, isa, device = key
    return (
        f"{name} v{version} [{artifact} {profile}/{variant}] content {content[:12]} on "
        f"{device}/{isa}/{platform}/torch {torch_version}"
    )


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: rows added and skipped as duplicates, artifact files copied, and, one line each, the
    rows refused (unreadable, unsigned or wrongly signed, unusable values, bad artifact) and the conflicts."""

    dest: Path
    added: int
    duplicates: int
    artifacts: int
    refused: tuple[str, ...]
    conflicts: tuple[str, ...]
    signatures_checked: bool

    @property
    def ok(self) -> bool:
        return not self.refused and not self.conflicts

    def lines(self) -> list[str]:
        out = [f"refused {r}" for r in self.refused] + [f"CONFLICT {c}" for c in self.conflicts]
        if not self.signatures_checked:
            out.append("signatures not checked (no public key: --public-key or $ESPER_PUBLIC_KEY)")
        out.append(
            f"merged into {self.dest}: {self.added} entries added, {self.duplicates} duplicate(s) skipped, "
            f"{self.artifacts} artifact file(s) copied, {len(self.refused)} refused, "
            f"{len(self.conflicts)} conflict(s)"
        )
        return out


@dataclass(frozen=True)
class _Known:
    """A row ``dest`` holds or will hold: where it came from (``origin``: source index, -1 for ``dest``)."""

    content: Entry
    checksum: str
    status: str
    origin: int
    where: str


def merge(sources: Sequence[str | Path], dest: str | Path, *, verifier: Verifier | None = None) -> MergeReport:
    """Merge the Urza libraries ``sources`` (databases, or folders holding ``urza.db`` such as exported
    snapshots) into ``dest`` (a database path; created if missing). See the module docstring for the rules.

    :class:`UrzaError` when a source or ``dest`` cannot be used (missing, not an Urza, newer schema) or a
    source is ``dest`` itself; OS and SQLite errors (a full disk) propagate, with nothing half-merged: each
    source's rows commit in one transaction after their artifacts are stored.
    """
    paths = [_database(s) for s in sources]
    dest = Path(dest)
    if not paths:
        raise UrzaError("nothing to merge: name at least one source Urza")
    for p in paths:
        if dest.exists() and p.exists() and p.resolve() == dest.resolve():
            raise UrzaError(f"{p} is the destination itself; merge into another database")
    added = duplicates = copied = 0
    refused: list[str] = []
    conflicts: list[str] = []
    with Urza(dest, signer=None) as out:  # rows keep the signatures they came with: never re-signed here
        known: dict[Identity, list[_Known]] = {}
        for row in out.stored_rows():
            if row.entry is not None:
                _remember(known, row.entry, -1, f"{dest} entry #{row.id}")
        for origin, path in enumerate(paths):
            batch: list[Entry] = []
            with Urza(path, readonly=True) as src:
                for row in src.stored_rows():
                    where = f"{path} entry #{row.id} ({row.blueprint})"
                    if row.entry is None:
                        refused.append(f"{where}: unreadable row: {row.problem}")
                        continue
                    entry = row.entry
                    problem = _untrusted(entry, verifier)
                    if problem is not None:
                        refused.append(f"{where}: {problem}")
                        continue
                    key, content = identity(entry), _content(entry)
                    same = known.get(key, [])
                    if any(k.content == content for k in same):
                        duplicates += 1
                        continue
                    clash = _clash(entry, same, origin)
                    if clash is not None:
                        conflicts.append(
                            f"{describe_identity(key)}: {where} is certified with artifact {entry.checksum[:12]}, "
                            f"{clash.where} with {clash.checksum[:12]}; kept the latter, not merged"
                        )
                        continue
                    try:
                        copied += _copy(src, out, entry)
                    except ArtifactError as e:
                        refused.append(f"{where}: {e}")
                        continue
                    batch.append(entry)
                    _remember(known, entry, origin, where)
            added += out.import_entries(batch, keep_ids=False)
    return MergeReport(dest, added, duplicates, copied, tuple(refused), tuple(conflicts), verifier is not None)


def _database(source: str | Path) -> Path:
    p = Path(source)
    return p / SNAPSHOT_DB if p.is_dir() else p


def _content(entry: Entry) -> Entry:
    """Everything but the id and timestamps: two rows equal in this are the same row."""
    return entry.with_(id=None, created_at=None, updated_at=None)


def _remember(known: dict[Identity, list[_Known]], entry: Entry, origin: int, where: str) -> None:
    known.setdefault(identity(entry), []).append(_Known(_content(entry), entry.checksum, entry.status, origin, where))


def _clash(entry: Entry, same: list[_Known], origin: int) -> _Known | None:
    """A certified row of another origin whose artifact differs from certified ``entry``'s, if any."""
    if entry.status != EntryStatus.CERTIFIED:
        return None
    return next(
        (k for k in same if k.status == EntryStatus.CERTIFIED and k.checksum != entry.checksum and k.origin != origin),
        None,
    )


def _untrusted(entry: Entry, verifier: Verifier | None) -> str | None:
    """Why ``entry`` may not come in (signature, then values), else ``None``."""
    if verifier is not None:
        from esper.artifacts.signing import SignatureError

        try:
            verifier.verify(entry)
        except SignatureError as e:
            return f"signature: {e}"
    return value_problem(entry)


def _copy(src: Urza, out: Urza, entry: Entry) -> int:
    """Store ``entry``'s artifact in ``out``, verified in ``src`` first and in ``out`` after; 1 if it is new."""
    path = src.store.verify(entry.checksum, entry.artifact_size, rehash=True)
    new = not out.store.path_for(entry.checksum).is_file()
    out.store.add(path)
    out.store.verify(entry.checksum, entry.artifact_size, rehash=True)
    return int(new)
