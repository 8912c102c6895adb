"""Objects ``g++`` built for a package, kept under everything that went into them for the next identical build.

AOTInductor builds every object of a package afresh and deletes it once the package is linked (ahead of time,
Inductor's own graph cache is off). A graph compiled again, by a retried or repeated certification or by a
test that compiles the same module again, rebuilds an identical wrapper object: seconds of ``g++`` for
bytes that already existed. :class:`ObjectStore` keeps each object under the key of its :class:`Recipe`, which
names what decides the object's bytes, in the manner of ccache: the exact command line (it names the
precompiled header, whose own name Inductor derives from the fully preprocessed header, and the output path),
each source's code, the compiler's own version report, and the torch build whose headers the code includes.
A source's trailing comment lines are not part of its code: AOTInductor appends the compile and link commands
to its sources as comments after building them, so a source compiled before carries them.

A build whose key the store holds copies the stored object into place instead; one it does not hold builds and
is then stored. The store never raises for itself: an object it cannot read is built, one it cannot keep
(a full disk, a read-only cache) is simply not kept. It stays under a size limit by dropping the objects
used least recently.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LIMIT_BYTES", "STORE_NAME", "ObjectStore", "Recipe", "source_code"]

log = logging.getLogger(__name__)

# The store's folder inside an Inductor cache.
STORE_NAME = "esper-objects"
# Bump when what a key covers changes: keys of another format are never looked up.
FORMAT = 1
# Past this many bytes of objects, a store drops the least recently used down to LOW_WATER of it.
LIMIT_BYTES = 1 << 30
LOW_WATER = 0.75
SUFFIX = ".o"


def source_code(path: Path) -> bytes:
    """The code of the C++ source at ``path``: its bytes without trailing blank and ``//`` comment lines, which
    come after every declaration and so cannot change the object."""
    lines = path.read_bytes().splitlines(keepends=True)
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith(b"//")):
        lines.pop()
    return b"".join(lines)


@dataclass(frozen=True)
class Recipe:
    """What decides an object's bytes: the compiler's ``command`` line, its ``sources``, the compiler's own
    version report (``compiler``) and the build of the headers the sources include (``headers``)."""

    command: str
    sources: tuple[Path, ...]
    compiler: str
    headers: str

    def key(self) -> str:
        digest = hashlib.sha256()
        for part in (str(FORMAT), self.command, self.compiler, self.headers):
            digest.update(part.encode())
            digest.update(b"\0")
        for source in self.sources:
            code = source_code(source)
            digest.update(str(len(code)).encode() + b"\0")
            digest.update(code)
        return digest.hexdigest()


class ObjectStore:
    """Built objects in ``folder``, one file per key, at most ``limit_bytes`` of them."""

    def __init__(self, folder: Path, limit_bytes: int = LIMIT_BYTES) -> None:
        self.folder = folder
        self.limit_bytes = limit_bytes

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{SUFFIX}"

    def build(self, target: Path, recipe: Recipe, build: Callable[[], None]) -> bool:
        """Put the object of ``recipe`` at ``target``: the stored copy where the store has one, else ``build()``
        (whose errors propagate unchanged) and keep what it built. Returns whether the stored copy served."""
        try:
            key = recipe.key()
        except OSError as exc:
            log.debug("cannot read the sources of %s (%s); building it", target, exc)
            build()
            return False
        if self._fetch(key, target):
            return True
        build()
        self._keep(key, target)
        return False

    def _fetch(self, key: str, target: Path) -> bool:
        stored = self.path(key)
        if not stored.is_file():
            return False
        try:
            _copy_atomically(stored, target)
        except OSError as exc:
            log.debug("could not copy %s to %s (%s); building it", stored, target, exc)
            return False
        with contextlib.suppress(OSError):  # a read-only store serves, it only forgets what was used lately
            os.utime(stored)
        return True

    def _keep(self, key: str, target: Path) -> None:
        stored = self.path(key)
        try:
            stored.parent.mkdir(parents=True, exist_ok=True)
            _copy_atomically(target, stored)
        except OSError as exc:
            log.debug("could not keep %s in %s (%s); an identical build builds it again", target, self.folder, exc)
            return
        self._trim()

    def _trim(self) -> None:
        objects = []
        for stored in self._objects():
            try:
                stat = stored.stat()
            except OSError:
                continue
            objects.append((stat.st_mtime_ns, stat.st_size, stored))
        total = sum(size for _, size, _ in objects)
        if total <= self.limit_bytes:
            return
        for _, size, stored in sorted(objects, key=lambda o: o[0]):
            if total <= self.limit_bytes * LOW_WATER:
                break
            stored.unlink(missing_ok=True)
            total -= size

    def _objects(self) -> Iterable[Path]:
        return self.folder.glob(f"*/*{SUFFIX}")


def _copy_atomically(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest`` so that a reader of ``dest`` sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
