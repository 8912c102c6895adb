"""Where loaded packages live on disk while a process runs, and how they are removed whatever way it ends.

torch's C++ package loader extracts every package it loads into ``$TMPDIR/aotinductor_XXXXXX`` and removes
the folder only in its destructor. A process that ends without running it leaves the folder behind: one
killed by a signal, one ended by ``os._exit`` (a compile worker whose certification died), and one whose
loaded packages are still reachable when the interpreter finalizes (CPython does not promise to destroy
those; the certification's own process is one: pytest's config holds its kernels until exit). The loader
also accepts an already-extracted folder, which it never removes; so Esper extracts each package itself into
a folder it owns and removes it itself:

- one folder per process, ``<base>/<pid>-<random>``, holding one sub-folder per loaded package (removed when
  the package is collected) and a ``lock`` file this process holds with ``flock`` for its whole life;
- at exit the process removes its folder (the loaded code stays mapped: removing its files is safe);
- the first load of each process sweeps the folders whose ``lock`` nobody holds: their process is dead.
  A ``flock`` dies with its process, so a reused pid never makes a dead folder look alive, nor a live one
  dead; a folder is only named (renamed from ``.<pid>-...``) once its lock is held.

``<base>`` is ``ESPER_EXTRACT_DIR`` if set, else ``esper-aoti-<uid>`` in the system temporary folder (one per
user: the folder must be ours, never a link). Nothing here imports torch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import stat
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

try:
    import fcntl
except ImportError:  # no flock: folders of dead processes are found by pid alone
    fcntl = None  # type: ignore[assignment]

EXTRACT_DIR_ENV = "ESPER_EXTRACT_DIR"
LOCK = "lock"
# A process folder once its lock is held; one being created; one being removed by a sweep.
_LIVE = re.compile(r"(\d+)-[A-Za-z0-9_]+")
_CREATING = re.compile(r"\.(\d+)-[A-Za-z0-9_]+")
_TRASH = re.compile(r"\.trash-[A-Za-z0-9_]+")


class ExtractionError(OSError):
    """A package could not be extracted into Esper's folder (the message says why)."""


def base_folder() -> Path:
    """The folder holding every process's extraction folder (see the module docstring)."""
    configured = os.environ.get(EXTRACT_DIR_ENV)
    if configured:
        return Path(configured)
    uid = os.geteuid() if hasattr(os, "geteuid") else 0
    return Path(tempfile.gettempdir()) / f"esper-aoti-{uid}"


@dataclass
class _ProcessFolder:
    path: Path
    pid: int
    lock_fd: int | None


_guard = threading.Lock()
_current: _ProcessFolder | None = None
_exit_registered = False


def process_folder() -> Path:
    """This process's extraction folder, created (and the folders of dead processes swept) on first use."""
    global _current, _exit_registered
    with _guard:
        if _current is not None and _current.pid == os.getpid():
            if _current.path.is_dir():
                return _current.path
            _close(_current)  # removed under us (a temp cleaner): start a new one
            _current = None
        base = base_folder()
        _ensure_private_dir(base)
        sweep(base)
        pid = os.getpid()
        try:
            creating = Path(tempfile.mkdtemp(prefix=f".{pid}-", dir=base))
        except OSError as e:
            raise ExtractionError(f"cannot create a folder in {base}: {e.strerror}") from e
        fd = None
        try:
            fd = _hold_lock(creating / LOCK)
            final = base / creating.name[1:]
            os.rename(creating, final)
        except OSError as e:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(creating, ignore_errors=True)
            raise ExtractionError(f"cannot create a folder in {base}: {e.strerror}") from e
        _current = _ProcessFolder(final, pid, fd)
        if not _exit_registered:
            atexit.register(release)
            _exit_registered = True
        return final


def release() -> None:
    """Remove this process's extraction folder now (at exit; before ``os._exit``). Packages already loaded
    keep running: their code is mapped in memory."""
    global _current
    with _guard:
        current, _current = _current, None
    if current is None or current.pid != os.getpid():
        return
    shutil.rmtree(current.path, ignore_errors=True)
    _close(current)


def _close(folder: _ProcessFolder) -> None:
    if folder.lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(folder.lock_fd)
        folder.lock_fd = None


def package_folder() -> Path:
    """A new empty folder for one package, inside this process's folder."""
    return Path(tempfile.mkdtemp(prefix="pkg-", dir=process_folder()))


def discard(folder: Path, pid: int) -> None:
    """Remove one package's folder, in the process that made it only (a forked child inherits the objects
    whose finalizers call this, not the folders)."""
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


def extract(source: str | Path | IO[bytes], into: Path) -> None:
    """Write the files of the package ``source`` that the loader reads (``<model>/data/...``: code, kernels,
    weights, metadata) under ``into``, refusing any name that would leave it."""
    made = {into}
    try:
        with zipfile.ZipFile(source) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                parts = PurePosixPath(info.filename).parts
                if not parts or info.filename.startswith("/") or "\\" in info.filename or ".." in parts:
                    raise ExtractionError(f"package member {info.filename!r} leaves its folder")
                if len(parts) < 3 or parts[1] != "data":
                    continue  # the archive's own bookkeeping (format, version, byte order): file creation is slow
                target = into.joinpath(*parts)
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                with z.open(info) as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ExtractionError(f"not a zip: {e}") from e


def sweep(base: Path | None = None) -> list[Path]:
    """Remove the extraction folders of processes that are gone; the folders removed."""
    base = base_folder() if base is None else base
    own = _current.path.name if _current is not None and _current.pid == os.getpid() else None
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name == own or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if _TRASH.fullmatch(name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif (m := _CREATING.fullmatch(name)) is not None:
            # Its creator may be between mkdtemp and holding the lock: only its own death settles it.
            if not pid_alive(int(m.group(1))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        elif (m := _LIVE.fullmatch(name)) is not None and _owner_gone(path, int(m.group(1))):
            removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _owner_gone(path: Path, pid: int) -> bool:
    """If the process owning ``path`` is gone, remove the folder (renamed first, so a sweep killed half-way
    leaves a name the next one removes) and say so."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        if pid_alive(pid):
            return False
        fd = None
    except OSError:
        return False
    try:
        if fd is not None and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # held: its process is alive
        elif fd is not None and pid_alive(pid):
            return False
        trash = path.with_name(f".trash-{os.urandom(6).hex()}")
        try:
            os.rename(path, trash)
        except OSError:
            return False  # another sweep took it first
    finally:
        if fd is not None:
            os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _hold_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _ensure_private_dir(base: Path) -> None:
    """Create ``base`` (owner only) or check the existing one is a folder of ours, not a link."""
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(base)
    except OSError as e:
        raise ExtractionError(f"cannot use {base} for package extraction: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise ExtractionError(f"{base} is not a folder (a link?): packages are not extracted there")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise ExtractionError(f"{base} belongs to another user: packages are not extracted there")


def _forget_in_child() -> None:
    # A forked child shares the parent's lock (closing its copy of the descriptor leaves the parent's lock
    # held) and gets its own folder on its first load. Another thread may have held the guard at the fork.
    global _current, _guard
    _guard = threading.Lock()
    current, _current = _current, None
    if current is not None:
        _close(current)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
