"""Loaded packages leave nothing on disk, whatever way their process ends.

torch's C++ loader extracts each package into ``$TMPDIR/aotinductor_*`` and only its destructor removes it;
Esper extracts into per-process folders of its own and sweeps those of dead processes at the next load. Every
process here runs with a private ``TMPDIR``, so other test runs on the machine cannot change the counts.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from esper.artifacts import extraction
from esper.artifacts.runtime import CompiledPackage
from esper.catalog import load_catalog
from esper.kasmina import COMPILED
from esper.urza import Urza
from tests.support import TINY

pytestmark = pytest.mark.compiles

X = torch.arange(32, dtype=torch.float32).reshape(4, 8) / 10

# A process holding a loaded kernel: it prints its pid and output once loaded, then obeys stdin ("call"
# prints the output again; "exit" ends normally; "os_exit" ends without exit handlers) or waits for a signal.
HOLDER = textwrap.dedent("""
    import json, os, sys, torch
    from esper.kasmina import Kasmina

    kernel = Kasmina(sys.argv[1], blueprint_paths=[sys.argv[2]]).load("tiny_mlp")
    x = torch.arange(32, dtype=torch.float32).reshape(4, 8) / 10

    def report():
        y = kernel(x)
        print(json.dumps({"pid": os.getpid(), "path": kernel.last_path, "y": y.tolist()}), flush=True)

    report()
    for line in sys.stdin:
        command = line.strip()
        if command == "call":
            report()
        elif command == "exit":
            sys.exit(0)
        elif command == "os_exit":
            os._exit(0)
""")


def oracle() -> torch.Tensor:
    return load_catalog([TINY]).get("tiny_mlp").build()(X).detach()


def left_behind(tmp: Path) -> list[Path]:
    """Every extraction folder under ``tmp``: the C++ loader's own and Esper's per-process ones."""
    ours = tmp / f"esper-aoti-{os.geteuid()}"
    return sorted(tmp.glob("aotinductor_*")) + (sorted(p for p in ours.iterdir()) if ours.is_dir() else [])


class Holder:
    def __init__(self, urza: Path, tmp: Path):
        env = {**os.environ, "TMPDIR": str(tmp)}
        env.pop(extraction.EXTRACT_DIR_ENV, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(urza), str(TINY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.first = self.read()

    def read(self) -> dict:  # type: ignore[type-arg]
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"holder ended early (rc {self.proc.wait(timeout=60)})"
        return json.loads(line)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def end(self, how: str) -> int:
        if how in ("exit", "os_exit"):
            self.send(how)
        else:
            self.proc.send_signal({"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[how])
        rc = self.proc.wait(timeout=60)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        return rc


@pytest.fixture
def private_tmp(tmp_path: Path) -> Path:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return tmp


def test_a_sigkilled_process_folder_is_swept_by_the_next_start_and_a_live_one_never(
    compiled_urza: Path, private_tmp: Path
) -> None:
    expected = oracle()
    killed = Holder(compiled_urza, private_tmp)
    assert killed.first["path"] == COMPILED
    assert killed.end("sigkill") == -signal.SIGKILL
    assert left_behind(private_tmp), "a killed process cannot clean up: its folder stays until the next start"

    live = Holder(compiled_urza, private_tmp)
    mine = left_behind(private_tmp)
    assert len(mine) == 1 and str(live.first["pid"]) in mine[0].name, mine  # the dead one is gone

    # Another process starts (and sweeps) and ends normally while the first is alive: the live folder stays,
    # and the live process still serves the right answer from it.
    other = Holder(compiled_urza, private_tmp)
    assert other.end("exit") == 0
    assert left_behind(private_tmp) == mine
    live.send("call")
    again = live.read()
    assert again["path"] == COMPILED
    torch.testing.assert_close(torch.tensor(again["y"]), expected)
    assert live.end("exit") == 0
    assert left_behind(private_tmp) == []


@pytest.mark.parametrize("how", ["sigterm", "os_exit"])
def test_a_process_ended_without_exit_handlers_leaves_nothing_once_the_next_starts(
    compiled_urza: Path, private_tmp: Path, how: str
) -> None:
    """SIGTERM's default action and ``os._exit`` (a compile worker's end) run no destructor and no exit
    handler: the next process that loads a package sweeps what they left."""
    ended = Holder(compiled_urza, private_tmp)
    assert ended.first["path"] == COMPILED
    ended.end(how)
    nxt = Holder(compiled_urza, private_tmp)
    torch.testing.assert_close(torch.tensor(nxt.first["y"]), oracle())
    assert nxt.end("exit") == 0
    assert left_behind(private_tmp) == []


def test_sweep_tells_dead_folders_from_live_ones_by_their_lock_not_their_pid(tmp_path: Path) -> None:
    """A reused pid must neither keep a dead process's folder nor expose a live one: only the lock counts."""
    base = tmp_path / "base"
    base.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, alive_pid = int(gone.stdout), os.getpid()

    def folder(name: str, hold: bool = False) -> tuple[Path, int | None]:
        path = base / name
        (path / "pkg-x").mkdir(parents=True)
        (path / "pkg-x" / "model.so").write_bytes(b"\0" * 64)
        if name.startswith("."):
            return path, None
        fd = os.open(path / extraction.LOCK, os.O_RDWR | os.O_CREAT)
        if hold:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return path, fd
        os.close(fd)
        return path, None

    live, fd = folder(f"{dead_pid}-live", hold=True)  # a live owner, whatever its pid now names
    reused, _ = folder(f"{alive_pid}-reused")  # its pid is alive again, but nobody holds the lock
    dead, _ = folder(f"{dead_pid}-dead")
    creating_live, _ = folder(f".{alive_pid}-creating")  # being created by a live process
    creating_dead, _ = folder(f".{dead_pid}-creating")
    trash, _ = folder(".trash-abc")  # a sweep killed half-way
    (base / "not-ours").mkdir()
    try:
        removed = extraction.sweep(base)
        assert sorted(removed) == sorted([reused, dead, creating_dead, trash])
        assert sorted(p.name for p in base.iterdir()) == sorted([live.name, creating_live.name, "not-ours"])
        assert (live / "pkg-x" / "model.so").exists()
    finally:
        assert fd is not None
        os.close(fd)
    assert extraction.sweep(base) == [live]  # its owner is gone now


def test_a_collected_package_removes_its_folder(compiled_urza: Path) -> None:
    with Urza(compiled_urza, readonly=True) as urza:
        (entry,) = urza.entries("tiny_mlp")
        path = urza.store.verify(entry.checksum, entry.artifact_size)
    folder = extraction.process_folder()
    before = set(folder.iterdir())
    package = CompiledPackage(path)
    (extracted,) = set(folder.iterdir()) - before
    torch.testing.assert_close(package([X]), oracle())
    del package
    assert not extracted.exists()
    assert set(folder.iterdir()) == before


def test_certification_leaves_no_extraction_folders(
    pytester: pytest.Pytester, tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole ``pytest --certify`` run (its own process and its compile worker) leaves nothing behind."""
    pytester.makepyprojecttoml('[tool.esper]\nblueprint-paths = ["bps"]\n')
    bps = pytester.mkdir("bps")
    (bps / "tiny_mlp.py").write_text((TINY / "tiny_mlp.py").read_text())
    monkeypatch.setenv("ESPER_URZA", str(tmp_path / "urza" / "urza.db"))
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.delenv(extraction.EXTRACT_DIR_ENV, raising=False)
    assert left_behind(private_tmp) == []
    result = pytester.runpytest_subprocess(
        "--certify",
        "--benchmark-max-time=0.02",
        "--benchmark-min-rounds=3",
        "--benchmark-warmup=off",
        "-p",
        "no:cacheprovider",
    )
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert left_behind(private_tmp) == []
    with Urza(tmp_path / "urza" / "urza.db", readonly=True) as urza:
        assert any(e.engine == "aoti" for e in urza.entries("tiny_mlp"))  # packages were compiled and loaded


def test_a_compile_worker_orphaned_by_a_killed_certification_removes_its_folder_itself(
    compiled_urza: Path, private_tmp: Path
) -> None:
    """The worker ends itself with ``os._exit`` once its certification is gone: it removes what it extracted
    first, so nothing waits for a next start."""
    with Urza(compiled_urza, readonly=True) as urza:
        (entry,) = urza.entries("tiny_mlp")
        package = urza.store.verify(entry.checksum, entry.artifact_size)
    worker = (
        "import os, sys, torch; from esper.certification.compile_ahead import exit_with_parent; "
        "from esper.artifacts.runtime import CompiledPackage; "
        f"p = CompiledPackage({str(package)!r}); p([torch.ones(2, 8)]); "
        "exit_with_parent(os.getppid(), poll=0.05); print(os.getpid(), flush=True); import time; time.sleep(60)"
    )
    certification = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"
    )
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    env.pop(extraction.EXTRACT_DIR_ENV, None)
    proc = subprocess.Popen([sys.executable, "-c", certification], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip().isdigit()  # the worker has loaded its package
    assert left_behind(private_tmp)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.stdout.read() == ""  # end of file: the worker, which shares the pipe, has ended too
    proc.stdout.close()
    assert left_behind(private_tmp) == []
