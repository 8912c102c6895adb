"""Fleets: ``esper urza merge SRC... --into DEST`` (esper/urza/merge.py) merges Urza libraries, one per
machine class, into one: signatures verified on the way in, artifacts copied content-addressed and verified,
duplicates skipped, a conflict (two certified artifacts for one identity) reported and never overwritten; the
merged library verifies, exports and loads in Kasmina like any other."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from esper.artifacts import signing
from esper.artifacts.compat import CompatKey, current
from esper.cli import cli
from esper.urza import Urza, UrzaError
from esper.urza.maintenance import export, sign_all, verify
from esper.urza.merge import identity, merge
from tests.support import TINY, make_entry

OTHER_CLASS = CompatKey("2.13.0", "linux-x86_64", "AVX512", "cpu")  # another CI runner's machine class


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> signing.KeyPair:
    return signing.generate_keypair(tmp_path_factory.mktemp("keys") / "ci")


def library(folder: Path, *entries: dict[str, object], signer: signing.Signer | None = None) -> Path:
    """An Urza in ``folder`` holding one entry per dict of ``make_entry`` fields (name, content, status...)."""
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "urza.db"
    with Urza(db, signer=signer) as urza:
        for fields in entries:
            make_entry(urza, folder, **fields)  # type: ignore[arg-type]
    return db


def rows(db: Path) -> list[tuple[str, str, str, str | None]]:
    with Urza(db, readonly=True) as urza:
        return [(e.blueprint, e.compat.isa, e.checksum, e.signature) for e in reversed(urza.entries())]


def test_merge_two_machine_classes_keeps_signatures_and_is_idempotent(tmp_path: Path, keys: signing.KeyPair) -> None:
    signer = signing.Signer.from_file(keys.private)
    a = library(tmp_path / "a", {"name": "mlp", "content": b"avx2 code", "status": "certified"}, signer=signer)
    b = library(
        tmp_path / "b",
        {"name": "mlp", "content": b"avx512 code", "status": "certified", "compat": OTHER_CLASS},
        {"name": "conv", "content": b"conv code", "status": "rejected", "compat": OTHER_CLASS},
        signer=signer,
    )
    dest = tmp_path / "fleet" / "urza.db"
    result = CliRunner().invoke(
        cli, ["urza", "merge", str(a), str(b), "--into", str(dest), "--public-key", str(keys.public)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        f"merged into {dest}: 3 entries added, 0 duplicate(s) skipped, 3 artifact file(s) copied, 0 refused, "
        "0 conflict(s)"
    )
    merged = rows(dest)
    assert merged == rows(a) + rows(b)  # same content and signatures, in source order
    with Urza(dest, readonly=True) as urza:
        report = verify(urza, signing.Verifier.from_file(keys.public))
        assert report.ok, report.lines()
    again = merge([a, b, dest.parent / "urza.db"], tmp_path / "fleet" / "copy.db")
    assert (again.added, again.duplicates) == (3, 3)  # the merged library adds nothing new
    twice = merge([a, b], dest)
    assert (twice.added, twice.duplicates, twice.artifacts, twice.ok) == (0, 3, 0, True)
    assert rows(dest) == merged


def test_a_conflict_is_reported_and_never_overwrites(tmp_path: Path) -> None:
    a = library(tmp_path / "a", {"name": "mlp", "content": b"runner 1 code", "status": "certified"})
    b = library(
        tmp_path / "b",
        {"name": "mlp", "content": b"runner 2 code", "status": "certified"},  # same identity, other artifact
        {"name": "swiglu", "content": b"swiglu code", "status": "certified"},
    )
    with Urza(a, readonly=True) as ua, Urza(b, readonly=True) as ub:
        assert identity(ua.entries("mlp")[0]) == identity(ub.entries("mlp")[0])
    dest = tmp_path / "fleet.db"
    result = CliRunner().invoke(cli, ["urza", "merge", str(a), str(b), "--into", str(dest)])
    assert result.exit_code == 1, result.output
    (conflict,) = [line for line in result.output.splitlines() if line.startswith("CONFLICT ")]
    assert f"{b} entry #1 (mlp) is certified with artifact" in conflict and "kept the latter, not merged" in conflict
    assert "signatures not checked" in result.output
    assert [(name, checksum) for name, _, checksum, _ in rows(dest)] == [
        ("mlp", rows(a)[0][2]),  # the first source's artifact stays
        ("swiglu", rows(b)[1][2]),  # the rest of the conflicting source is merged
    ]
    # Merging again into the merged library conflicts again: dest's rows are never overwritten.
    assert not merge([b], dest).ok and rows(dest)[0][2] == rows(a)[0][2]


def test_a_source_s_own_history_is_no_conflict(tmp_path: Path) -> None:
    """A recompile (--force) recertified inside one source: Kasmina uses its newest, so both come along."""
    a = library(
        tmp_path / "a",
        {"name": "mlp", "content": b"first build", "status": "certified"},
        {"name": "mlp", "content": b"second build", "status": "certified"},
    )
    report = merge([a], tmp_path / "fleet.db")
    assert report.ok and report.added == 2


def test_unsigned_tampered_unreadable_and_damaged_rows_are_refused(tmp_path: Path, keys: signing.KeyPair) -> None:
    signer = signing.Signer.from_file(keys.private)
    a = library(
        tmp_path / "a",
        {"name": "good", "content": b"good code", "status": "certified"},
        {"name": "tampered", "content": b"tampered code", "status": "rejected"},
        {"name": "damaged", "content": b"damaged code", "status": "certified"},
        {"name": "badmeta", "content": b"badmeta code", "status": "certified"},
        signer=signer,
    )
    library(tmp_path / "a", {"name": "unsigned", "content": b"unsigned code", "status": "certified"})
    conn = sqlite3.connect(a)
    with conn:
        conn.execute("UPDATE entries SET status = 'certified' WHERE blueprint = 'tampered'")
        conn.execute("UPDATE entries SET meta = '{\"profiles\": 5}' WHERE blueprint = 'badmeta'")
    conn.close()
    with Urza(a, readonly=True) as urza:
        damaged = urza.store.path_for(urza.entries("damaged")[0].checksum)
    damaged.chmod(0o644)
    damaged.write_bytes(b"X" * len(b"damaged code"))
    dest = tmp_path / "fleet.db"
    report = merge([a], dest, verifier=signing.Verifier.from_file(keys.public))
    assert not report.ok and report.added == 1
    text = "\n".join(report.refused)
    assert "(tampered): signature: signature by key" in text and "does not match the entry" in text
    assert "(unsigned): signature: entry is not signed" in text
    assert "(damaged): artifact" in text and "checksum mismatch" in text
    assert "(badmeta): signature" in text  # an unsigned change to meta breaks the signature first
    assert [r[0] for r in rows(dest)] == ["good"]
    # Without a key nothing is about signatures, and what Kasmina could not act on is still refused.
    unsigned = merge([a], tmp_path / "unsigned.db")
    names = {line.split("(")[1].split(")")[0] for line in unsigned.refused}
    assert names == {"damaged", "badmeta"} and unsigned.added == 3


def test_bad_sources_are_clean_errors(tmp_path: Path) -> None:
    a = library(tmp_path / "a", {"name": "mlp", "status": "certified"})
    runner = CliRunner()
    itself = runner.invoke(cli, ["urza", "merge", str(a), "--into", str(a)])
    assert itself.exit_code == 1 and "is the destination itself" in itself.output
    missing = runner.invoke(cli, ["urza", "merge", str(tmp_path / "nope.db"), "--into", str(tmp_path / "d.db")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    junk = runner.invoke(cli, ["urza", "merge", str(tmp_path / "junk.db"), "--into", str(tmp_path / "d.db")])
    assert junk.exit_code == 1 and "not a usable Urza database" in junk.output and "Traceback" not in junk.output
    empty_key = runner.invoke(
        cli, ["urza", "merge", str(a), "--into", str(tmp_path / "d.db")], env={"ESPER_PUBLIC_KEY": ""}
    )
    assert empty_key.exit_code == 1 and "empty" in empty_key.output
    with pytest.raises(UrzaError, match="nothing to merge"):
        merge([], tmp_path / "d.db")


@pytest.mark.compiles
def test_a_merged_library_exports_and_loads_in_kasmina(
    urza_copy: Path, tmp_path: Path, keys: signing.KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    from esper.kasmina import COMPILED, Kasmina

    signer = signing.Signer.from_file(keys.private)
    with Urza(urza_copy, signer=signer) as urza:
        sign_all(urza)
        (tiny,) = urza.entries("tiny_mlp")
    other = tmp_path / "other"
    other.mkdir()
    with Urza(other / "urza.db", signer=signer) as urza:  # the same blueprint certified on another machine class
        make_entry(urza, other, name="tiny_mlp", content=b"avx512 package", status="certified", compat=OTHER_CLASS)
    report = merge([other / "urza.db", urza_copy], tmp_path / "fleet" / "urza.db", verifier=signer.verifier())
    assert report.ok and report.added == 2, report.lines()
    with Urza(tmp_path / "fleet" / "urza.db", readonly=True) as urza:
        export(urza, tmp_path / "snap")
    caplog.set_level(logging.INFO, logger="esper.kasmina")
    kasmina = Kasmina(tmp_path / "snap" / "urza.db", blueprint_paths=[TINY], public_key=keys.public)
    kernel = kasmina.load("tiny_mlp")
    assert kernel.route == COMPILED, kernel.reason
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), kernel.eager_module()(x), atol=1e-5, rtol=1e-5)
    assert tiny.compat == current() and replace(tiny.compat, isa="AVX512") != tiny.compat
