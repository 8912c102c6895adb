"""AOTInductor: the exported program to a ``.pt2`` package, with a persistent Inductor cache.

Why AOTInductor and not ``torch.compile``: a ``torch.compile`` wrapper cannot be saved, so every process
would compile again (seconds per blueprint). ``torch._inductor.aoti_compile_and_package`` runs the same
Inductor backend ahead of time and writes a self-contained package that a process loads in milliseconds.

Compiles share the machine through one slot per Inductor cache (:func:`compile_slot`), a package's two
objects build side by side where a core is free for the second (:func:`builds_beside`), an object built
before from the same recipe is reused (:func:`objects_reused`), and an autotuning compile's candidates build
against a precompiled header (:func:`candidates_with_precompiled_prefix`).
"""

from __future__ import annotations

import logging
import os
import shlex
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import ReadWriteLock

from esper.tezzeret.object_store import STORE_NAME, ObjectStore, Recipe

if TYPE_CHECKING:
    from torch.export import ExportedProgram

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# Inductor settings under which a compile times candidate kernels and bakes the fastest into the package.
AUTOTUNING = ("max_autotune", "max_autotune_gemm", "max_autotune_pointwise", "coordinate_descent_tuning")
# The lock file shared by every compile that uses one Inductor cache (a certification and its compile workers).
LOCK_NAME = "esper-compiles.lock"
# The slot this thread holds, if any: a compile nested in another (Tezzeret holds one around a whole compile,
# the package build inside it asks again) runs in the outer one.
_held = threading.local()


def use_persistent_cache(folder: Path) -> Path:
    """Point Inductor's cache at ``folder`` unless the user already chose one; returns the folder in use."""
    if CACHE_ENV not in os.environ:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[CACHE_ENV] = str(folder)
    return Path(os.environ[CACHE_ENV])


def urza_cache(urza: Path) -> Path:
    """The Inductor cache of the Urza at ``urza`` (its folder's ``inductor-cache``, unless the user chose one),
    pointed to as :func:`use_persistent_cache` does: where its compiles and their :class:`Slot` live."""
    return use_persistent_cache(urza.parent / "inductor-cache")


def autotunes(settings: Mapping[str, Any] | None) -> bool:
    """Whether a compile with these Inductor overrides times kernels and keeps the fastest."""
    return any(bool((settings or {}).get(key)) for key in AUTOTUNING)


def compile_slot(settings: Mapping[str, Any] | None, folder: Path | None = None) -> AbstractContextManager[None]:
    """Hold the right to compile beside others (shared), or alone where the compile autotunes (exclusive).

    An autotuning compile keeps whichever candidate kernel its own timings favour, and the choice is baked into
    the package: timed beside other work (a second compile worker exporting, building or timing its own
    package on a 2-core machine), a slower kernel wins on a noisy timing, and two cold certifications of the
    same code certify different packages. So an autotuning compile waits until no other compile (or other work
    holding a :class:`Slot`) sharing ``folder`` (the Inductor cache, by default: one certification and its
    workers) runs, and holds the others off until it is done; other compiles run side by side. Tezzeret holds
    the slot around a whole compile (export, package build, pre-warm and its timings), not only Inductor's
    part. A slot asked for inside one this thread holds is the outer one. The lock is SQLite's: a waiting
    writer keeps new readers out, so a stream of short compiles cannot starve it, and a process that dies
    releases what it held. Where the lock cannot be taken the compile runs without it, with a WARNING."""
    return _slot(autotunes(settings), folder)


@contextmanager
def _slot(exclusive: bool, folder: Path | None) -> Iterator[None]:
    if getattr(_held, "slot", False):
        yield
        return
    if folder is None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        folder = Path(cache_dir())
    lock: ReadWriteLock | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = ReadWriteLock(folder / LOCK_NAME, is_singleton=False)
        (lock.acquire_write if exclusive else lock.acquire_read)()
    except (OSError, sqlite3.Error, ValueError) as e:
        # A folder the lock cannot live in (read-only, full, a filesystem SQLite cannot lock) costs the
        # ordering, never the work.
        log.warning("running without a compile slot in %s (%s: %s)", folder, type(e).__name__, e)
        if lock is not None:
            lock.close()
        lock = None
    _held.slot = True
    try:
        yield
    finally:
        _held.slot = False
        if lock is not None:
            lock.release()
            lock.close()


class Slot:
    """A standing hold on the compile slot of one Inductor cache, for work that is not a compile but shares the
    machine with compiles (a certification whose compile workers use that cache): shared while the work may
    run beside a compile (a parity check), exclusive while it times (no compile runs beside a timing, and none
    starts until it is done), none while it waits for a compile (an autotuning compile needs the slot alone).

    Held by the thread that calls :meth:`hold`; a compile that thread runs meanwhile runs in this hold."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.exclusive: bool | None = None  # what is held now (None: nothing)
        self._stack: ExitStack | None = None

    def hold(self, exclusive: bool | None) -> None:
        """Hold the slot shared (``False``), exclusive (``True``), or not at all (``None``); waits for it."""
        if exclusive == self.exclusive:
            return
        self.release()
        if exclusive is None:
            return
        stack = ExitStack()
        stack.enter_context(_slot(exclusive, self.folder))
        self._stack, self.exclusive = stack, exclusive

    def release(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self.exclusive = None, None


def compile_package(ep: ExportedProgram, path: Path, settings: Mapping[str, Any] | None = None) -> Path:
    """Compile ``ep`` into the package file ``path`` with Inductor config overrides ``settings`` (in its
    :func:`compile_slot`), the package's wrapper built beside its kernels (:func:`wrapper_beside_kernels`) where a
    core is free for it (:func:`builds_beside`), its objects reused where an identical build was kept
    (:func:`objects_reused`), and any autotuning candidate built against the precompiled prefix header
    (:func:`candidates_with_precompiled_prefix`)."""
    import torch._inductor

    builds = wrapper_beside_kernels() if builds_beside(settings) else nullcontext()
    with compile_slot(settings), objects_reused(), builds, candidates_with_precompiled_prefix():
        out = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(path), inductor_configs=dict(settings or {})
        )
    return Path(out)


# Whether this process's plain compiles run among others that keep every core busy.
_among_others = False


def compiles_among_others(among: bool = True) -> None:
    """Say whether this process's plain compiles run among others that keep every core busy (a certification's
    compile worker: two of them beside the certification's checks on two cores). Their packages then build
    their objects in turn (:func:`builds_beside`): a second ``g++`` there takes a core from the certification's
    own checks, which are what a cold certification waits on while plain compiles remain, and a cold
    certification was no faster with it."""
    global _among_others
    _among_others = among


def builds_beside(settings: Mapping[str, Any] | None) -> bool:
    """Whether a compile with these Inductor overrides builds its package's objects side by side: where a core
    is free for the second build, in an autotuning compile (it runs alone) and in a process whose compiles are
    not among others (:func:`compiles_among_others`)."""
    return autotunes(settings) or not _among_others


# The builds this thread has under way beside its own (None: outside a :func:`wrapper_beside_kernels` block).
_beside = threading.local()
# The one object of an AOTInductor package that nothing reads before the package's link.
WRAPPER_OBJECT = ".wrapper.o"


@contextmanager
def wrapper_beside_kernels(builder: Any = None) -> Iterator[None]:
    """Build an AOTInductor package's wrapper object in a second ``g++`` while its kernels' object builds.

    AOTInductor builds a package's wrapper object (the model container's C++) and then its kernels' object, one
    after the other, and links them last. The wrapper takes most of a package's ``g++`` time and the kernels
    most of the rest, so where a core is free (an autotuning compile runs alone; a unit test compiles one
    package at a time) building them side by side takes the shorter build off every package. Within this
    block, a wrapper object's build (``builder.build``; Inductor's ``CppBuilder`` by default) in this thread
    starts in a second thread and returns at once; any later build that is not an object (the link, a
    precompiled header, an autotuning candidate's library) first waits for it, as does leaving the block,
    where its failure is raised as Inductor would have raised it. Builds in other threads, and outside such a
    block, run as Inductor runs them."""
    if builder is None:
        from torch._inductor.cpp_builder import CppBuilder

        builder = CppBuilder
    _wrap_build(builder)
    if getattr(_beside, "pending", None) is not None:
        yield
        return
    _beside.pending = []
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="esper-wrapper-g++") as executor:
            _beside.executor = executor
            yield
            _wait_beside()
    finally:
        # Leaving the executor's block waited for every build (a failure in the block: none outlives it).
        _beside.pending = _beside.executor = None


def _wait_beside() -> None:
    pending = _beside.pending
    while pending:
        pending.pop(0).result()


def _wrap_build(builder: Any) -> None:
    """Wrap ``builder.build`` once: in a :func:`wrapper_beside_kernels` block of the calling thread, a wrapper
    object builds in the block's second thread, and in an :func:`objects_reused` block an object the store
    holds is copied instead of built; elsewhere the build is the original, untouched."""
    if getattr(builder.build, "esper_build", False):
        return
    build: Callable[[Any], None] = builder.build

    def wrapped(self: Any) -> None:
        # Decided in the calling thread: the block that asked for reuse is open here, not in the second thread.
        run = partial(_reuse_or_build, build, self) if _reusing else partial(build, self)
        pending: list[Future[None]] | None = getattr(_beside, "pending", None)
        if pending is None:
            return run()
        target = str(self.get_target_file_path())
        if target.endswith(WRAPPER_OBJECT):
            pending.append(_beside.executor.submit(run))
            return None
        if not target.endswith(".o"):
            _wait_beside()
        return run()

    wrapped.esper_build = True  # type: ignore[attr-defined]
    builder.build = wrapped


class OpenBlocks:
    """How many blocks of one kind are open in this process, in any thread (true while any is): Inductor may
    build in threads of its own, so a thread-local flag would miss them."""

    def __init__(self) -> None:
        self._open = 0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self._open > 0

    @contextmanager
    def opened(self) -> Iterator[None]:
        with self._lock:
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1


# The open :func:`objects_reused` blocks.
_reusing = OpenBlocks()


@contextmanager
def objects_reused(builder: Any = None) -> Iterator[None]:
    """Copy a package object from the :class:`~esper.tezzeret.object_store.ObjectStore` of the Inductor cache in
    use where it holds the same :class:`~esper.tezzeret.object_store.Recipe`, and keep every object built.

    Within this block (in any thread), an object that ``builder`` (Inductor's ``CppBuilder`` by default) compiles
    from C++ sources is looked up by its recipe before ``g++`` runs. Objects from other sources (a package's
    constants, assembled and then patched with the weights) and every other build (links, headers, candidate
    libraries) run as Inductor runs them, as does everything while Inductor's caches are disabled
    (``TORCHINDUCTOR_FORCE_DISABLE_CACHES``)."""
    if builder is None:
        from torch._inductor.cpp_builder import CppBuilder

        builder = CppBuilder
    _wrap_build(builder)
    with _reusing.opened():
        yield


def _reuse_or_build(build: Callable[[Any], None], builder: Any) -> None:
    recipe = object_recipe(builder)
    if recipe is None:
        return build(builder)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    store = ObjectStore(Path(cache_dir()) / STORE_NAME)
    if store.build(Path(builder.get_target_file_path()), recipe, partial(build, builder)):
        log.debug("reused %s from %s", builder.get_target_file_path(), store.folder)
    return None


def object_recipe(builder: Any) -> Recipe | None:
    """The :class:`~esper.tezzeret.object_store.Recipe` of an object ``builder`` compiles from C++ sources, or
    None where its object is not to be reused (not an object, other sources, caches disabled)."""
    import torch

    if torch.compiler.config.force_disable_caches or not str(builder.get_target_file_path()).endswith(".o"):
        return None
    # Torch's CppBuilder keeps the sources it compiles as one string of paths.
    sources = getattr(builder, "_sources_args", None)
    paths = tuple(Path(s) for s in shlex.split(sources)) if isinstance(sources, str) else ()
    if not paths or any(p.suffix != ".cpp" for p in paths):
        return None
    headers = f"torch {torch.__version__} {torch.version.git_version}"
    return Recipe(builder.get_command_line(), paths, _compiler_report(getattr(builder, "_compiler", "")), headers)


@cache
def _compiler_report(compiler: str) -> str:
    from torch._inductor.cpp_builder import get_compiler_version_info

    return get_compiler_version_info(compiler) if compiler else ""


# The header every C++ kernel of Inductor's CPU backend includes first.
CPU_PREFIX_HEADER = "torch/csrc/inductor/cpp_prefix.h"
# The open :func:`candidates_with_precompiled_prefix` blocks: Inductor may build an op's candidates in a thread
# pool of its own.
_prefixed = OpenBlocks()


@contextmanager
def candidates_with_precompiled_prefix(cache: Any = None) -> Iterator[None]:
    """Build every autotuning candidate against one precompiled copy of the CPU prefix header.

    An autotuning compile times a template GEMM by building it as a library of its own (Inductor's plain
    ``CppCodeCache``), one op after another, while the compile holds the machine alone. Inductor precompiles the
    prefix header every CPU kernel starts with for a package's kernels and for ``torch.compile``'s kernels, but
    its plain code cache names no header to precompile, so each candidate parses and compiles the whole header
    again. Within this block, the plain cache (``cache``; Inductor's ``CppCodeCache`` by default) names that
    header for the CPU: the first build with a given command line precompiles it (the very file that
    ``torch.compile``'s CPU kernels include, kept by Inductor beside its other precompiled headers and reused by
    later processes), the rest include it. The candidate's code and optimization flags, and so its timing, are
    unchanged. Outside such blocks, and for the caches that name a header of their own, nothing changes."""
    if cache is None:
        from torch._inductor.codecache import CppCodeCache

        cache = CppCodeCache
    _name_prefix_header(cache)
    with _prefixed.opened():
        yield


def _name_prefix_header(cache: Any) -> None:
    """Wrap ``cache``'s choice of a header to precompile once: inside a block of
    :func:`candidates_with_precompiled_prefix`, the CPU prefix header where the cache itself names none."""
    named = cache.__dict__.get("_get_uncompiled_header")
    choose = getattr(named, "__func__", None)
    if choose is None:
        log.debug("%s names no header to precompile here; its candidates build as Inductor builds them", cache)
        return
    if getattr(choose, "esper_prefix", False):
        return

    def header(cls: Any, device: str) -> str | None:
        chosen: str | None = choose(cls, device)
        if chosen is None and _prefixed and device.split(":", 1)[0] == "cpu":
            return CPU_PREFIX_HEADER
        return chosen

    header.esper_prefix = True  # type: ignore[attr-defined]
    cache._get_uncompiled_header = classmethod(header)
