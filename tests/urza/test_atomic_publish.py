"""Publishes cannot half-happen: a writer killed with SIGKILL at random points leaves every row with a whole,
matching artifact, every commit it reported intact, and only leftovers that readers ignore and gc removes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from esper.cli import cli
from esper.urza import Urza
from esper.urza.maintenance import verify

WORKER = Path(__file__).parent / "_urza_worker.py"
KILLS = 40
ARTIFACT_BYTES = 64 * 1024


def committed_by(log: Path) -> dict[int, str]:
    """The commits a killed writer reported (a line is written only after its row committed)."""
    out: dict[int, str] = {}
    if not log.exists():  # killed before it opened its log
        return out
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[1]) == 64:  # the last line may be cut by the kill
            out[int(parts[0])] = parts[1]
    return out


def check(urza_path: Path, committed: dict[int, str]) -> tuple[int, int]:
    """Every row verifies and every reported commit is there; returns (leftover files, unreferenced files)."""
    with Urza(urza_path, readonly=True) as urza:  # as a reader would, before any writer repairs anything
        rows = {e.id: e for e in urza.entries()}
        report = verify(urza)
    assert report.ok, report.problems
    missing = {i: c for i, c in committed.items() if i not in rows or rows[i].checksum != c}
    assert missing == {}
    return len(report.leftovers), len(report.unreferenced)


def test_writer_killed_at_random_points_loses_nothing(tmp_path: Path) -> None:
    urza_path = tmp_path / "urza.db"
    Urza(urza_path, signer=None).close()
    rng = random.Random(6)
    zygote = subprocess.Popen(
        [sys.executable, str(WORKER), "zygote", str(urza_path), "killed", str(ARTIFACT_BYTES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "ESPER_SIGNING_KEY": ""},
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    committed: dict[int, str] = {}
    seen = {"mid-write (temp file left)": 0, "artifact stored, row not committed": 0, "between writes": 0}
    leftovers = unreferenced = 0
    try:
        assert zygote.stdout.readline().strip() == "ready"

        def order(command: str) -> str:
            zygote.stdin.write(command + "\n")  # type: ignore[union-attr]
            zygote.stdin.flush()  # type: ignore[union-attr]
            return zygote.stdout.readline().strip()  # type: ignore[union-attr]

        for k in range(KILLS):
            log = tmp_path / f"kill-{k}.log"
            pid = int(order(f"run {log}"))
            # The random kill point: anywhere in the first few publishes of this process (the sleep is what
            # lets the writer run; nothing waits on it for synchronisation).
            time.sleep(rng.uniform(0.0, 0.12))
            os.kill(pid, signal.SIGKILL)
            assert order(f"reap {pid}") == f"signal {signal.SIGKILL}"
            committed.update(committed_by(log))
            now_leftovers, now_unreferenced = check(urza_path, committed)
            if now_leftovers > leftovers:
                seen["mid-write (temp file left)"] += 1
            elif now_unreferenced > unreferenced:
                seen["artifact stored, row not committed"] += 1
            else:
                seen["between writes"] += 1
            leftovers, unreferenced = now_leftovers, now_unreferenced
        print(f"\n{KILLS} kills, {len(committed)} reported commits, none lost; kill points: {seen}")
        assert len(committed) >= KILLS // 4, "the writer hardly ever committed: the kill points are all too early"

        # A later writer ignores the leftovers and publishes normally ...
        later = tmp_path / "later.log"
        assert order(f"reap {order(f'run {later} 3')}") == "exit 0"
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
        zygote.stdout.close()
    published = committed_by(later)
    assert len(published) == 3
    with Urza(urza_path, readonly=True) as urza:
        assert all(urza.get(i).status == "certified" for i in published)
    # ... and gc removes them, leaving every row whole.
    gc = CliRunner().invoke(cli, ["urza", "gc", "--grace", "0", "--urza", str(urza_path)])
    assert gc.exit_code == 0, gc.output
    assert check(urza_path, committed | published) == (0, 0)
