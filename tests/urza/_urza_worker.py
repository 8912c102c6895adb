"""A writer process for the reliability tests: publishes (and updates) Urza entries in a loop.

Modes (argv[1]):
  publish URZA TAG COUNT SIZE       publish COUNT entries of blueprint TAG (artifacts of SIZE random bytes),
                                    each then updated to ``certified``; prints "<id> <checksum>" per commit
  update URZA ID FIELD COUNT        COUNT read-modify-write updates of one entry's FIELD (meta or parity)
  zygote URZA TAG SIZE              import everything once, then fork one ``publish`` child per
                                    ``run LOG [COUNT]`` line on stdin (printing its pid), reap one per ``reap PID``

A ``--go FILE`` last argument makes the process wait until FILE exists, so several start writing at once.
The zygote exists so that a kill loop pays Python's and torch's import time once, not once per kill.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from esper.artifacts.compat import current
from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.urza import Entry, Urza

POOL = 8
MAX_UNKILLED = 2000  # publishes an unkilled zygote child makes before it stops by itself
GUARDS = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=4), DimGuard(size=8))),))


def publish(urza_path: Path, tag: str, count: int, size: int, out: TextIO, scratch: Path) -> None:
    pool = random.Random()
    with Urza(urza_path) as urza:
        n = 0
        while n < count:
            src = scratch / f"{tag}-{os.getpid()}-{n}.bin"
            # One publish in four reuses content from a small pool (the store already has it, as when
            # Tezzeret reuses an artifact); the others store a new file.
            reuse = pool.random() < 0.25
            src.write_bytes(random.Random(pool.randrange(POOL)).randbytes(size) if reuse else os.urandom(size))
            checksum, length = urza.store.add(src)
            src.unlink()
            entry = urza.publish(
                Entry(tag, 1, f"{n:064x}", current(), "aoti", "compiled", checksum, length, GUARDS, meta={"n": n})
            )
            out.write(f"{entry.id} {checksum}\n")
            out.flush()
            urza.update(entry.id, status="certified")  # type: ignore[arg-type]
            n += 1


def update(urza_path: Path, entry_id: int, field: str, count: int) -> None:
    with Urza(urza_path) as urza:
        for n in range(1, count + 1):
            urza.update(entry_id, **{field: {"writer": field, "n": n}})


def zygote(urza_path: Path, tag: str, size: int, scratch: Path) -> None:
    """``run LOG [COUNT]``: fork a publisher logging to LOG, print its pid. ``reap PID``: wait for it to end,
    print how (so the caller knows nothing of it still runs).

    A publisher without COUNT runs until killed, but never outlives the zygote (it gets SIGKILL when the
    zygote dies) and stops by itself after ``MAX_UNKILLED`` publishes, so a test that fails
    before its kill cannot leave a process filling the disk.
    """
    live: set[int] = set()
    try:
        for line in sys.stdin:
            command, arg, *count = line.split()
            if command == "reap":
                _, status = os.waitpid(int(arg), 0)
                live.discard(int(arg))
                print(f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {status >> 8}", flush=True)
                continue
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    _die_with_parent()
                    with open(arg, "w") as out:
                        publish(urza_path, tag, int(count[0]) if count else MAX_UNKILLED, size, out, scratch)
                    code = 0
                finally:
                    os._exit(code)
            live.add(pid)
            print(pid, flush=True)
    finally:
        for pid in live:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent (the zygote) dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the zygote died before prctl took effect
        os._exit(1)


def main(argv: list[str]) -> None:
    if "--go" in argv:
        go = Path(argv[argv.index("--go") + 1])
        argv = argv[: argv.index("--go")]
        deadline = time.monotonic() + 120  # a test that failed before starting us must not leave us waiting
        while not go.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"{go} never appeared")
            time.sleep(0.005)
    mode, urza_path = argv[1], Path(argv[2])
    scratch = urza_path.parent / "scratch"
    scratch.mkdir(exist_ok=True)
    if mode == "publish":
        publish(urza_path, argv[3], int(argv[4]), int(argv[5]), sys.stdout, scratch)
    elif mode == "update":
        update(urza_path, int(argv[3]), argv[4], int(argv[5]))
    elif mode == "zygote":
        import esper.artifacts.signing  # noqa: F401  (what a child's Urza() would import: pay for it once, here)

        current()
        print("ready", flush=True)
        zygote(urza_path, argv[3], int(argv[4]), scratch)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
