"""Artifact kinds: what a compiled artifact serves, the one axis every layer is parameterized by.

- ``inference``: the forward only, weights inside the package (swappable for seeds unless folded).
- ``training``: the forward and the backward, two programs of one artifact, with the weights as inputs.

Tezzeret compiles, Urza stores (the ``artifact`` column), Kasmina loads and certification checks each kind
through one pipeline that takes the kind; nothing infers the kind from other columns.
"""

from __future__ import annotations

from enum import StrEnum


class ArtifactKind(StrEnum):
    """What an Urza entry's artifact serves. Stored in Urza's ``artifact`` column by value."""

    INFERENCE = "inference"
    TRAINING = "training"


ARTIFACT_KINDS = tuple(k.value for k in ArtifactKind)
