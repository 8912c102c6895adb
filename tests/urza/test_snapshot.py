"""Rollback: every exported snapshot carries a signed, increasing version (esper/urza/snapshot.py), and
Kasmina configured with a minimum version refuses an older signed snapshot put back in place, eagerly and with
one WARNING ``rollback``, never an exception."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from esper.artifacts import signing
from esper.cli import cli
from esper.urza import Urza, UrzaError
from esper.urza import snapshot as snap
from esper.urza.maintenance import export, sign_all
from esper.urza.snapshot import SnapshotError, check
from tests.support import TINY, make_entry


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> signing.KeyPair:
    return signing.generate_keypair(tmp_path_factory.mktemp("keys") / "ci")


def put_back(old: Path, live: Path) -> None:
    """What an attacker (or a careless restore) does: the older snapshot folder replaces the live one."""
    shutil.rmtree(live)
    shutil.copytree(old, live)


def manifest(folder: Path) -> dict[str, object]:
    return json.loads((folder / snap.MANIFEST).read_text())


def writable(folder: Path) -> None:
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def test_versions_increase_are_signed_and_bound_to_the_rows(tmp_path: Path, keys: signing.KeyPair) -> None:
    signer = signing.Signer.from_file(keys.private)
    verifier = signer.verifier()
    db = tmp_path / "ci" / "urza.db"
    db.parent.mkdir()
    with Urza(db, signer=signer) as urza:
        make_entry(urza, db.parent, name="mlp", status="certified")
        v1 = export(urza, tmp_path / "v1")
        make_entry(urza, db.parent, name="conv", content=b"conv code", status="certified")
    with Urza(db, readonly=True) as urza:  # numbering works from a read-only handle too
        v2 = export(urza, tmp_path / "v2", signer=signer)
    assert (v1.version, v1.signed, v2.version, v2.signed) == (1, True, 2, True)
    assert manifest(tmp_path / "v2")["format"] == "esper-snapshot/1"
    assert oct((tmp_path / "v2" / snap.MANIFEST).stat().st_mode & 0o777) == oct(0o444)
    with Urza(tmp_path / "v2" / "urza.db", readonly=True) as urza:
        assert check(urza, verifier, 2).version == 2
    live = tmp_path / "live"
    shutil.copytree(tmp_path / "v2", live)
    put_back(tmp_path / "v1", live)
    with Urza(live / "urza.db", readonly=True) as urza:
        with pytest.raises(SnapshotError, match=r"snapshot version 1 is older than the minimum accepted, 2"):
            check(urza, verifier, 2)
        assert check(urza, verifier, 1).version == 1
        with pytest.raises(SnapshotError, match="needs a public key"):
            check(urza, None, 1)
        other = signing.generate_keypair(tmp_path / "other")
        with pytest.raises(SnapshotError, match="not by the configured key"):
            check(urza, signing.Verifier.from_file(other.public), 1)
    # Only the database put back, under the newer manifest: the rows do not match the manifest's digest.
    writable(live)
    shutil.copy(tmp_path / "v2" / snap.MANIFEST, live / snap.MANIFEST)
    with Urza(live / "urza.db", readonly=True) as urza, pytest.raises(SnapshotError, match="does not match snapshot"):
        check(urza, verifier, 1)
    # A manifest whose version was edited no longer verifies.
    edited = manifest(tmp_path / "v1") | {"version": 7}
    (live / snap.MANIFEST).write_text(json.dumps(edited))
    with Urza(live / "urza.db", readonly=True) as urza, pytest.raises(SnapshotError, match="does not match the snap"):
        check(urza, verifier, 1)
    (live / snap.MANIFEST).unlink()
    with Urza(live / "urza.db", readonly=True) as urza, pytest.raises(SnapshotError, match=r"no snapshot\.json"):
        check(urza, verifier, 1)
    (live / snap.MANIFEST).write_text("{not json")
    with Urza(live / "urza.db", readonly=True) as urza, pytest.raises(SnapshotError, match="malformed"):
        check(urza, verifier, 1)


def test_an_unsigned_snapshot_cannot_satisfy_a_minimum(tmp_path: Path, keys: signing.KeyPair) -> None:
    with Urza(tmp_path / "urza.db", signer=None) as urza:
        make_entry(urza, tmp_path, name="mlp", status="certified")
        report = export(urza, tmp_path / "snap")
    assert (report.version, report.signed) == (1, False) and manifest(tmp_path / "snap")["signature"] is None
    with (
        Urza(tmp_path / "snap" / "urza.db", readonly=True) as urza,
        pytest.raises(SnapshotError, match="snapshot manifest is not signed"),
    ):
        check(urza, signing.Verifier.from_file(keys.public), 1)


def test_cli_export_numbers_snapshots_and_refuses_a_lower_version(tmp_path: Path, keys: signing.KeyPair) -> None:
    with Urza(tmp_path / "urza.db", signer=None) as urza:
        make_entry(urza, tmp_path, name="mlp", status="certified")
    runner = CliRunner()
    env = {"ESPER_SIGNING_KEY": str(keys.private)}
    first = runner.invoke(cli, ["urza", "export", str(tmp_path / "a"), "--urza", str(tmp_path / "urza.db")], env=env)
    assert first.exit_code == 0 and "as snapshot version 1 (signed)" in first.output, first.output
    jump = runner.invoke(
        cli,
        ["urza", "export", str(tmp_path / "b"), "--urza", str(tmp_path / "urza.db"), "--snapshot-version", "40"],
        env=env,
    )
    assert jump.exit_code == 0 and "as snapshot version 40 (signed)" in jump.output, jump.output
    lower = runner.invoke(
        cli, ["urza", "export", str(tmp_path / "c"), "--urza", str(tmp_path / "urza.db"), "--snapshot-version", "39"]
    )
    assert lower.exit_code == 1 and "is not above 40" in lower.output and not (tmp_path / "c").exists()
    unsigned = runner.invoke(cli, ["urza", "export", str(tmp_path / "d"), "--urza", str(tmp_path / "urza.db")])
    assert unsigned.exit_code == 0 and "as snapshot version 41 (unsigned" in unsigned.output
    with Urza(tmp_path / "urza.db") as urza, pytest.raises(UrzaError, match="versions only increase"):
        urza.number_snapshot(41)


def test_a_bad_minimum_refuses_rather_than_turning_the_check_off() -> None:
    assert snap.min_version_from(None) is None
    assert snap.min_version_from(" 3 ") == 3 and snap.min_version_from(2) == 2
    for bad in ("", "two", "-1", "0", 0, -4, True, 1.5):
        with pytest.raises(SnapshotError, match="not a positive integer"):
            snap.min_version_from(bad)  # type: ignore[arg-type]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno >= logging.WARNING]


@pytest.mark.compiles
def test_kasmina_refuses_an_older_snapshot_put_back(
    urza_copy: Path,
    tmp_path: Path,
    keys: signing.KeyPair,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from esper.kasmina import COMPILED, EAGER, Kasmina

    signer = signing.Signer.from_file(keys.private)
    with Urza(urza_copy, signer=signer) as urza:
        sign_all(urza)
        assert export(urza, tmp_path / "v1").version == 1
        assert export(urza, tmp_path / "v2").version == 2
    live = tmp_path / "live"
    shutil.copytree(tmp_path / "v2", live)
    x = torch.randn(4, 8)

    def load(**kw: object) -> torch.nn.Module:
        caplog.clear()
        kernel = Kasmina(live / "urza.db", blueprint_paths=[TINY], public_key=keys.public, **kw).load("tiny_mlp")  # type: ignore[arg-type]
        with torch.no_grad():
            torch.testing.assert_close(kernel(x), kernel.eager_module()(x), atol=1e-5, rtol=1e-5)
        return kernel

    assert load(min_snapshot_version=2).route == COMPILED and _warnings(caplog) == []
    put_back(tmp_path / "v1", live)
    kernel = load(min_snapshot_version=2)
    assert kernel.route == EAGER
    (warning,) = _warnings(caplog)
    assert warning.esper["reason"] == "rollback"  # type: ignore[attr-defined]
    assert "snapshot version 1 is older than the minimum accepted, 2" in warning.getMessage()
    assert load(min_snapshot_version=1).route == COMPILED and _warnings(caplog) == []
    assert load().route == COMPILED  # no minimum configured: versions are not looked at
    monkeypatch.setenv("ESPER_MIN_SNAPSHOT", "2")
    assert load().route == EAGER and [w.esper["reason"] for w in _warnings(caplog)] == ["rollback"]  # type: ignore[attr-defined]
    monkeypatch.setenv("ESPER_MIN_SNAPSHOT", "")  # set but empty: refuses everything, never "check off"
    assert load().route == EAGER and "not a positive integer" in _warnings(caplog)[0].getMessage()
    monkeypatch.delenv("ESPER_MIN_SNAPSHOT")
    caplog.clear()
    no_key = Kasmina(live / "urza.db", blueprint_paths=[TINY], min_snapshot_version=1).load("tiny_mlp")
    assert no_key.route == EAGER and "needs a public key" in _warnings(caplog)[0].getMessage()
    # The writable CI Urza is no snapshot: with a minimum configured it is refused, not trusted.
    os.environ.pop("ESPER_MIN_SNAPSHOT", None)
    caplog.clear()
    ci = Kasmina(urza_copy, blueprint_paths=[TINY], public_key=keys.public, min_snapshot_version=1).load("tiny_mlp")
    assert ci.route == EAGER and "no snapshot.json" in _warnings(caplog)[0].getMessage()


def test_verify_reports_the_snapshot_version(tmp_path: Path, keys: signing.KeyPair) -> None:
    signer = signing.Signer.from_file(keys.private)
    with Urza(tmp_path / "urza.db", signer=signer) as urza:
        make_entry(urza, tmp_path, name="mlp", status="certified")
        export(urza, tmp_path / "snap")
    db = str(tmp_path / "snap" / "urza.db")
    runner = CliRunner()
    ok = runner.invoke(cli, ["urza", "verify", "--urza", db, "--public-key", str(keys.public)])
    assert (
        ok.exit_code == 0 and "snapshot version 1 of " in ok.output and "(signature checked, rows match)" in ok.output
    )
    writable(tmp_path / "snap")
    (tmp_path / "snap" / snap.MANIFEST).write_text(json.dumps(manifest(tmp_path / "snap") | {"entries": 9}))
    bad = runner.invoke(cli, ["urza", "verify", "--urza", db])
    assert bad.exit_code == 1 and "snapshot: PROBLEM: the database does not match snapshot version 1" in bad.output
