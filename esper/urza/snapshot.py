"""Snapshot versions, against rollback: every exported snapshot carries a signed, increasing version number.

``esper urza export`` writes ``snapshot.json`` beside the snapshot's ``urza.db``:

    {"created_at":"...","digest":"<sha256>","entries":N,"format":"esper-snapshot/1","signature":"ed25519:...",
    "version":N}

The signature (made with the writers' signing key, :meth:`esper.artifacts.signing.Signer.sign_bytes`) is over the
canonical JSON of every field but ``signature``; its ``format`` keeps it from ever passing for a row's
signature, and a row's for it. ``digest`` binds the manifest to the rows: the sha256 of the canonical JSON
list of ``[id, signature]`` of every row, in id order (each row's signature covers its content, so this covers
every signed row, and the set of rows). Versions are numbered by the exporting Urza (:meth:`Urza.number_snapshot`)
and only ever increase there.

A reader configured with a minimum version (``Kasmina(min_snapshot_version=N)`` or ``$ESPER_MIN_SNAPSHOT``) uses
a snapshot only if :func:`check` passes: the manifest is present and well formed, signed by the reader's public
key, matches the rows, and its version is at least ``N``. So an older signed snapshot put back in place, a
database of another snapshot under this manifest, or a snapshot with rows added or removed is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esper.artifacts import validate as v
from esper.artifacts.validate import EntryFormatError

if TYPE_CHECKING:
    from esper.artifacts.signing import Signer, Verifier
    from esper.urza.db import Urza

MANIFEST = "snapshot.json"
FORMAT = "esper-snapshot/1"
MIN_SNAPSHOT_ENV = "ESPER_MIN_SNAPSHOT"


class SnapshotError(ValueError):
    """A snapshot's version cannot be trusted: no manifest, a malformed, unsigned or foreign one, rows that do
    not match it, or a version below the reader's minimum."""


def _canonical(data: Any) -> bytes:
    # The same canonical form as esper.artifacts.signing.canonical, without importing cryptography for unsigned exports.
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class SnapshotManifest:
    """One snapshot's version record (see the module docstring)."""

    version: int
    created_at: str
    entries: int
    digest: str
    signature: str | None = None

    def payload(self) -> bytes:
        """The canonical bytes that are signed."""
        return _canonical(
            {
                "format": FORMAT,
                "version": self.version,
                "created_at": self.created_at,
                "entries": self.entries,
                "digest": self.digest,
            }
        )

    def signed(self, signer: Signer) -> SnapshotManifest:
        return replace(self, signature=signer.sign_bytes(self.payload()))

    def to_json(self) -> str:
        data = json.loads(self.payload())
        data["signature"] = self.signature
        return json.dumps(data, sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SnapshotManifest:
        """Parse and validate; :class:`SnapshotError` on anything malformed."""
        try:
            data = v.mapping(json.loads(text), "snapshot", "snapshot manifest")
            if data.get("format") != FORMAT:
                raise SnapshotError(f"snapshot manifest format is {v.quote(data.get('format'))}, not {FORMAT!r}")
            return cls(
                version=v.integer(data.get("version"), "version", "snapshot version", lo=1),
                created_at=v.text(data.get("created_at"), "created_at", "creation time", limit=64),
                entries=v.integer(data.get("entries"), "entries", "entry count"),
                digest=v.sha256(data.get("digest"), "digest", "digest"),
                signature=v.optional_text(data.get("signature"), "signature", "signature", limit=1024),
            )
        except (ValueError, RecursionError, EntryFormatError) as e:
            if isinstance(e, SnapshotError):
                raise
            raise SnapshotError(f"malformed snapshot manifest: {e}") from None


def rows_digest(conn: sqlite3.Connection) -> tuple[int, str]:
    """The number of rows and the sha256 of ``[[id, signature], ...]`` in id order (see the module docstring)."""
    rows = [[r[0], r[1]] for r in conn.execute("SELECT id, signature FROM entries ORDER BY id")]
    return len(rows), hashlib.sha256(_canonical(rows)).hexdigest()


def new_manifest(conn: sqlite3.Connection, version: int, signer: Signer | None) -> SnapshotManifest:
    """The manifest for the snapshot database behind ``conn`` as ``version``, signed when ``signer`` is given."""
    count, digest = rows_digest(conn)
    manifest = SnapshotManifest(version, datetime.now(UTC).isoformat(timespec="milliseconds"), count, digest)
    return manifest.signed(signer) if signer is not None else manifest


def write(folder: Path, manifest: SnapshotManifest) -> Path:
    """Write ``folder/snapshot.json`` (read-only, fsynced); the export renames the folder into place after."""
    path = folder / MANIFEST
    with open(path, "w", encoding="ascii") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o444)
    return path


def read(urza: Urza) -> SnapshotManifest:
    """The manifest beside ``urza``'s database, once it is well formed and matches the rows (signature not
    checked: see :func:`check`). :class:`SnapshotError` otherwise."""
    path = urza.path.parent / MANIFEST
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise SnapshotError(
            f"no {MANIFEST} beside {urza.path}: not an exported snapshot, or its version was removed"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SnapshotError(f"cannot read {path}: {e}") from None
    manifest = SnapshotManifest.from_json(text)
    try:
        count, digest = rows_digest(urza.conn)
    except sqlite3.DatabaseError as e:
        raise SnapshotError(f"cannot read the rows to check snapshot version {manifest.version}: {e}") from None
    if (count, digest) != (manifest.entries, manifest.digest):
        raise SnapshotError(
            f"the database does not match snapshot version {manifest.version} ({count} rows, digest {digest[:12]}; "
            f"the manifest says {manifest.entries} rows, digest {manifest.digest[:12]}): "
            "a database of another snapshot put in its place, or rows changed"
        )
    return manifest


def check(urza: Urza, verifier: Verifier | None, min_version: int) -> SnapshotManifest:
    """The snapshot's manifest, once it matches the rows, is signed by ``verifier``'s key and is at least
    ``min_version``; :class:`SnapshotError` says why not. A minimum without a public key cannot be checked (anyone
    who can write the folder could write any version), so it is refused too."""
    if verifier is None:
        raise SnapshotError(
            f"a minimum snapshot version ({min_version}) needs a public key to check the snapshot's signature "
            "(ESPER_PUBLIC_KEY or Kasmina(public_key=...))"
        )
    manifest = read(urza)
    from esper.artifacts.signing import SignatureError

    try:
        verifier.verify_bytes(manifest.signature, manifest.payload(), what="snapshot manifest")
    except SignatureError as e:
        raise SnapshotError(f"snapshot version {manifest.version}: {e}") from None
    if manifest.version < min_version:
        raise SnapshotError(
            f"snapshot version {manifest.version} is older than the minimum accepted, {min_version}: "
            "an older snapshot put back in place (rollback)?"
        )
    return manifest


def min_version_from(value: int | str | None) -> int | None:
    """A minimum version from an argument or ``$ESPER_MIN_SNAPSHOT`` text: an integer >= 1, or ``None`` when
    not configured. Anything else (``""`` included: a typo must not turn the check off) is a
    :class:`SnapshotError`."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            raise SnapshotError(f"minimum snapshot version {value!r} is not a positive integer")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SnapshotError(f"minimum snapshot version {value!r} is not a positive integer")
    return value
