"""Compile workers: every planned compile runs in a worker (plain ones in run order, autotuning ones as claimed),
exactly once, and the certification's process shares the machine with them through the compile slot."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
from filelock import ReadWriteLock, Timeout

from esper.artifacts.variants import VARIANTS
from esper.blueprint import Blueprint
from esper.catalog import load_file
from esper.certification.budgets import PROFILES
from esper.certification.compile_ahead import (
    CompileAhead,
    CompileJob,
    CompilePool,
    workers,
)
from esper.certification.run import BlueprintCertification, Certification
from esper.tezzeret.aoti import LOCK_NAME, Slot, compile_slot
from esper.tezzeret.compiler import Tezzeret, built_in_this_process
from esper.urza import Urza
from tests.support import TINY


def one(source: Path, name: str, urza: Path) -> CompileJob:
    return CompileJob(str(source), name, "inference", "default", "default", str(urza), "cpu")


def certification(bp: Blueprint, urza: Path) -> Certification:
    return BlueprintCertification.create(bp, urza, PROFILES["cpu-2core"])["inference"]


def jobs(n: int, variant: str = "default") -> list[CompileJob]:
    return [CompileJob("bp.py", "bp", "inference", f"p{i}", variant, "urza.db", "cpu") for i in range(n)]


class FakePool:
    """Runs a job in a thread when released (``work``: what the job does first), recording which jobs the
    workers took."""

    def __init__(self, size: int = 1, fail: bool = False, work: Callable[[CompileJob], None] | None = None):
        self.size = size
        self.fail = fail
        self.work = work
        self.taken: list[CompileJob] = []
        self.release = threading.Event()

    def submit(self, job: CompileJob) -> Future[int | None]:
        self.taken.append(job)
        done: Future[int | None] = Future()

        def work() -> None:
            self.release.wait(5)
            try:
                if self.work is not None:
                    self.work(job)
                if self.fail:
                    raise RuntimeError("worker crashed")
            except Exception as e:
                done.set_exception(e)
            else:
                done.set_result(7)

        threading.Thread(target=work, daemon=True).start()
        return done


def _wait_for(pool: FakePool, n: int) -> None:
    for _ in range(500):
        if len(pool.taken) >= n:
            return
        threading.Event().wait(0.01)


def test_workers_take_plain_compiles_in_order_and_claim_has_a_worker_compile_the_rest() -> None:
    """The certification's process compiles nothing: a claim waits for the worker that took the job, or
    submits a job still queued to the pool and waits for it."""
    pool = FakePool()
    planned = jobs(4)
    ahead = CompileAhead.start(planned, pool)  # type: ignore[arg-type]
    _wait_for(pool, 1)
    assert pool.taken == [planned[0]]  # the worker thread took the first job
    back = threading.Thread(target=ahead.claim, args=(planned[3],))
    back.start()
    _wait_for(pool, 2)
    assert planned[3] in pool.taken, "a claim of a queued job hands it to the pool"
    back.join(0.2)
    assert back.is_alive(), "claiming a job must wait for the worker compiling it"
    front = threading.Thread(target=ahead.claim, args=(planned[0],))
    front.start()
    front.join(0.2)
    assert front.is_alive(), "claiming a job a worker has must wait for it"
    pool.release.set()
    front.join(5)
    back.join(5)
    assert not front.is_alive() and not back.is_alive()
    for job in planned[1:3]:
        ahead.claim(job)
    assert sorted(pool.taken, key=planned.index) == planned, "every job compiled by the pool, none twice"


def test_an_autotuning_compile_waits_for_its_claim() -> None:
    """It needs the machine alone: taken ahead, it would wait for the slot while the certification's checks
    hold it, and keep every other compile waiting behind it."""
    pool = FakePool()
    pool.release.set()
    tuned, plain = jobs(2, "freezing_autotune_cpp"), jobs(1)
    ahead = CompileAhead.start([*tuned, *plain], pool)  # type: ignore[arg-type]
    _wait_for(pool, 1)
    for t in ahead._threads:
        t.join(5)  # a worker thread ends once no plain compile is left
    assert pool.taken == plain, "a worker took an autotuning compile ahead"
    ahead.claim(tuned[1])
    assert pool.taken == [*plain, tuned[1]]


def test_a_claim_lets_go_of_the_slot_so_an_autotuning_compile_can_take_it(tmp_path: Path) -> None:
    """The certification's process holds the slot shared while it checks, and an autotuning compile needs it
    alone: a claim that waited holding it would wait for ever (here: the worker gives up after 5 s)."""

    def autotuning_compile(job: CompileJob) -> None:
        lock = ReadWriteLock(tmp_path / LOCK_NAME, is_singleton=False)
        try:
            lock.acquire_write(timeout=5)
            lock.release()
        finally:
            lock.close()

    pool = FakePool(work=autotuning_compile)
    pool.release.set()
    [job] = jobs(1, "freezing_autotune_cpp")
    slot = Slot(tmp_path)
    ahead = CompileAhead.start([job], pool, slot)  # type: ignore[arg-type]
    ahead.share()
    assert slot.exclusive is False
    ahead.claim(job)
    assert pool.taken == [job] and slot.exclusive is None
    # The seeded twin: the same compile while the slot is held shared cannot get it.
    ahead.share()
    with pytest.raises(Timeout):
        autotuning_compile(job)
    ahead.close()
    assert slot.exclusive is None


def test_quiet_waits_for_the_compile_under_way_and_holds_the_next_off(tmp_path: Path) -> None:
    """A timing check runs with no compile beside it: :meth:`quiet` returns only once the worker's compile
    (holding the slot shared) is done, and a compile that starts meanwhile waits until :meth:`share`."""
    compiling, finish = threading.Event(), threading.Event()
    quiet, go_share = threading.Event(), threading.Event()

    def plain_compile() -> None:
        with compile_slot({}, tmp_path):
            compiling.set()
            finish.wait(5)

    def certification() -> None:  # the slot is held by one thread, the one that runs the checks
        ahead = CompileAhead.start([], FakePool(), Slot(tmp_path))  # type: ignore[arg-type]
        ahead.quiet()
        quiet.set()
        go_share.wait(5)
        ahead.share()
        ahead.close()

    worker = threading.Thread(target=plain_compile)
    worker.start()
    assert compiling.wait(5)
    checks = threading.Thread(target=certification)
    checks.start()
    assert not quiet.wait(0.3), "timing began beside a compile"
    finish.set()
    assert quiet.wait(5)
    worker.join(5)
    # A compile now waits for the timing to end.
    compiling.clear()
    finish.clear()
    worker = threading.Thread(target=plain_compile)
    worker.start()
    assert not compiling.wait(0.3), "a compile started beside a timing"
    go_share.set()
    assert compiling.wait(5), "a compile waits for share, not longer"
    finish.set()
    worker.join(5)
    checks.join(5)


def test_a_single_job_is_compiled_by_a_worker_too() -> None:
    pool = FakePool()
    pool.release.set()
    [job] = jobs(1)
    CompileAhead.start([job], pool).claim(job)  # type: ignore[arg-type]
    assert pool.taken == [job]


def test_a_failed_worker_is_logged_and_the_claim_returns(caplog: pytest.LogCaptureFixture) -> None:
    pool = FakePool(fail=True)
    pool.release.set()
    planned = jobs(3)
    ahead = CompileAhead.start(planned, pool)  # type: ignore[arg-type]
    for _ in range(100):
        if pool.taken:
            break
        threading.Event().wait(0.01)
    ahead.claim(planned[2])  # the caller then compiles it itself
    assert "worker crashed" in caplog.text
    ahead.claim(planned[0])  # a queued job whose worker fails: logged too, and the claim returns
    assert caplog.text.count("worker crashed") == 2


def test_worker_count() -> None:
    # The certification's process compiles nothing: as many compiles run at once as when it took a share.
    assert workers(2, {}) == 2
    assert workers(1, {}) == 1
    assert workers(16, {}) == 5
    assert workers(16, {"ESPER_CERTIFY_COMPILE_WORKERS": "0"}) == 0
    assert workers(2, {"ESPER_CERTIFY_COMPILE_WORKERS": "3"}) == 3
    assert workers(8, {"PYTEST_XDIST_WORKER": "gw0"}) == 0
    with pytest.raises(ValueError, match="whole number"):
        workers(2, {"ESPER_CERTIFY_COMPILE_WORKERS": "many"})
    with pytest.raises(ValueError, match="0 or more"):
        workers(2, {"ESPER_CERTIFY_COMPILE_WORKERS": "-1"})


def test_a_worker_process_imports_the_job_and_reports_its_error(tmp_path: Path) -> None:
    """The real pool: a spawned process unpickles the job (the module must import there) and a failing
    compile comes back as its own error, not a broken pool."""
    pool = CompilePool(1)
    job = one(tmp_path / "missing.py", "nope", tmp_path / "u.db")
    try:
        with pytest.raises(RuntimeError, match=r"BlueprintError: .*missing\.py"):
            pool.submit(job).result(timeout=120)
    finally:
        pool.close()


@pytest.mark.compiles
def test_what_a_worker_compiles_the_certification_reuses(tmp_path: Path) -> None:
    source = TINY / "tiny_mlp.py"
    urza_path = tmp_path / "urza.db"
    [bp] = load_file(source)
    # The plan lists a candidate Urza does not hold; once it does, none (an unchanged run starts no worker).
    assert certification(bp, urza_path).job("default/default") == one(source, "tiny_mlp", urza_path)
    pool = CompilePool(1)
    try:
        entry_id = pool.submit(one(source, "tiny_mlp", urza_path)).result(timeout=600)
    finally:
        pool.close()
    assert certification(bp, urza_path).job("default/default") is None
    assert certification(bp, urza_path).job("default/default", planned=False) is not None
    with Urza(urza_path) as urza:
        outcome = Tezzeret(urza).compile(bp, artifact="inference", variant=VARIANTS["default"], profile="default")
        assert outcome.reused and outcome.entry.id == entry_id and outcome.entry.status == "compiled"
        assert not built_in_this_process(outcome.entry), "compiled by the worker: timed apart from its compile"
        # The twin: compiled again here (forced), the package is one this process built.
        here = (
            Tezzeret(urza)
            .compile(bp, artifact="inference", variant=VARIANTS["default"], profile="default", force=True)
            .entry
        )
    assert here.checksum and built_in_this_process(here)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # an orphan that ended may wait as a zombie for its new parent


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_worker_ends_when_the_certification_that_started_it_is_killed(tmp_path: Path) -> None:
    """A certification killed by a signal runs no session finish: its worker must not outlive it."""
    worker = (
        "import os, sys, time; from esper.certification.compile_ahead import exit_with_parent; "
        "exit_with_parent(os.getppid(), poll=0.05); print(os.getpid(), flush=True); time.sleep(60)"
    )
    # The "certification": starts the worker, waits for its pid, then dies without cleaning up.
    parent = (
        "import subprocess, sys, os; "
        f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], stdout=subprocess.PIPE, text=True); "
        "pid = p.stdout.readline().strip(); import time; time.sleep(0.3); "
        "print(pid, p.poll() is None, flush=True); os._exit(9)"
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    pid, alive_with_parent = out.stdout.split()
    assert alive_with_parent == "True"  # while its certification lives, a worker works
    pid = int(pid)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the worker outlived its certification"


def test_a_workers_plain_compiles_build_their_objects_in_turn() -> None:
    """Two workers beside the certification's checks keep both cores busy: a worker's plain package builds
    its objects one after the other, an autotuning one (run alone) side by side."""
    worker = (  # its parent, this test's process, lives on: the worker's watch lets it be
        "import os; from esper.certification.compile_ahead import start_worker; start_worker(os.getppid()); "
        "from esper.artifacts.variants import get; from esper.tezzeret.aoti import builds_beside; "
        "print(builds_beside(get('default').settings), builds_beside(get('freezing_autotune_cpp').settings))"
    )
    out = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"]
