"""Urza, the artifact library: SQLite rows plus content-addressed artifact files.

Upkeep (verify, gc, sign, export) is in :mod:`esper.urza.maintenance`, as functions of an open :class:`Urza`.
"""

from esper.urza.db import SCHEMA_VERSION, StoredRow, Urza, UrzaError
from esper.urza.schema import DEFAULT_PROFILE, DEFAULT_VARIANT, ENGINES, STATUSES, Entry, EntryEngine, EntryStatus
from esper.urza.store import ArtifactError, ArtifactStore

__all__ = [
    "DEFAULT_PROFILE",
    "DEFAULT_VARIANT",
    "ENGINES",
    "SCHEMA_VERSION",
    "STATUSES",
    "ArtifactError",
    "ArtifactStore",
    "Entry",
    "EntryEngine",
    "EntryStatus",
    "StoredRow",
    "Urza",
    "UrzaError",
]
