"""What Tezzeret's one compile pipeline asks of an artifact kind, and the pieces every kind shares.

:class:`esper.tezzeret.compiler.Tezzeret` runs the same skeleton for every :class:`~esper.artifacts.kinds.ArtifactKind`:
content hash -> reuse -> stages -> fallback (or eager route) -> publish. What differs per kind is small and
lives behind :class:`ArtifactPipeline`: how the module is built, which ranges it is compiled for, and the
stages that turn it into one artifact file (:mod:`esper.tezzeret.inference`,
:mod:`esper.tezzeret.training_compile`).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from esper.artifacts.guards import GuardSchema
from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.variants import Variant
from esper.blueprint import Blueprint
from esper.urza import Entry

MAX_REASON = 4000
T = TypeVar("T")


class StageError(RuntimeError):
    """A stage of the compile failed; the blueprint gets an eager fallback with this message as its reason."""

    def __init__(self, stage: str, error: BaseException):
        self.stage = stage
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        super().__init__(f"{stage} failed: {detail}"[:MAX_REASON])


class EagerRoute(Exception):
    """This blueprint runs eager for the reason given: a decision (e.g. randomness that parity cannot
    certify), not a crash. Stored like a fallback, without a failed stage."""


def stage(name: str, fn: Callable[[], T]) -> T:
    """Run one stage; any failure becomes a :class:`StageError` naming it (an :class:`EagerRoute` passes)."""
    try:
        return fn()
    except EagerRoute:
        raise
    except Exception as e:
        raise StageError(name, e) from e


@dataclass(frozen=True)
class CompileJob:
    """One compile's inputs. ``base`` is the entry being made (identity filled in, no artifact yet);
    ``meta`` is its meta, which a stage may add to as it goes (what it wrote is kept on a fallback too);
    ``tmp`` is a private folder removed after publishing."""

    bp: Blueprint
    base: Entry
    module: torch.nn.Module
    variant: Variant
    ranges: dict[str, tuple[int, int]]
    representative: tuple[dict[str, int], ...]
    device: torch.device
    meta: dict[str, Any]
    tmp: Path


@dataclass(frozen=True)
class Built:
    """A kind's stages' result: the artifact file to store, its guards, and the evidence measured."""

    path: Path
    guards: GuardSchema
    meta: dict[str, Any]
    parity: dict[str, Any]
    performance: dict[str, Any]


class ArtifactPipeline(Protocol):
    """What differs per artifact kind; everything else is :class:`~esper.tezzeret.compiler.Tezzeret`'s."""

    kind: ArtifactKind
    # The failed_check recorded on a fallback of this kind.
    compile_check: str

    def ranges(self, bp: Blueprint, profile: str, variant: Variant) -> dict[str, tuple[int, int]]:
        """The dim ranges to compile for; refuses a profile or variant this kind does not build."""
        ...

    def candidates(self, bp: Blueprint) -> list[tuple[str, Variant]]:
        """The (shape profile, variant) pairs this kind compiles ``bp`` under."""
        ...

    def build(self, bp: Blueprint, device: torch.device) -> torch.nn.Module:
        """The module to hash and compile, on ``device`` and in this kind's mode."""
        ...

    def meta(self, bp: Blueprint, variant: Variant) -> dict[str, Any]:
        """What this kind adds to a new entry's meta."""
        ...

    def eager_meta(self, reason: str | None) -> dict[str, Any]:
        """What this kind adds to the meta of an eager entry (fallback or route) running eager for ``reason``."""
        ...

    def run(self, job: CompileJob) -> Built:
        """The stages: raise :class:`StageError` (via :func:`stage`) or :class:`EagerRoute` to run eager."""
        ...


def full_ranges(bp: Blueprint) -> dict[str, tuple[int, int]]:
    """Every declared dim's whole range."""
    return {n: (d.min, d.max) for n, d in bp.dims.items()}


def profile_ranges(bp: Blueprint, profile: str) -> dict[str, tuple[int, int]]:
    """The ranges of one shape profile of ``bp``; a clear error for a profile it does not have."""
    profiles = bp.profiles()
    if profile not in profiles:
        raise ValueError(f"blueprint {bp.name!r} has no shape profile {profile!r} (profiles: {', '.join(profiles)})")
    return dict(profiles[profile])
