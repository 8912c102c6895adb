"""Compiling a certification's candidates in worker processes, never in the certification's own.

An AOTInductor compile is one Python process lowering the graph, then one ``g++`` building one shared
library: it keeps about one core busy, and the certification's checks of the blueprint before (parity, the
contract, weights, guards: one Python process) keep about one more. A :class:`CompileAhead` takes every planned
compile of the run (the ``test_compile`` items pytest collected, in order): worker processes take the plain ones
in that order, so the next blueprint compiles while this one's checks run, and when ``test_compile`` reaches a
candidate still queued it hands that one to the pool itself; either way it waits for the worker, then Tezzeret
finds the entry the worker stored (same content hash and compatibility key) and reuses it. So the checks see
exactly what a serial run would. An exact-size specialization is in no plan (it compiles only where its
profile's entry fell back, known once that entry is): its ``test_compile`` first asks Tezzeret whether it would
compile, then hands it to a worker the same way (:meth:`CompileAhead.compile_now`).

Who runs beside whom is the compile slot's (:func:`esper.tezzeret.aoti.compile_slot`): plain compiles share it,
an autotuning compile holds it alone (its kernel timings pick the kernel baked into the package), and the
certification's process holds it too, through a :class:`~esper.tezzeret.aoti.Slot`: shared while it checks,
alone while it times (a latency or region check: every compile under way ends first, and none starts until
it is done), not at all while it waits for a worker. An autotuning compile is therefore left for its claim:
taken ahead, it would wait for the slot behind the certification's checks and hold every plain compile off.

Why the certification's process compiles nothing: a package can run faster in the process that compiled it
than in a process that only loads it (an autotuned GEMM package, measured: in most of the compiling processes
tried, in none of the others), and Kasmina serves it in a process that compiled nothing. Timing a package where
it was built would certify speed that no serving process sees. This is one cause, not every one: a
certification's process that compiled nothing has also timed such a package faster than later processes do.
The record says where each timed package was compiled (:attr:`esper.urza.evidence.CertificationRecord.timed_apart`).

Workers: ``ESPER_CERTIFY_COMPILE_WORKERS`` (``0``: compile in the certification's own process, one after
another); by default one per four cores (at least one) plus one for the share the certification's process
compiled when it compiled itself, so two on two cores and one on one core, and none inside a pytest-xdist worker (xdist
already runs blueprints side by side; such a run's timings are of packages compiled where they are timed).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from esper.artifacts.variants import VARIANTS
from esper.tezzeret.aoti import Slot, autotunes

log = logging.getLogger(__name__)

WORKERS_ENV = "ESPER_CERTIFY_COMPILE_WORKERS"


@dataclass(frozen=True)
class CompileJob:
    """One candidate to compile: everything a fresh process needs to compile it into the same Urza."""

    source: str  # the blueprint's file
    blueprint: str
    artifact: str
    profile: str
    variant: str
    urza: str
    device: str

    @property
    def autotunes(self) -> bool:
        """Whether this compile times kernels (it then needs the machine alone)."""
        variant = VARIANTS.get(self.variant)
        return variant is not None and autotunes(variant.settings)


def workers(cpus: int | None = None, environ: dict[str, str] | None = None) -> int:
    """How many compile workers a certification session starts (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("PYTEST_XDIST_WORKER"):
        return 0
    raw = env.get(WORKERS_ENV)
    if raw is not None and raw.strip():
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV} must be a whole number of processes, not {raw!r}") from None
        if n < 0:
            raise ValueError(f"{WORKERS_ENV} must be 0 or more, not {n}")
        return n
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    return max(1, cpus // 4) + 1 if cpus >= 2 else 1


def compile_job(job: CompileJob) -> int | None:
    """Compile ``job`` with Tezzeret into its Urza (in a worker process); the entry's id."""
    import torch

    from esper.catalog import load_file
    from esper.tezzeret.compiler import Tezzeret
    from esper.urza import Urza

    try:
        declared = {bp.name: bp for bp in load_file(Path(job.source))}
        with Urza(Path(job.urza)) as urza:
            outcome = Tezzeret(urza, device=torch.device(job.device)).compile(
                declared[job.blueprint], artifact=job.artifact, variant=VARIANTS[job.variant], profile=job.profile
            )
    except Exception as e:
        # Crosses a process boundary: not every exception pickles (BlueprintError's constructor does not).
        raise RuntimeError(f"{type(e).__name__}: {e}") from None
    return outcome.entry.id


# How often a worker checks that the certification that started it is still alive.
PARENT_POLL_SECONDS = 1.0


def exit_with_parent(parent: int, poll: float = PARENT_POLL_SECONDS) -> None:
    """End this process once ``parent`` is gone (run by :func:`start_worker`). A certification killed by a signal runs
    no session finish, and its worker would otherwise finish the compile under way as an orphan (measured:
    about a minute of one core, beside whatever ran next). ``os._exit`` runs no exit handler: the packages
    this worker extracted are removed first."""
    from esper.artifacts import extraction

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        extraction.release()
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def start_worker(parent: int) -> None:
    """Worker initializer: the worker ends with ``parent`` (:func:`exit_with_parent`), and its compiles run
    among others (:func:`esper.tezzeret.aoti.compiles_among_others`)."""
    from esper.tezzeret.aoti import compiles_among_others

    compiles_among_others()
    exit_with_parent(parent)


class CompilePool:
    """The session's compile worker processes (spawned, so no parent state leaks in), started on first use."""

    def __init__(self, size: int):
        self.size = size
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, job: CompileJob) -> Future[int | None]:
        with self._lock:
            if self._executor is None:
                ctx = multiprocessing.get_context("spawn")
                self._executor = ProcessPoolExecutor(
                    max_workers=self.size, mp_context=ctx, initializer=start_worker, initargs=(os.getpid(),)
                )
            return self._executor.submit(compile_job, job)

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None


class CompileAhead:
    """A certification session's planned compiles, all run by ``pool``'s workers, and the slot its own process
    holds between them. Workers take the plain compiles in run order, running ahead of the certification (the
    next blueprint's compiles beside this one's parity checks); an autotuning compile waits for its claim, for
    it needs the machine alone (:func:`esper.tezzeret.aoti.compile_slot`): taken ahead, it would wait for the
    slot behind the certification's checks and hold every plain compile off meanwhile. Build it with
    :meth:`start` before the first ``test_compile``.

    ``slot`` (the compile slot of the workers' Inductor cache) is how the certification's process shares the
    machine with them: :meth:`share` before work a compile may run beside, :meth:`quiet` before it times (every
    compile under way ends first, and none starts until the next :meth:`share`), and nothing held while it
    waits for a worker (:meth:`claim` and :meth:`compile_now` let go of it first: an autotuning compile waits
    for the slot alone, so a wait that held it would never end)."""

    def __init__(self, jobs: Sequence[CompileJob], pool: CompilePool, slot: Slot | None = None):
        self._pending: deque[CompileJob] = deque(jobs)
        self._taken: dict[CompileJob, Future[int | None]] = {}
        self._lock = threading.Lock()
        self._pool = pool
        self._slot = slot
        self._threads = [threading.Thread(target=self._drain, daemon=True) for _ in range(pool.size)]

    @classmethod
    def start(cls, jobs: Sequence[CompileJob], pool: CompilePool, slot: Slot | None = None) -> CompileAhead:
        ahead = cls(jobs, pool, slot)
        for t in ahead._threads:
            t.start()
        return ahead

    def _drain(self) -> None:
        while True:
            with self._lock:
                job = next((j for j in self._pending if not j.autotunes), None)
                if job is None:
                    return
                self._pending.remove(job)
                done: Future[int | None] = Future()
                self._taken[job] = done
            self._run(job, done)

    def _run(self, job: CompileJob, done: Future[int | None]) -> None:
        try:
            done.set_result(self._pool.submit(job).result())
        except BaseException as e:  # handed to the waiter, who compiles again itself
            done.set_exception(e)

    def share(self) -> None:
        """The certification's process is about to do work a compile may run beside (a parity check)."""
        if self._slot is not None:
            self._slot.hold(False)

    def quiet(self) -> None:
        """The certification's process is about to time: wait for every compile under way, start none."""
        if self._slot is not None:
            self._slot.hold(True)

    def claim(self, job: CompileJob) -> None:
        """Before ``test_compile`` looks ``job`` up: have a worker compile it (the one that took it, or the pool
        now, if it is still queued) and wait. A worker that failed is logged; the caller's own compile then
        does the work in its process (or reports the failure)."""
        with self._lock:
            queued = job in self._pending
            if queued:
                self._pending.remove(job)
                self._taken[job] = Future()
            taken = self._taken.get(job)
        if taken is None:
            return
        self._let_go()
        if queued:
            self._run(job, taken)
        self._wait(job, taken)

    def compile_now(self, job: CompileJob) -> None:
        """Have a worker compile ``job``, one no plan could list (a specialization, known to compile only once
        its profile's entry is), and wait. A failure is logged as in :meth:`claim`."""
        with self._lock:
            taken = self._taken.get(job)
            submit = taken is None
            if taken is None:
                self._taken[job] = taken = Future()
        self._let_go()
        if submit:
            self._run(job, taken)
        self._wait(job, taken)

    def close(self) -> None:
        """Take no more jobs and let go of the slot for good (a worker's compile under way then finishes)."""
        with self._lock:
            self._pending.clear()
        self._let_go()
        self._slot = None

    def _let_go(self) -> None:
        if self._slot is not None:
            self._slot.hold(None)

    @staticmethod
    def _wait(job: CompileJob, taken: Future[int | None]) -> None:
        try:
            taken.result()
        except Exception as e:  # the caller compiles it again and reports what fails
            log.warning("compile worker failed on %s %s %s: %s", job.blueprint, job.artifact, job.profile, e)
