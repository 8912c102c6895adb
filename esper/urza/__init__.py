"""Urza, the artifact library: SQLite rows plus content-addressed artifact files."""

from esper.urza.db import SCHEMA_VERSION, Urza, UrzaError
from esper.urza.schema import DEFAULT_PROFILE, DEFAULT_VARIANT, KINDS, STATUSES, Entry
from esper.urza.store import ArtifactError, ArtifactStore

__all__ = [
    "DEFAULT_PROFILE",
    "DEFAULT_VARIANT",
    "KINDS",
    "SCHEMA_VERSION",
    "STATUSES",
    "ArtifactError",
    "ArtifactStore",
    "Entry",
    "Urza",
    "UrzaError",
]
