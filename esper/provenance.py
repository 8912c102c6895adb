"""Which source files a compiled entry came from, and a cheap digest of them (stale code).

Editing a blueprint's source without bumping its version used to leave Kasmina serving the old compiled code
inside the guards and the new eager code outside them. Tezzeret stores :func:`current_source_digest` of the
blueprint in ``meta["source_digest"]`` when it compiles; Kasmina recomputes it from the blueprint it was given
(reading a few files, no torch, no module build) and serves eager with the reason ``stale`` when they differ.

One implementation serves both layers: Tezzeret's content hash (``esper.tezzeret.content``) hashes
:func:`source_files` with the built module (adding the files of every class the module instantiates) through
:func:`digest_files`; the stale check uses the same functions without a module, so it needs only the
blueprint. Torch-free (a leaf above :mod:`esper.blueprint`), so Kasmina imports it without importing Tezzeret.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from esper.blueprint import Blueprint

#: Top-level packages whose classes are not the blueprint's own code (their version is in the compat key).
FRAMEWORK_PACKAGES = frozenset({"torch"})


def _class_file(cls: type) -> Path | None:
    """The file defining ``cls``, unless it is the framework's or has none (defined in C or at run time)."""
    if cls.__module__.partition(".")[0] in FRAMEWORK_PACKAGES:
        return None
    try:
        f = inspect.getsourcefile(cls)
    except TypeError:
        return None
    return Path(f) if f else None


def _declared_classes(bp: Blueprint) -> list[type]:
    """Module classes the declaring file can name: classes with a ``forward`` in the builder's globals."""
    namespace = getattr(bp.build, "__globals__", {})
    return [v for v in namespace.values() if isinstance(v, type) and callable(getattr(v, "forward", None))]


def source_files(bp: Blueprint, module: Any = None) -> list[Path]:
    """The files whose text decides what ``bp`` computes, sorted: its declaring file, the files defining the
    module classes its declaring file names (framework classes excluded) and, given the built ``module`` (an
    ``nn.Module``), the files of every class in ``module.modules()``.

    Without ``module`` the set is cheap (no build) and what the stale check uses; with it, it is what the
    content hash uses.
    """
    files = {Path(bp.source)} if bp.source else set()
    classes = _declared_classes(bp)
    if module is not None:
        classes += [type(sub) for sub in module.modules()]
    for cls in classes:
        f = _class_file(cls)
        if f is not None:
            files.add(f)
    return sorted(files)


def digest_files(paths: Iterable[Path]) -> str:
    """sha256 over each file's name, length and bytes, in the given order (length-prefixed, so moving bytes
    from one file to the next changes the digest). A file that cannot be read is part of the digest as such
    (``name:missing:``), so a deleted source reads as changed rather than raising."""
    h = hashlib.sha256()
    for f in paths:
        try:
            data = Path(f).read_bytes()
        except OSError:
            h.update(f"{Path(f).name}:missing:".encode())
            continue
        h.update(f"{Path(f).name}:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


def current_source_digest(bp: Blueprint) -> str:
    """The digest Tezzeret records in ``meta["source_digest"]`` and Kasmina compares: :func:`digest_files` of
    :func:`source_files` without a module."""
    return digest_files(source_files(bp))


def stale_reason(bp: Blueprint, recorded: str | None) -> str | None:
    """Why an entry whose ``meta["source_digest"]`` is ``recorded`` must not serve ``bp`` now; ``None`` when it
    may. An entry without a recorded digest (compiled before digests were kept) is not called stale."""
    if recorded is None:
        return None
    current = current_source_digest(bp)
    if current == recorded:
        return None
    return (
        f"blueprint {bp.name!r} source changed since the entry was compiled (source digest {current[:12]} != "
        f"recorded {recorded[:12]}): bump its version and recompile"
    )
