"""Ed25519 signatures over Urza entries: writers sign with the private key, Kasmina checks with the public key.

What a signature covers (the *signed payload*) is every column of the row except the signature itself, its
timestamps and its id: everything that can change whether, which and how native code or an eager route runs
in a training process (blueprint, blueprint version, artifact kind, profile, variant, content hash, the
compatibility key, kind, status, checksum, artifact size, the guard schema, ``meta``: pre-warm shapes,
profiles, constant schema, source digest, training route), and the evidence and failure fields beside them
(parity, performance, failure reason, failed check: ``failed_check`` decides seed routing). The payload is
the same for every row kind (inference and training, compiled and eager): with a key configured, no row is
used unless it verifies. Its bytes are canonical JSON (keys sorted, no whitespace, ASCII):

    {"artifact":"inference","artifact_size":N,"blueprint":"...","blueprint_version":N,"checksum":"<sha256>",
    "compat":{"device_type":"...","isa":"...","platform":"...","torch_version":"..."},"content_hash":"...",
    "failed_check":null,"failure_reason":null,"format":"esper-entry/2","guards":{...}|null,"kind":"...",
    "meta":{...},"parity":{...},"performance":{...},"profile":"...","status":"...","variant":"..."}

and the stored signature is ``ed25519:<key id>:<base64 signature>``, the key id being the first 16 hex digits
of the sha256 of the raw 32-byte public key. Keys are PEM files: PKCS#8 (private, mode 0600) and
SubjectPublicKeyInfo (public). Rows signed under ``esper-entry/1`` (which covered fewer columns) no longer
verify: the verifier recognises them and says so ("signed under esper-entry/1: re-sign with `esper urza sign`"),
but refuses them all the same. :meth:`Signer.sign_bytes` / :meth:`Verifier.verify_bytes` sign other canonical
payloads with the same key (a snapshot's version, :mod:`esper.urza.snapshot`); each payload names its own
``format``, so one kind of signed bytes can never pass for another. See docs/security.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from esper.io_errors import describe as describe_io_error

SIGNING_KEY_ENV = "ESPER_SIGNING_KEY"
PUBLIC_KEY_ENV = "ESPER_PUBLIC_KEY"
PAYLOAD_FORMAT = "esper-entry/2"
LEGACY_PAYLOAD_FORMAT = "esper-entry/1"  # recognised only to say "re-sign", never accepted
ALGORITHM = "ed25519"
PRIVATE_KEY_NAME = "esper-signing.key"
PUBLIC_KEY_NAME = "esper-signing.pub"


class SigningError(ValueError):
    """A key file is missing, unreadable, of the wrong kind, or too widely readable."""


class SignatureError(ValueError):
    """An entry is unsigned, signed by another key, or its signed columns were changed after signing."""


def signed_fields(entry: Any) -> dict[str, Any]:
    """The columns a signature covers (``entry`` is an :class:`esper.urza.Entry`): all but the signature, the
    timestamps and the id."""
    return {
        "format": PAYLOAD_FORMAT,
        "blueprint": entry.blueprint,
        "blueprint_version": entry.blueprint_version,
        "artifact": str(entry.artifact),
        "profile": entry.profile,
        "variant": entry.variant,
        "content_hash": entry.content_hash,
        "compat": entry.compat.to_dict(),
        "kind": entry.engine,
        "status": entry.status,
        "checksum": entry.checksum,
        "artifact_size": entry.artifact_size,
        "guards": entry.guards.to_dict() if entry.guards is not None else None,
        "meta": entry.meta,
        "parity": entry.parity,
        "performance": entry.performance,
        "failure_reason": entry.failure_reason,
        "failed_check": entry.failed_check,
    }


def payload(entry: Any) -> bytes:
    """The canonical bytes that are signed for ``entry``."""
    return canonical(signed_fields(entry))


def legacy_payload(entry: Any) -> bytes:
    """The bytes ``esper-entry/1`` signed (no artifact kind, meta or evidence): only to recognise such rows."""
    fields = {k: v for k, v in signed_fields(entry).items() if k not in _UNSIGNED_IN_V1}
    return canonical({**fields, "format": LEGACY_PAYLOAD_FORMAT})


_UNSIGNED_IN_V1 = ("artifact", "meta", "parity", "performance", "failure_reason", "failed_check")


def canonical(data: Any) -> bytes:
    """Canonical JSON bytes (keys sorted, no whitespace, ASCII): what every signature here is over."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """Signs entries with a private key (held by writers: Tezzeret and certification, i.e. CI)."""

    private_key: Ed25519PrivateKey
    key_id: str
    path: Path | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        """Load a PEM private key; refuses one that group or others can read (as ssh does)."""
        path = Path(path)
        data = _read_key(path, "signing (private) key")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SigningError(f"signing key {path} is readable by others (mode {mode:04o}); run: chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise SigningError(f"{path} is not an unencrypted PEM private key: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key, key_id(key.public_key()), path)

    def sign(self, entry: Any) -> str:
        """The signature string to store in ``entry``'s ``signature`` column."""
        return self.sign_bytes(payload(entry))

    def sign_bytes(self, data: bytes) -> str:
        """``ed25519:<key id>:<base64>`` over ``data`` (a canonical payload that names its own format)."""
        sig = base64.b64encode(self.private_key.sign(data)).decode()
        return f"{ALGORITHM}:{self.key_id}:{sig}"

    def verifier(self) -> Verifier:
        return Verifier(self.private_key.public_key(), self.key_id)


@dataclass(frozen=True)
class Verifier:
    """Checks entries' signatures with a public key (all a training node holds: it cannot sign)."""

    public_key: Ed25519PublicKey
    key_id: str
    path: Path | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Verifier:
        """Load a PEM public key. A private key is refused: a reader must not hold what can forge."""
        path = Path(path)
        data = _read_key(path, "public key")
        if b"PRIVATE KEY" in data:
            raise SigningError(
                f"{path} is a private key; give readers the public key ({PUBLIC_KEY_NAME}) and keep the private "
                "key on the machines that publish"
            )
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as e:
            raise SigningError(f"{path} is not a PEM public key: {e}") from e
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
        return cls(key, key_id(key), path)

    def verify(self, entry: Any) -> None:
        """Return if ``entry`` carries a valid signature by this key; :class:`SignatureError` says why not.

        A row signed under ``esper-entry/1`` is refused too, with a message that says to re-sign it rather
        than one that looks like tampering.
        """
        try:
            self.verify_bytes(entry.signature, payload(entry))
        except _Mismatch as e:
            if self._verifies(e.raw, legacy_payload(entry)):
                raise SignatureError(
                    f"signed under {LEGACY_PAYLOAD_FORMAT}: re-sign with `esper urza sign` (a {LEGACY_PAYLOAD_FORMAT} "
                    f"signature does not match the entry under {PAYLOAD_FORMAT}, which also covers meta and evidence)"
                ) from None
            raise

    def verify_bytes(self, signature: str | None, data: bytes, what: str = "entry") -> None:
        """Return if ``signature`` (``ed25519:<key id>:<base64>``) is this key's over ``data``; else
        :class:`SignatureError` naming ``what`` was signed."""
        if not signature:
            raise SignatureError(f"{what} is not signed")
        parts = signature.split(":")
        if len(parts) != 3 or parts[0] != ALGORITHM:
            raise SignatureError(f"signature is not in the {ALGORITHM}:<key id>:<base64> format")
        _, signer_id, b64 = parts
        if signer_id != self.key_id:
            raise SignatureError(f"signed by key {signer_id}, not by the configured key {self.key_id}")
        try:
            raw = base64.b64decode(b64, validate=True)
        except binascii.Error as e:
            raise SignatureError(f"signature by key {signer_id} is not valid base64") from e
        if not self._verifies(raw, data):
            raise _Mismatch(
                f"signature by key {signer_id} does not match the {what} (signed columns changed after signing)", raw
            )

    def _verifies(self, raw: bytes, data: bytes) -> bool:
        try:
            self.public_key.verify(raw, data)
        except InvalidSignature:
            return False
        return True


class _Mismatch(SignatureError):
    """A well-formed signature by the right key that does not match the payload (``raw``: its bytes)."""

    def __init__(self, message: str, raw: bytes):
        super().__init__(message)
        self.raw = raw


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    key_id: str


def generate_keypair(out_dir: str | Path) -> KeyPair:
    """Write a new Ed25519 key pair into ``out_dir`` (created mode 0700 if missing); never overwrites.

    The private key file is created with mode 0600 from the start, so it is never readable by others.
    """
    out = Path(out_dir)
    private, public = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    for p in (private, public):
        if p.exists():
            raise SigningError(f"{p} already exists; refusing to overwrite a key (move it away first)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    written: list[Path] = []
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, data, mode in ((private, pem, 0o600), (public, pub, 0o644)):
            _write_new(path, data, mode)
            written.append(path)
    except OSError as e:
        # Half a pair is no pair: remove what this call wrote (_write_new removes its own partial file).
        for path in written:
            path.unlink(missing_ok=True)
        raise SigningError(f"cannot write the key pair into {out}: {describe_io_error(e)}") from e
    return KeyPair(private, public, key_id(key.public_key()))


def signer_from_env(environ: Mapping[str, str] | None = None) -> Signer | None:
    """The signer named by ``$ESPER_SIGNING_KEY`` (``None`` when unset or empty)."""
    path = (os.environ if environ is None else environ).get(SIGNING_KEY_ENV)
    return Signer.from_file(path) if path else None


def verifier_for(public_key: str | Path | Verifier | None, environ: Mapping[str, str] | None = None) -> Verifier | None:
    """A verifier for ``public_key`` (a path or a :class:`Verifier`), else for ``$ESPER_PUBLIC_KEY``; ``None``
    only when neither is given (``public_key is None`` and the variable unset).

    Fail closed: an empty key (``public_key=""``, ``ESPER_PUBLIC_KEY=""`` or blank) is a :class:`SigningError`,
    never "verification off", and so is a key that cannot be read or is not an Ed25519 public key. Kasmina
    turns that into "refuse every entry" with a WARNING; the CLI into an error.
    """
    if isinstance(public_key, Verifier):
        return public_key
    if public_key is not None:
        return Verifier.from_file(_nonempty(public_key, "public_key"))
    env = os.environ if environ is None else environ
    if PUBLIC_KEY_ENV not in env:
        return None
    return Verifier.from_file(_nonempty(env[PUBLIC_KEY_ENV], f"${PUBLIC_KEY_ENV}"))


def _nonempty(path: str | Path, what: str) -> Path:
    if isinstance(path, str) and not path.strip():
        raise SigningError(f"{what} is empty: name the public key file, or unset it to run without signatures")
    return Path(path)


def _read_key(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SigningError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows here, not after the key is reported written
        os.chmod(path, mode)  # the umask may have narrowed it further for the public key
    except OSError as e:
        path.unlink(missing_ok=True)  # O_EXCL created it: this call owns it
        if e.filename is None:
            e.filename = str(path)
        raise
