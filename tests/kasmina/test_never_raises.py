"""Kasmina's load path never raises for what Urza holds: every OS and SQLite error on the way (a damaged
database, an unreadable or misshapen store) is one WARNING and an eager kernel that answers as the blueprint's
own module does; a refused row that leaves the kernel compiled says so, not "runs eager"."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from esper.catalog import load_catalog
from esper.kasmina import COMPILED, EAGER, Kasmina
from esper.numerics.inputs import example_inputs
from tests.support import CATALOG, TINY, TRAINING

X = torch.randn(4, 8)


def oracle(name: str = "tiny_mlp", folders: tuple[Path, ...] = (TINY,)) -> torch.nn.Module:
    return load_catalog(list(folders)).get(name).build().eval()


def artifact(db: Path) -> Path:
    return next(p for p in (db.parent / "objects").glob("??/*") if p.is_file())


def objects_is_a_file(db: Path) -> None:
    shutil.rmtree(db.parent / "objects")
    (db.parent / "objects").write_text("not a folder")


def fan_out_is_a_file(db: Path) -> None:
    folder = artifact(db).parent
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def artifact_symlink_loop(db: Path) -> None:
    path = artifact(db)
    path.unlink()
    path.symlink_to(path)


def page_one_overwritten(db: Path) -> None:
    with open(db, "r+b") as f:  # the header stays; the schema table on page 1 is garbage
        f.seek(100)
        f.write(b"\xff" * 2000)


def malformed_schema(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = 'CREATE TABLE entries(' WHERE name = 'entries'")
    conn.commit()
    conn.close()


def utf16_header(db: Path) -> None:
    with open(db, "r+b") as f:  # text encoding 2 (UTF-16le) in the header over UTF-8 text
        f.seek(56)
        f.write((2).to_bytes(4, "big"))


def database_symlink_loop(db: Path) -> None:
    db.unlink()
    (db.parent / "other").symlink_to(db)
    db.symlink_to(db.parent / "other")


DAMAGE: dict[str, Callable[[Path], None]] = {
    "objects-is-a-file": objects_is_a_file,
    "fan-out-is-a-file": fan_out_is_a_file,
    "artifact-symlink-loop": artifact_symlink_loop,
    "page-1-overwritten": page_one_overwritten,
    "malformed-sqlite-master": malformed_schema,
    "utf16-header": utf16_header,
    "database-symlink-loop": database_symlink_loop,
}


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_load_of_a_damaged_urza_is_eager_with_one_warning(
    damage: str, urza_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    DAMAGE[damage](urza_copy)
    kasmina = Kasmina(urza_copy, blueprint_paths=[TINY])
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = kasmina.load("tiny_mlp")
        seeds = kasmina.load_seeds("tiny_mlp")
    assert kernel.route == EAGER and seeds.route == EAGER
    assert len(warnings_of(caplog)) == 2, [r.getMessage() for r in warnings_of(caplog)]
    with torch.no_grad():
        torch.testing.assert_close(kernel(X), oracle()(X), rtol=0, atol=0)


def test_a_permission_error_anywhere_in_urza_is_eager(
    urza_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Simulated: these tests run as root, for whom permission bits deny nothing, so ``stat`` of every path
    under the Urza folder raises what a folder without search permission makes it raise."""
    real = Path.stat
    folder = urza_copy.parent

    def denied(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        if self.is_relative_to(folder) and self != folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "stat", denied)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    assert kernel.route == EAGER
    assert len(warnings_of(caplog)) == 1
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(kernel(X), oracle()(X), rtol=0, atol=0)


def test_a_permission_error_reading_an_artifact_is_eager(
    urza_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Simulated as above: the database opens, the artifact file cannot be read."""
    import builtins

    real = builtins.open
    store = urza_copy.parent / "objects"

    def denied(file: object, *args: object, **kwargs: object) -> object:
        if isinstance(file, str | Path) and Path(file).is_relative_to(store):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)  # type: ignore[call-overload]

    from esper.urza.store import forget_verified

    forget_verified()
    monkeypatch.setattr(builtins, "open", denied)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    monkeypatch.undo()
    assert kernel.route == EAGER
    assert [r.esper["reason"] for r in warnings_of(caplog)] == ["integrity"]  # type: ignore[attr-defined]


@pytest.fixture
def training_copy(training_urza: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "training"
    shutil.copytree(training_urza.parent, dest)
    return dest / "urza.db"


@pytest.mark.parametrize("damage", ["objects-is-a-file", "malformed-sqlite-master", "utf16-header"])
def test_load_training_of_a_damaged_urza_is_eager(
    damage: str, training_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    DAMAGE[damage](training_copy)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = Kasmina(training_copy, blueprint_paths=[TRAINING, CATALOG]).load_training("lora_adapter")
    assert kernel.route == EAGER
    assert len(warnings_of(caplog)) == 1
    bp = load_catalog([CATALOG]).get("lora_adapter")
    args = example_inputs(bp, bp.representative[0])
    with torch.no_grad():
        torch.testing.assert_close(kernel.eval()(*args), oracle("lora_adapter", (CATALOG,))(*args), rtol=0, atol=0)


def test_a_deferred_route_whose_store_breaks_after_load_runs_eager(
    urza_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first-call load path: a route verified on first use finds ``objects/`` replaced by a file."""
    from esper.urza.store import forget_verified
    from tests.kasmina.test_first_use import two_routes

    two_routes(urza_copy)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    objects_is_a_file(urza_copy)
    forget_verified()
    x = torch.randn(8, 8)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"), torch.no_grad():
        y = kernel(x)
    assert kernel.last_path == EAGER and len(warnings_of(caplog)) == 1
    torch.testing.assert_close(y, oracle()(x), rtol=0, atol=0)


def undecodable(db: Path, entry_id: int, column: str) -> None:
    """Store bytes that are not UTF-8 as the text of ``column`` of row ``entry_id``."""
    conn = sqlite3.connect(db)
    conn.execute(f"UPDATE entries SET {column} = CAST(? AS TEXT) WHERE id = ?", [b"A\xffB", entry_id])
    conn.commit()
    conn.close()


def test_a_refused_certified_row_names_its_profile_instead_of_blaming_the_input(
    urza_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.kasmina.test_first_use import two_routes

    small, big = two_routes(urza_copy)
    undecodable(urza_copy, big.id, "failure_reason")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
        assert kernel.route == COMPILED
        (load,) = warnings_of(caplog)
        assert "runs eager" not in load.getMessage()
        assert f"entry #{small.id}" in load.getMessage() and "'batch=5-32'" in load.getMessage()
        caplog.clear()
        x = torch.randn(8, 8)
        with torch.no_grad():
            y = kernel(x)
        (call,) = warnings_of(caplog)
    assert kernel.last_path == EAGER
    assert f"profile 'batch=5-32': entry #{big.id} refused" in call.getMessage()
    torch.testing.assert_close(y, oracle()(x), rtol=0, atol=0)


def test_a_refused_rejected_row_does_not_say_runs_eager(
    urza_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tampered rejected row changes nothing about what runs: the WARNING says it was refused and that
    the kernel runs compiled."""
    from esper.artifacts.signing import Signer, generate_keypair
    from esper.urza import Urza

    pair = generate_keypair(tmp_path / "keys")
    with Urza(urza_copy, signer=Signer.from_file(pair.private)) as urza:
        (entry,) = urza.entries("tiny_mlp")
        urza.update(entry.id)  # type: ignore[arg-type]  # signed
        rejected = urza.publish(entry.with_(status="rejected", failure_reason="slower than eager", id=None))
    conn = sqlite3.connect(urza_copy)
    conn.execute("UPDATE entries SET failure_reason = 'tampered' WHERE id = ?", [rejected.id])
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = Kasmina(urza_copy, blueprint_paths=[TINY], public_key=pair.public).load("tiny_mlp")
    assert kernel.route == COMPILED
    (record,) = warnings_of(caplog)
    message = record.getMessage()
    assert "runs eager" not in message
    assert "refused (signature)" in message and f"runs compiled: entry #{entry.id}" in message
