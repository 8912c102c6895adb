"""Urza's entry: one compiled (or fallback) artifact of one blueprint, with its evidence.

An entry's identity is blueprint name + blueprint version + artifact kind (inference or training) + shape
profile + compile variant + compatibility key + content hash; its artifact is a file named by its sha256.
Rows are plain, versioned data: readers refuse a database whose schema version is newer than theirs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from esper.artifacts import validate as v
from esper.artifacts.compat import CompatKey
from esper.artifacts.guards import GuardSchema
from esper.artifacts.kinds import ARTIFACT_KINDS, ArtifactKind
from esper.artifacts.validate import EntryFormatError

__all__ = ["Entry", "EntryEngine", "EntryFormatError", "EntryMeta", "EntryStatus", "WeightSpec"]


class EntryStatus(StrEnum):
    """Where an entry stands. Stored as its value, so rows read the same text as before the enum existed."""

    COMPILED = "compiled"  # Tezzeret compiled it; not yet certified
    CERTIFIED = "certified"  # Kasmina may route to it
    REJECTED = "rejected"  # a certification check failed, or selection did not route it
    FALLBACK = "fallback"  # the compile failed or decided eager: the weights run eager


class EntryEngine(StrEnum):
    """What runs an entry: compiled code (its artifact an AOTInductor package), or the blueprint's module eager
    (its artifact the weights). Stored in the ``kind`` column, its name before artifact kinds existed."""

    AOTI = "aoti"
    EAGER = "eager"


STATUSES = tuple(s.value for s in EntryStatus)
ENGINES = tuple(k.value for k in EntryEngine)
DEFAULT_PROFILE = "default"
DEFAULT_VARIANT = "default"


@dataclass(frozen=True)
class Entry:
    """One Urza row. ``id`` is ``None`` until published."""

    blueprint: str
    blueprint_version: int
    content_hash: str
    compat: CompatKey
    engine: EntryEngine
    status: EntryStatus
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
        # Plain text is accepted and stored as the enum, so that every reader compares against the enums.
        object.__setattr__(self, "engine", EntryEngine(v.choice(self.engine, ENGINES, "kind", "entry engine")))
        object.__setattr__(self, "status", EntryStatus(v.choice(self.status, STATUSES, "status", "entry status")))
        v.choice(self.artifact, ARTIFACT_KINDS, "artifact", "entry artifact")

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
            "kind": str(self.engine),
            "status": str(self.status),
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
        """Parse one stored row into validated, typed values; :class:`EntryFormatError` names the column.

        Columns are checked for type and range (ids and sizes are integers, hashes 64 hex digits, names match
        their patterns, JSON columns are objects, the guard schema is valid); ``meta``'s fields are parsed by
        :meth:`EntryMeta.from_entry`, since which of them matter depends on the reader.
        """
        if not isinstance(row, dict):
            raise EntryFormatError("row", f"is {v.quote(row)}, not a row")
        missing = sorted(set(ROW_COLUMNS) - set(row))
        if missing:
            raise EntryFormatError("row", f"lacks the columns {missing}")
        guards = row["guards"]
        return cls(
            id=None if row["id"] is None else v.integer(row["id"], "id", "id", lo=1, hi=2**63 - 1),
            blueprint=v.matching(row["blueprint"], v.BLUEPRINT_NAME_RE, "blueprint", "blueprint"),
            blueprint_version=v.integer(row["blueprint_version"], "blueprint_version", "blueprint version", lo=1),
            profile=v.matching(row["profile"], v.PROFILE_RE, "profile", "profile"),
            variant=v.matching(row["variant"], v.VARIANT_RE, "variant", "variant"),
            artifact=v.choice(row["artifact"], ARTIFACT_KINDS, "artifact", "artifact kind"),
            content_hash=v.sha256(row["content_hash"], "content_hash", "content hash"),
            compat=CompatKey(
                v.text(row["torch_version"], "torch_version", "torch version", limit=128),
                v.text(row["platform"], "platform", "platform", limit=128),
                v.text(row["isa"], "isa", "ISA", limit=128),
                v.choice(row["device_type"], v.DEVICE_TYPES, "device_type", "device type"),
            ),
            engine=EntryEngine(v.choice(row["kind"], ENGINES, "kind", "engine")),
            status=EntryStatus(v.choice(row["status"], STATUSES, "status", "status")),
            checksum=v.sha256(row["checksum"], "checksum", "checksum"),
            artifact_size=v.integer(row["artifact_size"], "artifact_size", "artifact size"),
            guards=GuardSchema.from_json(v.text(guards, "guards", "guards")) if guards is not None else None,
            parity=_json_object(row["parity"], "parity"),
            performance=_json_object(row["performance"], "performance"),
            meta=_json_object(row["meta"], "meta"),
            failure_reason=v.optional_text(row["failure_reason"], "failure_reason", "failure reason"),
            failed_check=v.optional_text(row["failed_check"], "failed_check", "failed check", limit=128),
            signature=v.optional_text(row["signature"], "signature", "signature", limit=1024),
            created_at=v.optional_text(row["created_at"], "created_at", "creation time", limit=64),
            updated_at=v.optional_text(row["updated_at"], "updated_at", "update time", limit=64),
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


#: The columns :meth:`Entry.from_row` reads.
ROW_COLUMNS = (
    "id", "blueprint", "blueprint_version", "profile", "variant", "artifact", "content_hash", "torch_version",
    "platform", "isa", "device_type", "kind", "status", "checksum", "artifact_size", "guards", "parity",
    "performance", "meta", "failure_reason", "failed_check", "signature", "created_at", "updated_at",
)  # fmt: skip


def _json_object(value: Any, column: str) -> dict[str, Any]:
    """A JSON column's object (``{}`` for NULL or empty text)."""
    if value is None or value == "":
        return {}
    try:
        data = json.loads(v.text(value, column, column, limit=2**24))
    except (ValueError, RecursionError) as e:
        raise EntryFormatError(column, f"not JSON: {v.quote(str(e))}") from None
    return dict(v.mapping(data, column, column))


@dataclass(frozen=True)
class WeightSpec:
    """One weight of a compiled package's constant schema: state-dict name, shape and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class EntryMeta:
    """The ``meta`` fields Kasmina acts on, parsed and validated against the entry (see :meth:`from_entry`).

    - ``representative``: pre-warm shapes, each assigning exactly the guard's dynamic dims, inside their ranges.
    - ``profiles``: every profile certified beside this one; names this entry's own profile.
    - ``constants``: the package's weights (``None``: not recorded); ``folded_constants``: weights folded into
      the code (``None``: not recorded); ``swappable``: whether seed weights can be bound.
    - ``training_route`` / ``training_reason``: a training entry's recorded route (``"eager"``) and why.
    - ``source_digest``: the declaring source files' digest at compile time (see :mod:`esper.provenance`).
    """

    representative: tuple[tuple[tuple[str, int], ...], ...] = ()
    profiles: tuple[str, ...] = ()
    constants: tuple[WeightSpec, ...] | None = None
    folded_constants: tuple[str, ...] | None = None
    swappable: bool = True
    training_route: str | None = None
    training_reason: str | None = None
    source_digest: str | None = None

    def representative_sizes(self) -> list[dict[str, int]]:
        """The representative shapes as ``{dim: size}`` dicts."""
        return [dict(r) for r in self.representative]

    def constant_names(self) -> list[str]:
        """The constant schema's weight names (empty when not recorded)."""
        return [w.name for w in self.constants or ()]

    @classmethod
    def from_entry(cls, entry: Entry) -> EntryMeta:
        """Validate ``entry.meta``; :class:`EntryFormatError` (column ``meta.<field>``) on the first problem."""
        meta = v.mapping(entry.meta, "meta", "meta")
        ranges = entry.guards.dim_ranges() if entry.guards is not None else {}
        return cls(
            representative=_representative(meta.get("representative"), ranges),
            profiles=_profiles(meta.get("profiles"), entry.profile),
            constants=_constants(meta.get("constants")),
            folded_constants=_names(meta.get("folded_constants"), "meta.folded_constants"),
            swappable=v.boolean(meta.get("swappable", True), "meta.swappable", "swappable"),
            **_training(meta.get("training")),
            source_digest=None
            if meta.get("source_digest") is None
            else v.sha256(meta["source_digest"], "meta.source_digest", "source digest"),
        )


def _representative(value: Any, ranges: dict[str, tuple[int, int]]) -> tuple[tuple[tuple[str, int], ...], ...]:
    column = "meta.representative"
    if value is None:
        return ()
    out = []
    for k, raw in enumerate(v.sequence(value, column, column, limit=256)):
        sizes = v.mapping(raw, column, f"[{k}]")
        if not ranges:  # no guard (an eager row): the names and sizes must still be well formed
            out.append(
                tuple((v.identifier(n, column, "dim"), v.integer(s, column, f"[{k}] {n}")) for n, s in sizes.items())
            )
            continue
        if set(sizes) != set(ranges):
            raise EntryFormatError(
                column, f"[{k}] assigns {v.quote(sorted(sizes))}, the guard's dims are {sorted(ranges)}"
            )
        for name, size in sizes.items():
            lo, hi = ranges[name]
            v.integer(size, column, f"[{k}] {name}", lo=lo, hi=hi)
        out.append(tuple((n, sizes[n]) for n in ranges))
    return tuple(out)


def _profiles(value: Any, own: str) -> tuple[str, ...]:
    column = "meta.profiles"
    if value is None:
        return (own,)
    names = tuple(v.matching(p, v.PROFILE_RE, column, "profile") for p in v.sequence(value, column, column, limit=1024))
    if own not in names:
        raise EntryFormatError(column, f"{v.quote(list(names))} does not name this entry's profile {own!r}")
    return names


def _names(value: Any, column: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.matching(n, v.WEIGHT_NAME_RE, column, "weight name") for n in v.sequence(value, column, column))


def _constants(value: Any) -> tuple[WeightSpec, ...] | None:
    column = "meta.constants"
    if value is None:
        return None
    out = []
    for name, raw in v.mapping(value, column, column).items():
        v.matching(name, v.WEIGHT_NAME_RE, column, "weight name")
        spec = v.mapping(raw, column, name, keys=("shape", "dtype"))
        shape = tuple(
            v.integer(s, column, f"{name} size")
            for s in v.sequence(spec.get("shape"), column, f"{name} shape", limit=64)
        )
        out.append(WeightSpec(name, shape, v.choice(spec.get("dtype"), v.DTYPES, column, f"{name} dtype")))
    return tuple(out)


TRAINING_EVIDENCE_KEYS = ("format", "trainable", "mutated_buffers", "saved_tensors", "symbolic_sizes")


def _training(value: Any) -> dict[str, str | None]:
    column = "meta.training"
    if value is None:
        return {"training_route": None, "training_reason": None}
    # Besides the route, Tezzeret records what the artifact holds (for people; Kasmina reads the manifest).
    data = v.mapping(value, column, column, keys=("route", "reason", *TRAINING_EVIDENCE_KEYS))
    route = data.get("route")
    return {
        "training_route": None if route is None else v.choice(route, ("eager", "compiled"), column, "route"),
        "training_reason": v.optional_text(data.get("reason"), column, "reason"),
    }
