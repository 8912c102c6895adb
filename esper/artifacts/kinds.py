"""Artifact kinds: what a compiled artifact serves, the one axis every layer is parameterized by.

- ``inference``: the forward only, weights inside the package (swappable for seeds unless folded).
- ``training``: the forward and the backward, two programs of one artifact, with the weights as inputs.

Tezzeret compiles, Urza stores (the ``artifact`` column), Kasmina loads and certification checks each kind
through one pipeline that takes the kind; nothing infers the kind from other columns.

What a kind *is* (its candidates, the ranges it compiles over, what an entry of it is called, whether it can
be switched off) is declared once, here, in a :class:`KindSpec` (:func:`spec`). What a layer *does* with a kind
(Tezzeret compiles it, Kasmina loads it, certification checks it) is that layer's own class, which reads these
facts instead of restating them: the candidate rule below is the one Tezzeret compiles and certification plans.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from esper.artifacts.variants import EAGER_ROUTE, VARIANTS, Variant
from esper.profiles import DEFAULT_PROFILE, joint_specializations, narrowed, specializations, split_profile

if TYPE_CHECKING:
    from esper.blueprint import Blueprint

Ranges = dict[str, tuple[int, int]]


class ArtifactKind(StrEnum):
    """What an Urza entry's artifact serves. Stored in Urza's ``artifact`` column by value."""

    INFERENCE = "inference"
    TRAINING = "training"


ARTIFACT_KINDS = tuple(k.value for k in ArtifactKind)

# The values that switch an opt-out variable off (case and surrounding spaces ignored).
OFF = ("0", "no", "false", "off")
# The values that switch an opt-in variable on.
ON = ("1", "yes", "true", "on")


def full_ranges(bp: Blueprint) -> Ranges:
    """Every declared dim's whole range."""
    return {n: (d.min, d.max) for n, d in bp.dims.items()}


def profile_ranges(bp: Blueprint, profile: str) -> Ranges:
    """The ranges of one shape profile of ``bp`` (a specialization's: its profile's, its dims held exact); a clear
    error for a profile it does not have."""
    profiles = bp.profiles()
    base, exact = split_profile(profile)
    held = narrowed(profiles[base], exact) if base in profiles else None
    if held is None or (exact and profile not in specializations({base: profiles[base]}, bp.specialization_sizes())):
        raise ValueError(f"blueprint {bp.name!r} has no shape profile {profile!r} (profiles: {', '.join(profiles)})")
    return held


class Candidate(NamedTuple):
    """One shape profile compiled under one variant (by name): what Tezzeret compiles and certification
    checks, named ``"profile/variant"`` (:attr:`id`)."""

    profile: str
    variant: str

    @property
    def id(self) -> str:
        return f"{self.profile}/{self.variant}"


@dataclass(frozen=True)
class KindSpec:
    """The declarative facts of one artifact kind, read by every layer.

    ``whole_range``: one artifact covers every dim's whole declared range (the default profile) rather than
    one artifact per shape profile. ``variants``: the variants it compiles, in preference order (certification
    keeps the first unless a later one is faster with confidence); ``None``: the blueprint's declared variants.
    ``eager_route``: the variant name an eager route of this kind is stored under. ``backward``: its compiled
    code serves the backward too (a call records autograd; the blueprint's p95 limits, declared for the
    forward pass, do not apply). ``guarded_eager``: an eager entry is a route for the inputs its guards accept
    (so it carries a guard schema) rather than for every call. ``opt_out``: the environment variable that
    switches this kind's certification off (``None``: always on). ``specializes``: the kind has exact-size
    specializations (see :mod:`esper.profiles`) among its candidates, compiled only where a dim cannot stay
    dynamic; of a whole-range kind, each holds dims together at a measured shape's own sizes.
    ``specializes_opt_in``: the environment variable that must be on (1/yes/true) for the kind's
    specializations to be candidates (``None``: they always are).
    """

    kind: ArtifactKind
    # How messages name an entry of this kind ("training entry #3").
    noun: str
    whole_range: bool
    variants: tuple[str, ...] | None
    # The failed_check Tezzeret records on an eager fallback of this kind.
    compile_check: str
    backward: bool
    guarded_eager: bool
    opt_out: str | None = None
    eager_route: str = EAGER_ROUTE
    specializes: bool = False
    specializes_opt_in: str | None = None

    def enabled(self) -> bool:
        """Whether this kind is certified (its ``opt_out`` variable unset, or not 0/no/false/off)."""
        return self.opt_out is None or os.environ.get(self.opt_out, "1").strip().lower() not in OFF

    def specializing(self) -> bool:
        """Whether this kind's specializations are candidates in this run (see ``specializes_opt_in``)."""
        return self.specializes_opt_in is None or os.environ.get(self.specializes_opt_in, "").strip().lower() in ON

    def disabled(self) -> str | None:
        """Why this kind is not certified in this run (``None``: it is)."""
        return None if self.enabled() else f"{self.kind} certification is off ({self.opt_out}=0)"

    def profiles(self, bp: Blueprint) -> dict[str, Ranges]:
        """The shape profiles this kind compiles ``bp`` for, each with its dim ranges, in declaration order; then
        its specializations (:meth:`specializations`)."""
        if self.whole_range:
            return {DEFAULT_PROFILE: full_ranges(bp), **self.specializations(bp)}
        return {**bp.profiles(), **self.specializations(bp)}

    def specializations(self, bp: Blueprint) -> dict[str, Ranges]:
        """The exact-size specializations of ``bp``'s profiles this kind may compile: per profile, per dim, one
        per size of :meth:`~esper.blueprint.Blueprint.specialization_sizes` inside the profile; of a whole-range
        kind, per set of dims, one per measured shape holding them at its own sizes
        (:func:`~esper.profiles.joint_specializations`). Tezzeret compiles one only where its profile showed that
        exactly those dims cannot stay dynamic."""
        if not self.specializes or not self.specializing():
            return {}
        if self.whole_range:
            return joint_specializations({DEFAULT_PROFILE: full_ranges(bp)}, bp.measured_shapes(), bp.layouts())
        return specializations(bp.profiles(), bp.specialization_sizes())

    def variant_names(self, bp: Blueprint) -> tuple[str, ...]:
        """The variants that compete for this kind of ``bp``, in preference order."""
        return self.variants if self.variants is not None else tuple(bp.variants)

    def candidates(self, bp: Blueprint) -> list[Candidate]:
        """Every candidate of this kind of ``bp``: each profile (declaration order) under each variant, then each
        specialization under the first variant only (each is a whole compile, made for one size; the variants
        compete on the profiles)."""
        variants = self.variant_names(bp)
        special = self.specializations(bp)
        buckets = [p for p in self.profiles(bp) if p not in special]
        return [Candidate(p, v) for p in buckets for v in variants] + [Candidate(p, variants[0]) for p in special]

    def ranges(self, bp: Blueprint, profile: str, variant: Variant) -> Ranges:
        """The dim ranges ``bp`` compiles for under ``profile`` and ``variant``; refuses a profile or variant
        this kind does not build (a kind with fixed variants takes them as declared, settings included)."""
        if self.whole_range and profile != DEFAULT_PROFILE and profile not in self.specializations(bp):
            raise ValueError(
                f"{self.kind} artifacts cover the whole declared range: profile must be {DEFAULT_PROFILE!r}, "
                f"not {profile!r} ({bp.name})"
            )
        if self.variants is not None and (
            variant.name not in self.variants or dict(variant.settings) != dict(VARIANTS[variant.name].settings)
        ):
            only = ", ".join(repr(v) for v in self.variants)
            raise ValueError(f"{self.kind} artifacts compile under the {only} variant only, not {variant.name!r}")
        if self.whole_range:
            return full_ranges(bp) if profile == DEFAULT_PROFILE else self.specializations(bp)[profile]
        return profile_ranges(bp, profile)


SPECS: Mapping[ArtifactKind, KindSpec] = {
    ArtifactKind.INFERENCE: KindSpec(
        ArtifactKind.INFERENCE,
        noun="entry",
        whole_range=False,
        variants=None,
        compile_check="compile",
        backward=False,
        guarded_eager=True,
        specializes=True,
    ),
    # Inductor settings that fold weights into the code cannot apply to weights passed in: default only.
    ArtifactKind.TRAINING: KindSpec(
        ArtifactKind.TRAINING,
        noun="training entry",
        whole_range=True,
        variants=("default",),
        compile_check="train_compile",
        backward=True,
        guarded_eager=False,
        opt_out="ESPER_CERTIFY_TRAINING",
        specializes=True,
        # Opt-in: each is a compile of its own plus a parity run at its (often largest) sizes, a large share of a
        # cold certification, and a compiled training step that cannot keep a convolution's height and width
        # dynamic has so far lost to eager at the sizes it was specialized for.
        specializes_opt_in="ESPER_TRAINING_SPECIALIZATIONS",
    ),
}


def spec(kind: ArtifactKind | str) -> KindSpec:
    """The spec of ``kind`` (an :class:`ArtifactKind` or its value)."""
    return SPECS[ArtifactKind(kind)]
