"""Ed25519 signatures over Urza entries: writers sign with the private key, Kasmina checks with the public key.

What a signature covers (the *signed payload*) is every column that decides whether, and which, native code a
training process loads: the artifact's checksum and size, and the routing metadata (blueprint, blueprint
version, profile, variant, content hash, the compatibility key, kind, status and the guard schema). Evidence
(parity, performance, meta), failure reasons, timestamps and the row id are not signed: changing them cannot
make Kasmina load anything else. The payload's bytes are canonical JSON (keys sorted, no whitespace, ASCII):

    {"artifact_size":N,"blueprint":"...","blueprint_version":N,"checksum":"<sha256>","compat":{"device_type":
    "...","isa":"...","platform":"...","torch_version":"..."},"content_hash":"...","format":"esper-entry/1",
    "guards":{...GuardSchema.to_dict()...}|null,"kind":"...","profile":"...","status":"...","variant":"..."}

and the stored signature is ``ed25519:<key id>:<base64 signature>``, the key id being the first 16 hex digits
of the sha256 of the raw 32-byte public key. Keys are PEM files: PKCS#8 (private, mode 0600) and
SubjectPublicKeyInfo (public). See docs/security.md.
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

SIGNING_KEY_ENV = "ESPER_SIGNING_KEY"
PUBLIC_KEY_ENV = "ESPER_PUBLIC_KEY"
PAYLOAD_FORMAT = "esper-entry/1"
ALGORITHM = "ed25519"
PRIVATE_KEY_NAME = "esper-signing.key"
PUBLIC_KEY_NAME = "esper-signing.pub"


class SigningError(ValueError):
    """A key file is missing, unreadable, of the wrong kind, or too widely readable."""


class SignatureError(ValueError):
    """An entry is unsigned, signed by another key, or its signed columns were changed after signing."""


def signed_fields(entry: Any) -> dict[str, Any]:
    """The columns a signature covers (``entry`` is an :class:`esper.urza.Entry`)."""
    return {
        "format": PAYLOAD_FORMAT,
        "blueprint": entry.blueprint,
        "blueprint_version": entry.blueprint_version,
        "profile": entry.profile,
        "variant": entry.variant,
        "content_hash": entry.content_hash,
        "compat": entry.compat.to_dict(),
        "kind": entry.kind,
        "status": entry.status,
        "checksum": entry.checksum,
        "artifact_size": entry.artifact_size,
        "guards": entry.guards.to_dict() if entry.guards is not None else None,
    }


def payload(entry: Any) -> bytes:
    """The canonical bytes that are signed for ``entry``."""
    return json.dumps(signed_fields(entry), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


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
        sig = base64.b64encode(self.private_key.sign(payload(entry))).decode()
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
        """Return if ``entry`` carries a valid signature by this key; :class:`SignatureError` says why not."""
        sig = entry.signature
        if not sig:
            raise SignatureError("entry is not signed")
        parts = sig.split(":")
        if len(parts) != 3 or parts[0] != ALGORITHM:
            raise SignatureError(f"signature is not in the {ALGORITHM}:<key id>:<base64> format")
        _, signer_id, b64 = parts
        if signer_id != self.key_id:
            raise SignatureError(f"signed by key {signer_id}, not by the configured key {self.key_id}")
        try:
            raw = base64.b64decode(b64, validate=True)
            self.public_key.verify(raw, payload(entry))
        except (binascii.Error, InvalidSignature) as e:
            raise SignatureError(
                f"signature by key {signer_id} does not match the entry (signed columns changed after signing)"
            ) from e


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
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private, pem, 0o600)
    _write_new(public, pub, 0o644)
    return KeyPair(private, public, key_id(key.public_key()))


def signer_from_env(environ: Mapping[str, str] | None = None) -> Signer | None:
    """The signer named by ``$ESPER_SIGNING_KEY`` (``None`` when unset or empty)."""
    path = (os.environ if environ is None else environ).get(SIGNING_KEY_ENV)
    return Signer.from_file(path) if path else None


def verifier_for(public_key: str | Path | Verifier | None, environ: Mapping[str, str] | None = None) -> Verifier | None:
    """A verifier for ``public_key`` (a path or a :class:`Verifier`), else for ``$ESPER_PUBLIC_KEY``, else ``None``."""
    if isinstance(public_key, Verifier):
        return public_key
    path = public_key or (os.environ if environ is None else environ).get(PUBLIC_KEY_ENV)
    return Verifier.from_file(path) if path else None


def _read_key(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SigningError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it further for the public key
