"""Urza's entry: one compiled (or fallback) artifact of one blueprint, with its evidence.

An entry's identity is blueprint name + blueprint version + artifact kind (inference or training) + shape
profile + compile variant + compatibility key + content hash; its artifact is a file named by its sha256.
Rows are plain, versioned data: readers refuse a database whose schema version is newer than theirs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from esper.artifacts import ARTIFACT_KINDS, ArtifactKind
from esper.compat import CompatKey
from esper.guards import GuardSchema

STATUSES = ("compiled", "certified", "rejected", "fallback")
KINDS = ("aoti", "eager")
DEFAULT_PROFILE = "default"
DEFAULT_VARIANT = "default"


@dataclass(frozen=True)
class Entry:
    """One Urza row. ``id`` is ``None`` until published."""

    blueprint: str
    blueprint_version: int
    content_hash: str
    compat: CompatKey
    kind: str
    status: str
    checksum: str
    artifact_size: int
    guards: GuardSchema | None
    profile: str = DEFAULT_PROFILE
    variant: str = DEFAULT_VARIANT
    artifact: str = ArtifactKind.INFERENCE.value
    parity: dict[str, Any] = field(default_factory=dict)
    performance: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    failure_reason: str | None = None
    failed_check: str | None = None
    signature: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    id: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"entry kind {self.kind!r} is not one of {KINDS}")
        if self.status not in STATUSES:
            raise ValueError(f"entry status {self.status!r} is not one of {STATUSES}")
        if self.artifact not in ARTIFACT_KINDS:
            raise ValueError(f"entry artifact {self.artifact!r} is not one of {ARTIFACT_KINDS}")

    def with_(self, **changes: Any) -> Entry:
        return replace(self, **changes)

    def to_row(self) -> dict[str, Any]:
        """The SQLite row (JSON columns as text)."""
        return {
            "blueprint": self.blueprint,
            "blueprint_version": self.blueprint_version,
            "profile": self.profile,
            "variant": self.variant,
            "artifact": str(self.artifact),
            "content_hash": self.content_hash,
            "torch_version": self.compat.torch_version,
            "platform": self.compat.platform,
            "isa": self.compat.isa,
            "device_type": self.compat.device_type,
            "kind": self.kind,
            "status": self.status,
            "checksum": self.checksum,
            "artifact_size": self.artifact_size,
            "guards": self.guards.to_json() if self.guards else None,
            "parity": json.dumps(self.parity, sort_keys=True),
            "performance": json.dumps(self.performance, sort_keys=True),
            "meta": json.dumps(self.meta, sort_keys=True),
            "failure_reason": self.failure_reason,
            "failed_check": self.failed_check,
            "signature": self.signature,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Entry:
        return cls(
            id=row["id"],
            blueprint=row["blueprint"],
            blueprint_version=row["blueprint_version"],
            profile=row["profile"],
            variant=row["variant"],
            artifact=row["artifact"],
            content_hash=row["content_hash"],
            compat=CompatKey(row["torch_version"], row["platform"], row["isa"], row["device_type"]),
            kind=row["kind"],
            status=row["status"],
            checksum=row["checksum"],
            artifact_size=row["artifact_size"],
            guards=GuardSchema.from_json(row["guards"]) if row["guards"] else None,
            parity=json.loads(row["parity"] or "{}"),
            performance=json.loads(row["performance"] or "{}"),
            meta=json.loads(row["meta"] or "{}"),
            failure_reason=row["failure_reason"],
            failed_check=row["failed_check"],
            signature=row["signature"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for ``esper urza show --json``."""
        out = self.to_row()
        out.update(
            id=self.id,
            compat=self.compat.to_dict(),
            guards=self.guards.to_dict() if self.guards else None,
            parity=self.parity,
            performance=self.performance,
            meta=self.meta,
        )
        for k in ("torch_version", "platform", "isa", "device_type"):
            out.pop(k)
        return out
