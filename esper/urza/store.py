"""Content-addressed artifact files: ``objects/<first two hex>/<sha256>`` beside the database.

A path is only ever derived from a checksum the database holds, never read from a row, so a row cannot point
a loader outside the store. Files are written under a temporary name (``.tmp-*``), flushed, fsynced and
renamed into place before any row names them, so a reader sees a whole file or none, and a writer killed
midway leaves at most a temporary file that nothing reads (``esper urza gc`` removes it).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class ArtifactError(ValueError):
    """An artifact file is missing, the wrong size, or does not hash to its checksum."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    """The ``objects/`` folder of one Urza."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, checksum: str) -> Path:
        """Where the artifact with ``checksum`` lives. Refuses anything that is not a sha256 hex digest."""
        if not isinstance(checksum, str) or not SHA256_RE.match(checksum):
            raise ArtifactError(f"checksum {checksum!r} is not a sha256 hex digest")
        return self.root / checksum[:2] / checksum

    def add(self, src: Path) -> tuple[str, int]:
        """Copy ``src`` into the store; returns ``(sha256, size)``. Idempotent for identical content."""
        src = Path(src)
        checksum = sha256_file(src)
        dest = self.path_for(checksum)
        if dest.is_file() and sha256_file(dest) == checksum:
            return checksum, dest.stat().st_size
        # Absent, or damaged in place: (re)write it whole. The rename replaces a damaged file atomically.
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while chunk := f.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return checksum, dest.stat().st_size

    def verify(self, checksum: str, size: int | None = None) -> Path:
        """The artifact's path once its size and sha256 match; :class:`ArtifactError` otherwise."""
        path = self.path_for(checksum)
        if not path.is_file():
            raise ArtifactError(f"artifact {checksum[:12]} is missing ({path})")
        actual_size = path.stat().st_size
        if size is not None and actual_size != size:
            raise ArtifactError(f"artifact {checksum[:12]} is {actual_size} bytes, Urza recorded {size} (truncated?)")
        actual = sha256_file(path)
        if actual != checksum:
            raise ArtifactError(f"artifact {checksum[:12]} hashes to {actual[:12]}: checksum mismatch")
        return path

    def checksums(self) -> set[str]:
        """Every stored artifact's checksum."""
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.glob("??/*") if SHA256_RE.match(p.name)}

    def leftovers(self) -> list[Path]:
        """Temporary files of writes that never finished (a killed process). Never read: safe to delete once
        no writer can still be writing them."""
        return sorted(self.root.glob("??/.tmp-*")) if self.root.is_dir() else []


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
