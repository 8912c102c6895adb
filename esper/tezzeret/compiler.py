"""Tezzeret's one compile pipeline, for every artifact kind: content hash -> reuse -> stages -> fallback -> publish.

What differs per kind (:class:`~esper.artifacts.kinds.ArtifactKind`) is a
:class:`~esper.tezzeret.pipeline.ArtifactPipeline`:
inference (:mod:`esper.tezzeret.inference`: export -> guards -> one package) and training
(:mod:`esper.tezzeret.training_compile`: trace joint -> plan -> export forward/backward -> two packages in
one artifact). A failure at any stage after the module is built stores an eager fallback entry (the weights,
as safetensors) with the failure reason, so a catalog run always goes on to the next blueprint.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.artifacts import compat
from esper.artifacts.context import machine_context
from esper.artifacts.guards import GuardSchema
from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.variants import EAGER_ROUTE, VARIANTS, Variant
from esper.artifacts.weights import save_state
from esper.blueprint import Blueprint
from esper.profiles import contains, specialization_name, split_profile
from esper.provenance import current_source_digest
from esper.tezzeret.aoti import compile_slot, urza_cache
from esper.tezzeret.content import content_hash
from esper.tezzeret.export import declared_guards
from esper.tezzeret.inference import InferencePipeline
from esper.tezzeret.pipeline import (
    SHAPE_STAGES,
    VERIFY_SHAPES,
    ArtifactPipeline,
    Built,
    CompileJob,
    EagerRoute,
    NotSpecialized,
    StageError,
)
from esper.tezzeret.training_compile import TrainingPipeline
from esper.urza import DEFAULT_PROFILE, ArtifactError, Entry, EntryEngine, EntryStatus, Urza
from esper.urza.evidence import CompileRecord, Parity, Performance

log = logging.getLogger("esper.tezzeret")

PIPELINES: dict[ArtifactKind, ArtifactPipeline] = {
    ArtifactKind.INFERENCE: InferencePipeline(),
    ArtifactKind.TRAINING: TrainingPipeline(),
}


@dataclass(frozen=True)
class CompileOutcome:
    """What :meth:`Tezzeret.compile` did: the entry, whether an existing one was reused, and wall time."""

    entry: Entry
    reused: bool
    seconds: float

    @property
    def artifact(self) -> ArtifactKind:
        """The entry's artifact kind."""
        return ArtifactKind(self.entry.artifact)

    @property
    def route(self) -> str:
        """``"compiled"`` when the entry holds compiled code, else ``"eager"`` (a fallback or eager route)."""
        return "compiled" if self.entry.engine == EntryEngine.AOTI else "eager"


def pipeline_for(artifact: ArtifactKind | str) -> ArtifactPipeline:
    """The pipeline of an artifact kind; a clear error naming the known kinds for anything else."""
    try:
        return PIPELINES[ArtifactKind(artifact)]
    except ValueError:
        known = ", ".join(k.value for k in ArtifactKind)
        raise ValueError(f"unknown artifact kind {artifact!r} (known: {known})") from None


def reusable(urza: Urza, bp: Blueprint, digest: str, key: compat.CompatKey, *, identity: Entry) -> Entry | None:
    """The newest entry with ``identity``'s profile, variant and kind, this content hash and compatibility key,
    whose artifact still verifies; ``None``: compile again."""
    existing = urza.find(
        bp.name,
        bp.version,
        digest,
        key,
        profile=identity.profile,
        variant=identity.variant,
        artifact=identity.artifact,
    )
    if existing is None:
        return None
    try:
        urza.store.verify(existing.checksum, existing.artifact_size)
    except ArtifactError as e:
        log.warning("%s: entry #%s unusable (%s); compiling again", bp.name, existing.id, e)
        return None
    log.info("%s: reusing Urza entry #%s (%s)", bp.name, existing.id, existing.status)
    return existing


def store_weights(urza: Urza, bp: Blueprint, module: torch.nn.Module, tmp: Path) -> tuple[str, int]:
    """The module's weights as a safetensors artifact in the store: ``(sha256, size)``."""
    path = tmp / "weights.safetensors"
    save_state(module, path, blueprint=bp.name, version=bp.version)
    return urza.store.add(path)


def entry_meta(bp: Blueprint, module: torch.nn.Module, ranges: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The meta every entry of ``bp`` starts with, compiled or eager."""
    return {
        "source": bp.source,
        # What Kasmina recomputes, without building the module, to notice stale code (esper.provenance).
        "source_digest": current_source_digest(bp),
        "ranges": {k: list(v) for k, v in ranges.items()},
        "representative": [dict(r) for r in bp.measured_shapes() if contains(ranges, r)],
    }


# A profile's newest entry by (Urza, device, blueprint, version, source digest, kind, variant, settings, profile),
# compiled or reused in this process: what its specializations' compiles consult first.
_profiles_seen: dict[tuple[str, ...], Entry] = {}

# The checksums of the packages this process compiled (see built_in_this_process).
_built_here: set[str] = set()


def built_in_this_process(entry: Entry) -> bool:
    """Whether ``entry``'s package was compiled by this process. Certification times packages compiled
    elsewhere: one can run faster in the process that compiled it than in a process that only loads it, as
    Kasmina does (see :mod:`esper.certification.compile_ahead`)."""
    return bool(entry.checksum) and entry.checksum in _built_here


#: The meta key of a fallback whose export could not keep these dims dynamic: its specializations compile.
SPECIALIZE = "specialize"


class Tezzeret:
    """Compiles blueprints into ``urza``. Sets a persistent Inductor cache beside Urza unless one is set."""

    def __init__(self, urza: Urza, *, device: str | torch.device = "cpu"):
        self.urza = urza
        self.device = torch.device(device)
        self.cache_dir = urza_cache(urza.path)

    def compile(
        self,
        bp: Blueprint,
        *,
        artifact: ArtifactKind | str = ArtifactKind.INFERENCE,
        variant: Variant = VARIANTS["default"],
        profile: str = DEFAULT_PROFILE,
        force: bool = False,
    ) -> CompileOutcome:
        """Compile one artifact of ``bp`` (one shape profile under one variant; training: the default ones),
        or reuse the entry with the same content hash and compatibility key. The entry is written once,
        complete, after its artifact is stored; a failure stores an eager fallback instead.

        A specialization (``profile`` like ``"default@seq=32"``, see :mod:`esper.profiles`) compiles only where
        its profile's entry (compiled or reused first) is a fallback that recorded its dim as one that cannot stay
        dynamic; else :class:`~esper.tezzeret.pipeline.NotSpecialized` says why there is nothing to compile."""
        started = time.perf_counter()
        pipeline = pipeline_for(artifact)
        exact = split_profile(profile)[1]
        if exact:
            self.check_specialization(bp, artifact=pipeline.kind, variant=variant, profile=profile)
        ranges, module, base = self._identity(bp, pipeline, variant, profile)
        existing = None if force else reusable(self.urza, bp, base.content_hash, base.compat, identity=base)
        if existing is not None:
            self._seen(bp, pipeline.kind, variant, profile, existing)
            return CompileOutcome(existing, True, time.perf_counter() - started)
        meta: dict[str, Any] = {
            **entry_meta(bp, module, ranges),
            "description": bp.description,
            "settings": dict(variant.settings),
            "context": machine_context(),
            "inductor_cache": str(self.cache_dir),
            **pipeline.meta(bp, variant),
        }
        # The slot covers the whole compile (export, package, pre-warm, timings): see compile_slot.
        with (
            compile_slot(variant.settings),
            tempfile.TemporaryDirectory(prefix="tezzeret-") as tmp,
            warnings.catch_warnings(record=True) as caught,
        ):
            # torch's compiler warns about its own internals; keep what it said as evidence, never fail on it.
            warnings.simplefilter("always")
            job = CompileJob(
                bp=bp,
                base=base,
                module=module,
                variant=variant,
                ranges=ranges,
                representative=tuple(meta["representative"]),
                device=self.device,
                meta=meta,
                tmp=Path(tmp),
            )
            try:
                entry = self._store_built(base, meta, pipeline.run(job))
            except (StageError, EagerRoute) as e:
                log.warning("%s: %s; storing the eager %s route", bp.name, e, pipeline.kind.value)
                entry = self._fallback(job, pipeline, e)
                # A specialization's compiled step may hold more dims than its profile's did (see
                # _check_specialized); an export failure of one is no reason to probe further.
                if isinstance(e, StageError) and e.stage in SHAPE_STAGES and (not exact or e.stage == VERIFY_SHAPES):
                    entry = self._specializing(job, pipeline, entry)
        seconds = time.perf_counter() - started
        said = tuple(sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:20])
        entry = self.urza.publish(entry.with_(meta={**entry.meta, **CompileRecord(seconds, said).to_json()}))
        if entry.engine == EntryEngine.AOTI and entry.checksum:
            _built_here.add(entry.checksum)
        self._seen(bp, pipeline.kind, variant, profile, entry)
        return CompileOutcome(entry, False, seconds)

    def stored(
        self, bp: Blueprint, *, artifact: ArtifactKind | str, variant: Variant, profile: str = DEFAULT_PROFILE
    ) -> Entry | None:
        """The entry :meth:`compile` would reuse for this candidate, compiling nothing (``None``: it would compile
        one, or, for a specialization, might find there is nothing to compile)."""
        pipeline = pipeline_for(artifact)
        _, _, base = self._identity(bp, pipeline, variant, profile)
        return reusable(self.urza, bp, base.content_hash, base.compat, identity=base)

    def _identity(
        self, bp: Blueprint, pipeline: ArtifactPipeline, variant: Variant, profile: str
    ) -> tuple[dict[str, tuple[int, int]], torch.nn.Module, Entry]:
        """A candidate's ranges, its freshly built module, and its entry as far as its identity goes (content
        hash, compatibility key, profile, variant, kind; no artifact yet)."""
        ranges = pipeline.ranges(bp, profile, variant)
        module = pipeline.build(bp, self.device)
        digest = content_hash(
            bp, module, artifact=pipeline.kind, settings=variant.settings, ranges=ranges, device=self.device.type
        )
        base = Entry(
            blueprint=bp.name,
            blueprint_version=bp.version,
            content_hash=digest,
            compat=compat.current(self.device),
            engine=EntryEngine.AOTI,
            status=EntryStatus.COMPILED,
            checksum="",
            artifact_size=0,
            guards=None,
            profile=profile,
            variant=variant.name,
            artifact=pipeline.kind.value,
        )
        return ranges, module, base

    def check_specialization(
        self, bp: Blueprint, *, artifact: ArtifactKind | str, variant: Variant, profile: str
    ) -> None:
        """Raise :class:`~esper.tezzeret.pipeline.NotSpecialized` unless the specialization ``profile`` would
        compile (see :meth:`compile`), compiling nothing of its own: its profile's entries are compiled first
        where this Urza has none (else reused). Lets a caller decide where a specialization compiles before
        it does."""
        pipeline = pipeline_for(artifact)
        # Answered from the entries this process has seen first (no build, no hash); only a specialization
        # that would compile has its profile's entries compiled (reused) again, so it never rests on a
        # remembered row alone.
        self._check_specialized(bp, pipeline, variant, profile, fresh=False)
        self._check_specialized(bp, pipeline, variant, profile, fresh=True)

    def _check_specialized(
        self, bp: Blueprint, pipeline: ArtifactPipeline, variant: Variant, profile: str, *, fresh: bool
    ) -> None:
        """Raise :class:`NotSpecialized` unless the specialization ``profile`` holds exactly the dims its profile
        cannot keep dynamic (:meth:`ArtifactPipeline.serves`). Those are the dims its profile's fallback
        recorded (:data:`SPECIALIZE`), and, where a specialization holding fewer of this one's dims at its sizes
        fell back recording more (a compiled step whose width is held then holds its height too), those as
        well, where the kind lists that narrower specialization. ``fresh``: compile (reuse) the entries consulted
        rather than answer from the ones seen."""
        base_profile, exact = split_profile(profile)
        held: list[str] = []
        link = base_profile
        entries: list[Entry] = []
        while True:
            entry = self._profile_entry(bp, pipeline, variant, link, fresh=fresh)
            entries.append(entry)
            recorded = entry.meta.get(SPECIALIZE) or () if entry.status == EntryStatus.FALLBACK else ()
            more = [d for d in recorded if d not in held]
            if not more:
                break
            held += more
            if pipeline.serves(exact, held):
                return
            if not set(held) < set(exact):
                break
            link = specialization_name(base_profile, {d: n for d, n in exact.items() if d in held})
            # A kind may list only the sets of dims a compile can hold (all of a layout or none): a link it
            # does not list is not compiled, so this specialization has nothing to rest on.
            if link not in {p for p, _ in pipeline.candidates(bp)}:
                break
        base = entries[0]
        keeps = ", ".join(sorted(set(exact) - set(held)))
        why = f"does not need {keeps} held exact" if keeps else f"needs {', '.join(held)} held together"
        raise NotSpecialized(
            f"{bp.name} {pipeline.kind.value} {profile}/{variant.name}: profile {base_profile} (entry "
            f"#{base.id}, {base.status}) {why}, so there is no specialization"
        )

    def _profile_entry(
        self, bp: Blueprint, pipeline: ArtifactPipeline, variant: Variant, profile: str, *, fresh: bool
    ) -> Entry:
        """The entry of ``profile`` seen in this process, else compiled (reused); with ``fresh``, one that held
        dims is compiled (reused) again."""
        seen = _profiles_seen.get(self._seen_key(bp, pipeline.kind, variant, profile))
        if seen is not None and not (fresh and seen.meta.get(SPECIALIZE)):
            return seen
        return self.compile(bp, artifact=pipeline.kind, variant=variant, profile=profile).entry

    def _seen_key(self, bp: Blueprint, kind: ArtifactKind, variant: Variant, profile: str) -> tuple[str, ...]:
        settings = repr(sorted(dict(variant.settings).items()))
        source = current_source_digest(bp)
        where = (str(self.urza.path), self.device.type)
        return (*where, bp.name, str(bp.version), source, kind, variant.name, settings, profile)

    def _seen(self, bp: Blueprint, kind: ArtifactKind, variant: Variant, profile: str, entry: Entry) -> None:
        """Remember a profile's (or a specialization's) entry for its specializations' compiles in this process:
        each asks whether its profile held its dims, and building the module again to hash it would cost each
        of them a build."""
        _profiles_seen[self._seen_key(bp, kind, variant, profile)] = entry

    def compile_candidates(
        self, bp: Blueprint, *, artifacts: tuple[ArtifactKind, ...] = tuple(ArtifactKind), force: bool = False
    ) -> list[CompileOutcome]:
        """Every artifact of ``bp`` of the given kinds: for inference, every shape profile under every variant
        the blueprint allows, and the specializations of the profiles whose export held a dim; for training, its
        one artifact. A fallback never stops the run."""
        out = []
        for artifact in artifacts:
            for profile, variant in pipeline_for(artifact).candidates(bp):
                try:
                    out.append(self.compile(bp, artifact=artifact, variant=variant, profile=profile, force=force))
                except NotSpecialized as e:
                    log.info("%s", e)
        return out

    def store_eager_route(
        self,
        bp: Blueprint,
        *,
        artifact: ArtifactKind | str,
        profile: str,
        guards: GuardSchema | None,
        evidence: dict[str, Any],
        reason: str | None = None,
    ) -> Entry:
        """Publish a ``certified`` eager entry: where certification measured that no compiled candidate beats
        eager (routing to compiled code would only make it slower). Its artifact is the weights, like a
        fallback's; ``evidence`` holds its ``parity``, ``performance`` and extra ``meta``."""
        pipeline = pipeline_for(artifact)
        ranges = pipeline.ranges(bp, profile, VARIANTS["default"])
        module = pipeline.build(bp, self.device)
        digest = content_hash(
            bp, module, artifact=pipeline.kind, settings={"route": EAGER_ROUTE}, ranges=ranges, device=self.device.type
        )
        with tempfile.TemporaryDirectory(prefix="tezzeret-") as tmp:
            checksum, size = store_weights(self.urza, bp, module, Path(tmp))
        return self.urza.publish(
            Entry(
                blueprint=bp.name,
                blueprint_version=bp.version,
                content_hash=digest,
                compat=compat.current(self.device),
                engine=EntryEngine.EAGER,
                status=EntryStatus.CERTIFIED,
                checksum=checksum,
                artifact_size=size,
                guards=guards,
                profile=profile,
                variant=EAGER_ROUTE,
                artifact=pipeline.kind.value,
                parity=Parity.from_json(evidence.get("parity")).to_json(),
                performance=Performance.from_json(evidence.get("performance")).to_json(),
                meta={
                    **entry_meta(bp, module, ranges),
                    "profiles": pipeline.meta(bp, VARIANTS["default"])["profiles"],
                    **evidence.get("meta", {}),
                    **pipeline.eager_meta(reason),
                },
            )
        )

    def _fallback(self, job: CompileJob, pipeline: ArtifactPipeline, error: StageError | EagerRoute) -> Entry:
        """The eager fallback of a compile that failed (or decided eager): the weights as the artifact."""
        meta = {**job.meta, **pipeline.eager_meta(str(error))}
        if isinstance(error, StageError):
            meta["failed_stage"] = error.stage
        checksum, size = store_weights(self.urza, job.bp, job.module, job.tmp)
        return job.base.with_(
            engine=EntryEngine.EAGER,
            status=EntryStatus.FALLBACK,
            checksum=checksum,
            artifact_size=size,
            meta=meta,
            failure_reason=str(error),
            failed_check=pipeline.compile_check,
        )

    def _specializing(self, job: CompileJob, pipeline: ArtifactPipeline, fallback: Entry) -> Entry:
        """A fallback whose export failed, with the dims that cannot stay dynamic (when holding one exact lets it
        export) and the guards the profile declares: its specializations compile, and certification may route
        the rest of its range eager over those guards."""
        dims = pipeline.static_dims(job)
        if not dims:
            return fallback
        log.info("%s: %s cannot stay dynamic; its specializations compile", job.bp.name, ", ".join(dims))
        return fallback.with_(
            guards=declared_guards(job.bp, job.ranges, self.device.type),
            meta={**fallback.meta, SPECIALIZE: dims},
        )

    def _store_built(self, base: Entry, meta: dict[str, Any], built: Built) -> Entry:
        checksum, size = self.urza.store.add(built.path)
        return base.with_(
            checksum=checksum,
            artifact_size=size,
            guards=built.guards,
            meta={**meta, **built.meta},
            parity=Parity(representative=built.parity).to_json(),
            performance=Performance(tezzeret=built.performance).to_json(),
        )
