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
import threading
import time
from pathlib import Path

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


# Digests this process already checked, by file identity: (path, device, inode, size, mtime_ns, ctime_ns) ->
# the sha256 it hashed to. A changed file (rewritten, replaced, touched, truncated) has another identity and
# is hashed again. A file modified within RACY_SECONDS of being hashed is never remembered ("racy git"): the
# file system's clock is coarse (a few ms), so a write right after the hash could keep the same mtime.
_verified: dict[tuple[str, int, int, int, int, int], str] = {}
_verified_lock = threading.Lock()
RACY_SECONDS = 2.0


def _identity(path: Path, st: os.stat_result) -> tuple[str, int, int, int, int, int]:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def forget_verified() -> None:
    """Forget every digest this process verified (the next :meth:`ArtifactStore.verify` hashes again)."""
    with _verified_lock:
        _verified.clear()


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

    def verify(self, checksum: str, size: int | None = None, *, rehash: bool = False) -> Path:
        """The artifact's path once its size and sha256 match; :class:`ArtifactError` otherwise.

        A file this process already hashed to ``checksum`` is not hashed again while its identity (inode,
        size, mtime, ctime) is unchanged; ``rehash`` hashes anyway (a scrub looking for bit rot).
        """
        path = self.path_for(checksum)
        try:
            return self._verify(path, checksum, size, rehash)
        except OSError as e:  # unreadable: permissions, a symlink loop, a fan-out folder that is a file, EIO
            why = e.strerror or type(e).__name__
            raise ArtifactError(f"artifact {checksum[:12]} cannot be read ({path}): {why}") from e

    @staticmethod
    def _verify(path: Path, checksum: str, size: int | None, rehash: bool) -> Path:
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if st is None or not path.is_file():
            raise ArtifactError(f"artifact {checksum[:12]} is missing ({path})")
        if size is not None and st.st_size != size:
            raise ArtifactError(f"artifact {checksum[:12]} is {st.st_size} bytes, Urza recorded {size} (truncated?)")
        key = _identity(path, st)
        if not rehash and _verified.get(key) == checksum:
            return path
        started = time.time_ns()
        actual = sha256_file(path)
        if actual != checksum:
            raise ArtifactError(f"artifact {checksum[:12]} hashes to {actual[:12]}: checksum mismatch")
        after = path.stat()
        # Remember only a file that did not change while it was hashed and is not racily new.
        if _identity(path, after) == key and started - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_SECONDS * 1e9:
            with _verified_lock:
                _verified[key] = checksum
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
