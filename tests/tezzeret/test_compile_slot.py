"""An autotuning compile runs alone; other compiles run side by side (esper.tezzeret.aoti.compile_slot), and so
does the work of a process that holds the slot through a Slot."""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import ReadWriteLock, Timeout

from esper.artifacts import variants
from esper.tezzeret.aoti import LOCK_NAME, Slot, autotunes, compile_slot


def probe(folder: Path, mode: str) -> bool:
    """Whether another process's compile could take its slot now (``mode``: read or write), without waiting."""
    lock = ReadWriteLock(folder / LOCK_NAME, is_singleton=False)
    try:
        (lock.acquire_read if mode == "read" else lock.acquire_write)(blocking=False)
    except Timeout:
        return False
    else:
        lock.release()
        return True
    finally:
        lock.close()


def test_which_settings_autotune() -> None:
    assert autotunes(variants.get("freezing_autotune_cpp").settings)
    assert not autotunes(variants.get("default").settings)
    assert not autotunes(variants.get("freezing").settings)
    assert not autotunes({"max_autotune": False})
    assert not autotunes(None)


def test_an_autotuning_compile_holds_every_other_compile_off(tmp_path: Path) -> None:
    with compile_slot({"max_autotune": True}, tmp_path):
        assert not probe(tmp_path, "read")
        assert not probe(tmp_path, "write")
    assert probe(tmp_path, "write")


def test_a_slot_holds_compiles_as_asked(tmp_path: Path) -> None:
    """The certification's process: shared while it checks (a plain compile goes ahead, an autotuning one
    waits), exclusive while it times (no compile starts), nothing while it waits for a worker."""
    slot = Slot(tmp_path)
    slot.hold(False)
    assert probe(tmp_path, "read") and not probe(tmp_path, "write")
    slot.hold(True)
    assert not probe(tmp_path, "read") and not probe(tmp_path, "write")
    slot.hold(None)
    assert probe(tmp_path, "write") and slot.exclusive is None


def test_plain_compiles_share_and_hold_an_autotuning_one_off(tmp_path: Path) -> None:
    with compile_slot({"freezing": True}, tmp_path):
        assert probe(tmp_path, "read")  # the seeded twin: a plain compile beside it goes ahead
        assert not probe(tmp_path, "write")
    assert probe(tmp_path, "write")


def test_a_failed_compile_releases_its_slot(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), compile_slot({"max_autotune": True}, tmp_path):
        raise RuntimeError("lowering failed")
    assert probe(tmp_path, "write")


def test_a_folder_the_lock_cannot_live_in_costs_the_ordering_not_the_compile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    ran = False
    with compile_slot({"max_autotune": True}, taken):
        ran = True
    assert ran
    assert "without a compile slot" in caplog.text


def test_a_slot_asked_for_inside_one_is_the_outer_one(tmp_path: Path) -> None:
    """Tezzeret holds a slot around a whole compile and the package build inside it asks again: the inner one
    must not wait for the outer (a deadlock), nor release it."""
    with compile_slot({"max_autotune": True}, tmp_path):
        with compile_slot({"max_autotune": True}, tmp_path), compile_slot({"freezing": True}, tmp_path):
            assert not probe(tmp_path, "read")
        assert not probe(tmp_path, "read"), "the inner slot released the outer one"
    assert probe(tmp_path, "write")


def test_tezzeret_holds_the_slot_around_the_whole_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only Inductor's part: an autotuning compile's export, pre-warm and timings run alone too (a second
    worker's work beside its kernel timings picks a slower kernel); a plain compile's run beside others."""
    from esper.catalog import load_file
    from esper.tezzeret.compiler import Tezzeret
    from esper.tezzeret.inference import InferencePipeline
    from esper.urza import Urza
    from tests.support import TINY

    cache = tmp_path / "inductor"
    cache.mkdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    seen: dict[str, tuple[bool, bool]] = {}

    def run(self: InferencePipeline, job: object) -> None:
        seen[job.variant.name] = (probe(cache, "read"), probe(cache, "write"))  # type: ignore[attr-defined]
        raise RuntimeError("stop before compiling")

    monkeypatch.setattr(InferencePipeline, "run", run)
    [bp] = [b for b in load_file(TINY / "tiny_mlp.py") if b.name == "tiny_mlp"]
    with Urza(tmp_path / "urza.db") as urza:
        for name in ("freezing_autotune_cpp", "default"):
            with pytest.raises(RuntimeError, match="stop before compiling"):
                Tezzeret(urza).compile(bp, variant=variants.get(name))
    assert seen == {"freezing_autotune_cpp": (False, False), "default": (True, False)}
    assert probe(cache, "write")
