"""Signing: writers sign every row they store (and re-sign on a status change); Kasmina, given only the public
key, refuses unsigned, foreign-signed or altered entries, falling back to eager with a WARNING."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from esper.artifacts import signing
from esper.artifacts.compat import CompatKey
from esper.artifacts.guards import DimGuard
from esper.artifacts.signing import SignatureError, Signer, SigningError, Verifier, generate_keypair
from esper.cli import cli
from esper.kasmina import COMPILED, EAGER, Kasmina
from esper.kasmina.telemetry import SIGNATURE
from esper.urza import Entry, Urza, UrzaError
from tests.support import GUARDS, TINY, make_entry


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> signing.KeyPair:
    return generate_keypair(tmp_path_factory.mktemp("keys") / "ci")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> signing.KeyPair:
    return generate_keypair(tmp_path_factory.mktemp("keys") / "someone-else")


def entry(**kw: object) -> Entry:
    fields: dict[str, object] = dict(
        blueprint="b",
        blueprint_version=1,
        content_hash="c" * 64,
        compat=CompatKey("2.13.0", "linux-x86_64", "AVX2", "cpu"),
        engine="aoti",
        status="certified",
        checksum="a" * 64,
        artifact_size=123,
        guards=GUARDS,
    )
    fields.update(kw)
    return Entry(**fields)  # type: ignore[arg-type]


def test_payload_bytes_are_pinned() -> None:
    """The canonical bytes are a format: changing them invalidates every signature ever made."""
    assert signing.payload(entry()) == (
        b'{"artifact":"inference","artifact_size":123,"blueprint":"b","blueprint_version":1,"checksum":"'
        + b"a" * 64
        + b'","compat":{"device_type":"cpu","isa":"AVX2","platform":"linux-x86_64","torch_version":"2.13.0"},'
        b'"content_hash":"' + b"c" * 64 + b'","failed_check":null,"failure_reason":null,"format":"esper-entry/2",'
        b'"guards":{"device":"cpu","inputs":[{"dims":[{"max":4,"min":1,"name":"batch"},{"size":8}],'
        b'"dtype":"float32","name":"x"}],"range_constraints":{},"version":1},"kind":"aoti","meta":{},'
        b'"parity":{},"performance":{},"profile":"default","status":"certified","variant":"default"}'
    )


def test_rows_signed_under_format_1_no_longer_verify(keys: signing.KeyPair) -> None:
    """esper-entry/1 covered fewer columns; a /1 signature must not vouch for a row under /2."""
    old = entry()
    v1 = {
        k: v
        for k, v in signing.signed_fields(old).items()
        if k not in ("artifact", "meta", "parity", "performance", "failure_reason", "failed_check")
    }
    v1["format"] = "esper-entry/1"
    raw = Signer.from_file(keys.private).private_key.sign(
        json.dumps(v1, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    )
    signed_v1 = old.with_(signature=f"ed25519:{keys.key_id}:{base64.b64encode(raw).decode()}")
    with pytest.raises(SignatureError, match="does not match the entry"):
        Verifier.from_file(keys.public).verify(signed_v1)


def test_keygen_modes_and_refusal_to_overwrite(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.public.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    before = pair.private.read_bytes()
    with pytest.raises(SigningError, match="already exists; refusing to overwrite"):
        generate_keypair(tmp_path / "k")
    assert pair.private.read_bytes() == before
    assert Signer.from_file(pair.private).key_id == Verifier.from_file(pair.public).key_id == pair.key_id


def test_cli_keygen(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    assert "ESPER_SIGNING_KEY=" in result.output and "ESPER_PUBLIC_KEY=" in result.output
    assert stat.S_IMODE((tmp_path / "keys" / signing.PRIVATE_KEY_NAME).stat().st_mode) == 0o600
    again = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "keys")])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output


def test_sign_and_verify_each_signed_column(keys: signing.KeyPair, other_keys: signing.KeyPair) -> None:
    signer, verifier = Signer.from_file(keys.private), Verifier.from_file(keys.public)
    signed = entry(signature=signer.sign(entry()))
    verifier.verify(signed)
    # Only the timestamps and the id are not signed.
    verifier.verify(signed.with_(created_at="then", updated_at="now", id=9))
    altered = {
        "artifact": "training",
        "meta": {"representative": [{"batch": 1}]},
        "parity": {"x": 1},
        "performance": {"p50": 1.0},
        "failure_reason": "z",
        "failed_check": "selection",
        "blueprint": "c",
        "blueprint_version": 2,
        "profile": "big",
        "variant": "freezing",
        "content_hash": "d" * 64,
        "compat": replace(signed.compat, isa="AVX512"),
        "kind": "eager",
        "status": "rejected",
        "checksum": "b" * 64,
        "artifact_size": 124,
        "guards": replace(
            GUARDS, inputs=(replace(GUARDS.inputs[0], dims=(DimGuard(name="batch", min=1, max=400), DimGuard(size=8))),)
        ),
    }
    assert set(altered) | {"format"} == set(signing.signed_fields(signed))
    for column, value in altered.items():
        # The ``kind`` column holds Entry.engine (its name before artifact kinds existed).
        attribute = "engine" if column == "kind" else column
        with pytest.raises(SignatureError, match="does not match the entry"):
            verifier.verify(signed.with_(**{attribute: value}))
    with pytest.raises(SignatureError, match="not signed"):
        verifier.verify(signed.with_(signature=None))
    with pytest.raises(SignatureError, match="format"):
        verifier.verify(signed.with_(signature="rsa:abc"))
    with pytest.raises(SignatureError, match=f"signed by key {other_keys.key_id}, not by the configured key"):
        verifier.verify(entry(signature=Signer.from_file(other_keys.private).sign(entry())))
    # A signature copied from another key's entry, relabelled with this key's id, still fails.
    forged = Signer.from_file(other_keys.private).sign(entry()).replace(other_keys.key_id, keys.key_id)
    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify(entry(signature=forged))


def test_key_files_are_checked(keys: signing.KeyPair, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(keys.private.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(SigningError, match=r"readable by others.*chmod 600"):
        Signer.from_file(loose)
    with pytest.raises(SigningError, match="is a private key; give readers the public key"):
        Verifier.from_file(keys.private)
    with pytest.raises(SigningError, match="cannot read"):
        Verifier.from_file(tmp_path / "missing.pub")
    (tmp_path / "junk.pub").write_text("junk")
    with pytest.raises(SigningError, match="not a PEM public key"):
        Verifier.from_file(tmp_path / "junk.pub")


def test_urza_signs_on_publish_and_resigns_on_update(
    keys: signing.KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = Verifier.from_file(keys.public)
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, str(keys.private))
    with Urza(tmp_path / "urza.db") as urza:  # the key comes from the environment, as in CI
        published = make_entry(urza, tmp_path)
        verifier.verify(published)
        certified = urza.update(published.id, status="certified")  # type: ignore[arg-type]
    verifier.verify(certified)
    assert certified.signature != published.signature
    # A writer without the key cannot leave a stale signature on a changed row: it is dropped.
    monkeypatch.delenv(signing.SIGNING_KEY_ENV)
    with Urza(tmp_path / "urza.db") as urza:
        noted = urza.update(published.id, meta={"note": "evidence"})  # type: ignore[arg-type]
    assert noted.signature is None  # meta is signed: a change without the key leaves the row unsigned


def test_unusable_signing_key_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, str(tmp_path / "nope.key"))
    with pytest.raises(UrzaError, match="cannot sign Urza entries: cannot read signing"):
        Urza(tmp_path / "urza.db")
    assert not (tmp_path / "urza.db").exists()
    with Urza(tmp_path / "urza.db", signer=None):
        pass
    with Urza(tmp_path / "urza.db", readonly=True):  # readers never need the signing key
        pass


def test_verify_command_checks_signatures(keys: signing.KeyPair, other_keys: signing.KeyPair, tmp_path: Path) -> None:
    path = tmp_path / "urza.db"
    with Urza(path, signer=Signer.from_file(keys.private)) as urza:
        make_entry(urza, tmp_path, name="signed")
    with Urza(path, signer=None) as urza:
        make_entry(urza, tmp_path, name="unsigned", content=b"other")
    runner = CliRunner()
    ok = runner.invoke(cli, ["urza", "verify", "--urza", str(path)])
    assert ok.exit_code == 0 and "signatures not checked" in ok.output
    checked = runner.invoke(cli, ["urza", "verify", "--urza", str(path), "--public-key", str(keys.public)])
    assert checked.exit_code == 1
    assert "entry #1 signed (compiled): ok" in checked.output
    assert "entry #2 unsigned (compiled): PROBLEM: signature: entry is not signed" in checked.output
    foreign = runner.invoke(cli, ["urza", "verify", "--urza", str(path), "--public-key", str(other_keys.public)])
    assert foreign.exit_code == 1 and "not by the configured key" in foreign.output
    wrong = runner.invoke(cli, ["urza", "verify", "--urza", str(path), "--public-key", str(keys.private)])
    assert wrong.exit_code == 1 and "is a private key" in wrong.output


# -- Kasmina ---------------------------------------------------------------------------------------------


def _sign_all(urza_path: Path, private: Path) -> None:
    with Urza(urza_path, signer=Signer.from_file(private)) as urza:
        for e in urza.entries():
            urza.update(e.id)  # type: ignore[arg-type]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


@pytest.mark.compiles
def test_kasmina_loads_a_signed_entry(urza_copy: Path, keys: signing.KeyPair, caplog: pytest.LogCaptureFixture) -> None:
    _sign_all(urza_copy, keys.private)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY], public_key=keys.public).load("tiny_mlp")
    with torch.no_grad():
        kernel(torch.randn(3, 8))
    assert kernel.route == COMPILED and kernel.last_path == COMPILED and _warnings(caplog) == []


def _unsigned(p: Path, keys: signing.KeyPair, other: signing.KeyPair) -> None:
    """Nothing to do: the session fixture's entry was stored without a signing key."""
    with Urza(p, readonly=True) as urza:
        assert all(e.signature is None for e in urza.entries())


def _foreign_key(p: Path, keys: signing.KeyPair, other: signing.KeyPair) -> None:
    _sign_all(p, other.private)


def _widened_guards(p: Path, keys: signing.KeyPair, other: signing.KeyPair) -> None:
    """Someone with write access to the database widens the guard range after signing."""
    _sign_all(p, keys.private)
    conn = sqlite3.connect(p)
    with conn:
        conn.execute("UPDATE entries SET guards = replace(guards, '\"max\": 32', '\"max\": 4096')")
    conn.close()
    with Urza(p, readonly=True) as urza:
        assert urza.entries()[0].guards.dim_ranges()["batch"] == (1, 4096)  # type: ignore[union-attr]


def _recertified(p: Path, keys: signing.KeyPair, other: signing.KeyPair) -> None:
    """A row signed while ``compiled`` is flipped to ``certified`` by hand."""
    conn = sqlite3.connect(p)
    with conn:
        conn.execute("UPDATE entries SET status = 'compiled'")
    conn.close()
    _sign_all(p, keys.private)
    conn = sqlite3.connect(p)
    with conn:
        conn.execute("UPDATE entries SET status = 'certified'")
    conn.close()


@pytest.mark.compiles
@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (_unsigned, "entry is not signed"),
        (_foreign_key, "not by the configured key"),
        (_widened_guards, "does not match the entry"),
        (_recertified, "does not match the entry"),
    ],
)
def test_kasmina_refuses_entries_it_cannot_trust(
    urza_copy: Path,
    keys: signing.KeyPair,
    other_keys: signing.KeyPair,
    caplog: pytest.LogCaptureFixture,
    damage,  # type: ignore[no-untyped-def]
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    damage(urza_copy, keys, other_keys)
    monkeypatch.setenv(signing.PUBLIC_KEY_ENV, str(keys.public))  # the reader's only key: the public one
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), kernel.eager_module()(x))
    assert kernel.route == EAGER and kernel.last_path == EAGER
    (message,) = _warnings(caplog)
    assert f"({SIGNATURE})" in message and fragment in message


@pytest.mark.compiles
def test_unusable_public_key_means_eager_not_a_crash(
    urza_copy: Path, keys: signing.KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _sign_all(urza_copy, keys.private)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY], public_key=tmp_path / "missing.pub").load("tiny_mlp")
    assert kernel.route == EAGER
    (message,) = _warnings(caplog)
    assert "(signature)" in message and "public key unusable" in message and "missing.pub" in message


def test_kasmina_without_a_key_does_not_import_cryptography() -> None:
    import subprocess
    import sys

    code = "import sys, esper.kasmina; print(any(m.startswith('cryptography') for m in sys.modules))"
    env = {k: v for k, v in __import__("os").environ.items() if k != signing.PUBLIC_KEY_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_sign_command_signs_rows_whose_artifact_verifies(
    keys: signing.KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "urza.db"
    with Urza(path, signer=None) as urza:  # a library that predates signing
        make_entry(urza, tmp_path, name="whole")
        broken = make_entry(urza, tmp_path, name="broken", content=b"other")
        urza.store.path_for(broken.checksum).unlink()
    runner = CliRunner()
    refused = runner.invoke(cli, ["urza", "sign", "--urza", str(path)])
    assert refused.exit_code == 1 and "no signing key: set $ESPER_SIGNING_KEY" in refused.output
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, str(keys.private))
    result = runner.invoke(cli, ["urza", "sign", "--urza", str(path)])
    assert result.exit_code == 1, result.output  # one row could not be vouched for
    assert "not signed: entry #2 broken: artifact" in result.output and "signed 1 entries, skipped 1" in result.output
    verifier = Verifier.from_file(keys.public)
    with Urza(path, readonly=True) as urza:
        verifier.verify(urza.get(1))
        assert urza.get(2).signature is None


@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_public_key_is_an_error_not_verification_off(
    empty: str, keys: signing.KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ESPER_PUBLIC_KEY="" (or public_key="") used to turn verification off silently."""
    with pytest.raises(SigningError, match="public_key is empty"):
        signing.verifier_for(empty, environ={})
    with pytest.raises(SigningError, match=r"\$ESPER_PUBLIC_KEY is empty"):
        signing.verifier_for(None, environ={signing.PUBLIC_KEY_ENV: empty})
    monkeypatch.setenv(signing.PUBLIC_KEY_ENV, empty)
    with pytest.raises(SigningError, match="is empty"):
        signing.verifier_for(None)
    # Unset means "no signatures configured"; a given key wins over the environment.
    assert signing.verifier_for(None, environ={}) is None
    assert signing.verifier_for(keys.public, environ={signing.PUBLIC_KEY_ENV: ""}).key_id == keys.key_id
