"""Concurrency: writers on one Urza lose nothing and never see "database is locked", readers keep loading while
a writer publishes, and one kernel serves 8 threads at once correctly."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from esper.kasmina import COMPILED, Kasmina
from esper.urza import Urza
from esper.urza.db import MIGRATIONS
from esper.urza.maintenance import verify
from tests.support import TINY, make_entry

WORKER = Path(__file__).parent / "_urza_worker.py"
ENV = {**os.environ, "ESPER_SIGNING_KEY": ""}


def start(go: Path, *args: object) -> subprocess.Popen[str]:
    """A writer process that starts writing once ``go`` exists (so several start at the same moment)."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args), "--go", str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=300)
    assert "locked" not in err and proc.returncode == 0, err[-2000:]
    return out


PUBLISHES = 200


def test_two_writers_creating_one_urza_lose_no_entries(tmp_path: Path) -> None:
    # Neither process finds a database: both create it and migrate it, then publish and update at once.
    urza_path, go = tmp_path / "urza.db", tmp_path / "go"
    writers = [start(go, "publish", urza_path, tag, PUBLISHES, 512) for tag in ("left", "right")]
    go.touch()
    reported = {tag: finish(w).split() for tag, w in zip(("left", "right"), writers, strict=True)}
    with Urza(urza_path, readonly=True) as urza:
        assert verify(urza).ok
        for tag, words in reported.items():
            entries = urza.entries(tag)
            assert len(entries) == PUBLISHES and {e.status for e in entries} == {"certified"}
            assert sorted(e.id for e in entries) == sorted(int(i) for i in words[0::2])
        assert len(urza.entries()) == 2 * PUBLISHES
        assert [r["name"] for r in urza.db["_urza_migrations"].rows] == [name for name, _ in MIGRATIONS]


def test_concurrent_updates_of_one_entry_keep_both_writers_changes(tmp_path: Path) -> None:
    """``update`` reads and writes the whole row: under the write lock, neither writer's column is lost."""
    urza_path, go = tmp_path / "urza.db", tmp_path / "go"
    with Urza(urza_path, signer=None) as urza:
        entry = make_entry(urza, tmp_path)
    n = 150
    writers = [start(go, "update", urza_path, entry.id, field, n) for field in ("meta", "parity")]
    go.touch()
    for w in writers:
        finish(w)
    with Urza(urza_path, readonly=True) as urza:
        final = urza.get(entry.id)  # type: ignore[arg-type]
    assert final.meta == {"writer": "meta", "n": n} and final.parity == {"writer": "parity", "n": n}


@pytest.mark.compiles
def test_readers_keep_loading_while_a_writer_publishes(
    urza_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    go = tmp_path / "go"
    writer = start(go, "publish", urza_copy, "other", 150, 4096)
    caplog.set_level(logging.WARNING, "esper.kasmina")
    ref = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp").eager_module()
    go.touch()
    loads, seen = 0, []
    x = torch.randn(5, 8)
    while writer.poll() is None or loads < 3:
        kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
        with torch.no_grad():
            torch.testing.assert_close(kernel(x), ref(x), atol=1e-5, rtol=1e-5)
        assert kernel.route == COMPILED and kernel.last_path == COMPILED
        with Urza(urza_copy, readonly=True) as urza:
            seen.append(len(urza.entries("other")))
        loads += 1
    finish(writer)
    assert [r.getMessage() for r in caplog.records if r.name == "esper.kasmina"] == []
    assert seen == sorted(seen) and seen[-1] == 150
    assert len(set(seen)) > 1, "the reader never overlapped the writer"
    print(f"\n{loads} Kasmina loads while the writer published {seen[-1]} entries")


@pytest.mark.compiles
def test_one_kernel_called_from_8_threads_gives_correct_outputs(compiled_urza: Path) -> None:
    kernel = Kasmina(compiled_urza, blueprint_paths=[TINY]).load("tiny_mlp")
    assert kernel.route == COMPILED
    ref = kernel.eager_module()
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, 8, generator=gen) for b in range(1, 33)]
    with torch.no_grad():
        wanted = [ref(x) for x in inputs]
    rounds, threads = 40, 8
    start_together = threading.Barrier(threads)
    failures: list[str] = []

    def work(t: int) -> None:
        start_together.wait()
        for r in range(rounds):
            k = (t * rounds + r) % len(inputs)
            with torch.no_grad():
                got = kernel(inputs[k])
            if got.shape != wanted[k].shape or not torch.allclose(got, wanted[k], atol=1e-5, rtol=1e-5):
                failures.append(f"thread {t} call {r} batch {k + 1}")

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert failures == []
    assert kernel.calls[COMPILED] > 0


@pytest.mark.compiles
def test_certify_under_xdist_two_workers(pytester: pytest.Pytester, urza_copy: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``pytest --certify -n 2``: each blueprint's module runs in one worker (the plugin forces loadfile),
    both workers write one Urza, and latency is measured although pytest-benchmark disables itself."""
    from tests.support import BROKEN

    pytester.makepyprojecttoml('[tool.esper]\nblueprint-paths = ["bps"]\n')
    bps = pytester.mkdir("bps")
    (bps / "tiny_mlp.py").write_text((TINY / "tiny_mlp.py").read_text())  # compiled already: reused, not recompiled
    (bps / "not_exportable.py").write_text((BROKEN / "not_exportable.py").read_text())  # a fallback, no compile
    (bps / "raises.py").write_text("raise ImportError('no such dependency')\n")
    (bps / "zz_duplicate.py").write_text((TINY / "tiny_mlp.py").read_text())  # declares tiny_mlp again
    monkeypatch.setenv("ESPER_URZA", str(urza_copy))
    with Urza(urza_copy, signer=None) as urza:
        (entry,) = urza.entries("tiny_mlp")
        urza.update(entry.id, status="compiled")  # type: ignore[arg-type]
    result = pytester.runpytest_subprocess(
        "--certify", "-n", "2", "-v", "-p", "no:cacheprovider", "--benchmark-max-time=0.02"
    )
    text = "\n".join(result.outlines + result.errlines)
    assert "database is locked" not in text
    result.stdout.fnmatch_lines(["*2 workers*"])
    workers: dict[str, set[str]] = {}
    for line in result.outlines:
        ran = re.match(r"\[(gw\d+)\].* (?:PASSED|FAILED|SKIPPED|ERROR) \S*/(test_certify_\w+\.py)::", line)
        if ran:
            workers.setdefault(ran.group(2), set()).add(ran.group(1))
    assert set(workers) >= {"test_certify_tiny_mlp.py", "test_certify_not_exportable.py"}
    assert all(len(w) == 1 for w in workers.values()), workers  # each module's checks in one process
    # A file raising on import and a duplicate name each fail by file name; the rest still certifies.
    result.stdout.fnmatch_lines(["*bps/raises.py: field 'file': raised on import: ImportError*"])
    result.stdout.fnmatch_lines(["*bps/zz_duplicate.py, blueprint 'tiny_mlp': field 'name'*already declared*"])
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] == 2 and outcomes["passed"] >= 8 and not outcomes.get("errors"), outcomes
    with Urza(urza_copy, readonly=True) as urza:
        assert verify(urza).ok
        tiny = urza.entries("tiny_mlp")
        (fallback,) = urza.entries("not_exportable")
    assert (fallback.engine, fallback.status) == ("eager", "fallback")
    compiled = [e for e in tiny if e.engine == "aoti"]
    assert len(compiled) == 1, "tiny_mlp was compiled again"
    certified = [e for e in tiny if e.status == "certified"]
    # Certified (compiled, or an eager route chosen by measurement) only if every check ran in one process.
    assert certified, (text[-3000:], [(e.id, e.engine, e.status, e.failure_reason) for e in tiny])
    latency = certified[0].performance["certify"]
    assert set(latency) == {"batch=4", "batch=16"}, latency
    # Certification's own interleaved measurement (esper.certification.timing.compare: at least 8 rounds), xdist or not.
    assert all(row["eager"]["p50_ms"] > 0 and row["eager"]["rounds"] >= 8 for row in latency.values()), latency
