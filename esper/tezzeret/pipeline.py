"""What Tezzeret's one compile pipeline asks of an artifact kind, and the pieces every kind shares.

:class:`esper.tezzeret.compiler.Tezzeret` runs the same skeleton for every :class:`~esper.artifacts.kinds.ArtifactKind`:
content hash -> reuse -> stages -> fallback (or eager route) -> publish. What differs per kind is small and
lives behind :class:`ArtifactPipeline`: how the module is built and the stages that turn it into one artifact
file (:mod:`esper.tezzeret.inference`, :mod:`esper.tezzeret.training_compile`). Which candidates and ranges a
kind compiles is its :class:`~esper.artifacts.kinds.KindSpec`'s rule, read through :class:`SpecPipeline`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from esper.artifacts.guards import GuardSchema
from esper.artifacts.kinds import ArtifactKind, KindSpec, spec
from esper.artifacts.kinds import full_ranges as full_ranges  # the training stages' edge shapes
from esper.artifacts.variants import VARIANTS, Variant
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


class NotSpecialized(Exception):
    """A specialization that is not compiled: its profile keeps the dim dynamic (or failed for another reason),
    so there is nothing for an exact-size artifact to serve."""


#: The stage of a compiled training step that serves only the sizes it was traced at in some dims (Inductor
#: specialized a dim that export kept dynamic): the shape failure that compiled code itself shows.
VERIFY_SHAPES = "verify shapes"
#: The stages whose failure may mean a dim cannot stay dynamic (export, or the compiled code, specialized it).
SHAPE_STAGES = ("export", "guards", VERIFY_SHAPES)


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

    @property
    def compile_check(self) -> str:
        """The failed_check recorded on a fallback of this kind."""
        ...

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

    def static_dims(self, job: CompileJob) -> list[str]:
        """After ``job`` failed at a shape stage: the dims that, held at one size, let it export (the dims that
        cannot stay dynamic); empty when none does or the kind has no specializations."""
        ...

    def serves(self, exact: Collection[str], held: Collection[str]) -> bool:
        """Whether a specialization holding the dims ``exact`` serves a profile whose dims ``held`` cannot stay
        dynamic (so it is worth compiling)."""
        ...


class SpecPipeline:
    """The facts of an :class:`ArtifactPipeline` that are its kind's :class:`~esper.artifacts.kinds.KindSpec`'s:
    a pipeline inherits them and declares only ``kind`` and its stages."""

    kind: ArtifactKind

    @property
    def spec(self) -> KindSpec:
        return spec(self.kind)

    @property
    def compile_check(self) -> str:
        return self.spec.compile_check

    def ranges(self, bp: Blueprint, profile: str, variant: Variant) -> dict[str, tuple[int, int]]:
        """The kind's ranges for ``profile`` (:meth:`KindSpec.ranges`: refuses what the kind does not build)."""
        return self.spec.ranges(bp, profile, variant)

    def candidates(self, bp: Blueprint) -> list[tuple[str, Variant]]:
        """The kind's candidates (:meth:`KindSpec.candidates`, the rule certification plans by), variants resolved."""
        return [(c.profile, VARIANTS[c.variant]) for c in self.spec.candidates(bp)]

    def static_dims(self, job: CompileJob) -> list[str]:
        """No dim is probed unless the kind overrides this (see :meth:`ArtifactPipeline.static_dims`)."""
        return []

    def serves(self, exact: Collection[str], held: Collection[str]) -> bool:
        """Each dim of ``held`` alone lets the profile export (:meth:`static_dims`): holding any of them serves."""
        return bool(exact) and set(exact) <= set(held)
