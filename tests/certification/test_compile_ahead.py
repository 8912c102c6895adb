"""Compile workers: the certification compiles from the front, workers from the back, each job exactly once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from esper.artifacts.variants import VARIANTS
from esper.catalog import load_file
from esper.certification.compile_ahead import (
    CompileAhead,
    CompileJob,
    CompilePool,
    compile_job,
    workers,
)
from esper.tezzeret.compiler import Tezzeret
from esper.urza import Urza
from tests.support import TINY


def one(source: Path, name: str, urza: Path) -> CompileJob:
    return CompileJob(str(source), name, "inference", "default", "default", str(urza), "cpu")


def jobs(n: int) -> list[CompileJob]:
    return [CompileJob("bp.py", "bp", "inference", f"p{i}", "default", "urza.db", "cpu") for i in range(n)]


class FakePool:
    """Runs a job in a thread when released, recording which jobs the workers took."""

    def __init__(self, size: int = 1, fail: bool = False):
        self.size = size
        self.fail = fail
        self.taken: list[CompileJob] = []
        self.release = threading.Event()

    def submit(self, job: CompileJob) -> Future[int | None]:
        self.taken.append(job)
        done: Future[int | None] = Future()

        def work() -> None:
            self.release.wait(5)
            if self.fail:
                done.set_exception(RuntimeError("worker crashed"))
            else:
                done.set_result(7)

        threading.Thread(target=work, daemon=True).start()
        return done


def test_workers_take_from_the_back_and_claim_waits_for_them() -> None:
    pool = FakePool()
    planned = jobs(4)
    ahead = CompileAhead.start(planned, pool)  # type: ignore[arg-type]
    for _ in range(100):  # the worker thread picks its first job at once
        if pool.taken:
            break
        threading.Event().wait(0.01)
    assert pool.taken == [planned[3]]
    ahead.claim(planned[0])  # still queued: this side compiles it, nothing waits
    assert planned[0] not in pool.taken
    waiter = threading.Thread(target=ahead.claim, args=(planned[3],))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "claiming a job a worker has must wait for it"
    pool.release.set()
    waiter.join(5)
    assert not waiter.is_alive()
    for job in planned[1:3]:
        ahead.claim(job)
    taken = set(pool.taken)
    assert planned[0] not in taken
    assert taken <= set(planned[1:])
    assert len(pool.taken) == len(taken), "no job ran twice"


def test_the_last_job_is_left_to_the_certification() -> None:
    pool = FakePool()
    pool.release.set()
    planned = jobs(2)
    ahead = CompileAhead.start(planned, pool)  # type: ignore[arg-type]
    ahead.claim(planned[0])
    ahead.claim(planned[1])
    assert len(pool.taken) <= 1
    single = CompileAhead.start(jobs(1), pool)  # type: ignore[arg-type]
    single.claim(jobs(1)[0])
    assert len(pool.taken) <= 1, "one job: nothing to overlap, no worker"


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


def test_worker_count() -> None:
    assert workers(2, {}) == 1
    assert workers(1, {}) == 0
    assert workers(16, {}) == 4
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
    entry_id = compile_job(one(source, "tiny_mlp", urza_path))
    [bp] = load_file(source)
    with Urza(urza_path) as urza:
        outcome = Tezzeret(urza).compile(bp, artifact="inference", variant=VARIANTS["default"], profile="default")
    assert outcome.reused and outcome.entry.id == entry_id and outcome.entry.status == "compiled"


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
