"""Tezzeret's one compile pipeline, for every artifact kind: content hash -> reuse -> stages -> fallback ->
publish, and the one eager-route writer.

The skeleton is driven with stub kinds whose stages write a file instead of compiling (no Inductor here); the
real kinds' own stages are tested in tests/tezzeret/test_compiler.py and tests/tezzeret/test_training_compile.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.variants import VARIANTS
from esper.blueprint import Blueprint
from esper.tezzeret import compiler
from esper.tezzeret.compiler import Tezzeret
from esper.tezzeret.content import source_digest
from esper.tezzeret.inference import InferencePipeline
from esper.tezzeret.pipeline import Built, CompileJob, EagerRoute, stage
from esper.tezzeret.training_compile import TrainingPipeline
from esper.urza import Urza
from esper.urza.evidence import EVIDENCE_VERSION, ShapeParity

GUARDS = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=32), DimGuard(size=8))),))


@dataclass(frozen=True)
class Stub:
    """A kind whose stages write a small file, fail at a stage, or decide eager, and count their runs."""

    real: Any
    fail: str | None = None
    decide_eager: bool = False
    runs: list[str] = field(default_factory=list)

    @property
    def kind(self) -> ArtifactKind:
        return self.real.kind

    @property
    def compile_check(self) -> str:
        return self.real.compile_check

    def ranges(self, bp: Blueprint, profile: str, variant: Any) -> dict[str, tuple[int, int]]:
        return self.real.ranges(bp, profile, variant)

    def candidates(self, bp: Blueprint) -> list[tuple[str, Any]]:
        return self.real.candidates(bp)

    def build(self, bp: Blueprint, device: torch.device) -> torch.nn.Module:
        return self.real.build(bp, device)

    def meta(self, bp: Blueprint, variant: Any) -> dict[str, Any]:
        return self.real.meta(bp, variant)

    def eager_meta(self, reason: str | None) -> dict[str, Any]:
        return self.real.eager_meta(reason)

    def static_dims(self, job: CompileJob) -> list[str]:
        return []  # the stub's stages fail whatever the shapes: no dim to hold

    def run(self, job: CompileJob) -> Built:
        self.runs.append(job.variant.name)
        job.meta["stub_started"] = True
        if self.decide_eager:
            raise EagerRoute("this kind runs eager here, by decision")
        if self.fail:
            stage(self.fail, lambda: 1 / 0)
        path = job.tmp / "artifact.bin"
        path.write_bytes(f"{self.kind}/{job.variant.name}/{sorted(job.ranges.items())}".encode())
        parity = {Blueprint.shape_label(s): ShapeParity(max_abs=0.0) for s in job.representative}
        return Built(path=path, guards=GUARDS, meta={"stub": True}, parity=parity, performance={})


@pytest.fixture
def stubs(monkeypatch: pytest.MonkeyPatch) -> dict[ArtifactKind, Stub]:
    out = {ArtifactKind.INFERENCE: Stub(InferencePipeline()), ArtifactKind.TRAINING: Stub(TrainingPipeline())}
    for kind, stub in out.items():
        monkeypatch.setitem(compiler.PIPELINES, kind, stub)
    return out


@pytest.fixture
def urza(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Urza(tmp_path / "urza.db") as u:
        yield u


@pytest.mark.parametrize("kind", list(ArtifactKind))
def test_a_compile_publishes_one_entry_of_its_kind_and_is_reused(urza, tiny_catalog, stubs, kind) -> None:  # type: ignore[no-untyped-def]
    bp = tiny_catalog.get("tiny_mlp")
    tezzeret = Tezzeret(urza)
    first = tezzeret.compile(bp, artifact=kind)
    entry = first.entry
    assert not first.reused and first.artifact is kind and first.route == "compiled"
    assert (entry.artifact, entry.variant, entry.profile, entry.engine, entry.status) == (
        kind.value,
        "default",
        "default",
        "aoti",
        "compiled",
    )
    assert entry.guards == GUARDS and entry.meta["stub"] and entry.meta["compile_seconds"] >= 0
    assert entry.meta["source_digest"] == source_digest(bp, bp.build())
    assert entry.parity == {
        "version": EVIDENCE_VERSION,
        "representative": {"batch=4": {"max_abs": 0.0}, "batch=16": {"max_abs": 0.0}},
    }
    urza.store.verify(entry.checksum, entry.artifact_size)
    again = tezzeret.compile(bp, artifact=kind)
    assert again.reused and again.entry.id == entry.id and stubs[kind].runs == ["default"]
    forced = tezzeret.compile(bp, artifact=kind, force=True)
    assert not forced.reused and forced.entry.id != entry.id and len(stubs[kind].runs) == 2


def test_the_content_hash_covers_the_artifact_kind(urza, tiny_catalog, stubs) -> None:  # type: ignore[no-untyped-def]
    bp = tiny_catalog.get("tiny_mlp")
    outcomes = Tezzeret(urza).compile_candidates(bp)
    assert [o.artifact for o in outcomes] == [ArtifactKind.INFERENCE, ArtifactKind.TRAINING]
    assert len({o.entry.content_hash for o in outcomes}) == 2
    only = Tezzeret(urza).compile_candidates(bp, artifacts=(ArtifactKind.TRAINING,))
    assert [o.reused for o in only] == [True]


def test_candidates_are_every_profile_and_variant_for_inference_and_one_training_artifact(
    urza, tiny_catalog, stubs
) -> None:  # type: ignore[no-untyped-def]
    bp = tiny_catalog.get("tiny_mlp")
    bucketed = Blueprint(
        name="bucketed",
        version=1,
        build=bp.build,
        inputs=bp.inputs,
        representative=({"batch": 2}, {"batch": 16}),
        buckets={"batch": [(1, 4), (5, 32)]},
        variants=("default", "freezing"),
    )
    outcomes = Tezzeret(urza).compile_candidates(bucketed)
    got = [(o.entry.artifact, o.entry.profile, o.entry.variant) for o in outcomes]
    assert got == [
        ("inference", "batch=1-4", "default"),
        ("inference", "batch=1-4", "freezing"),
        ("inference", "batch=5-32", "default"),
        ("inference", "batch=5-32", "freezing"),
        ("training", "default", "default"),
    ]
    training = outcomes[-1].entry
    assert training.meta["ranges"] == {"batch": [1, 32]}
    # The whole range only: training specializations are opt-in (ESPER_TRAINING_SPECIALIZATIONS).
    assert training.meta["profiles"] == ["default"]


@pytest.mark.parametrize("kind", list(ArtifactKind))
def test_a_failing_stage_stores_an_eager_fallback_naming_it(urza, tiny_catalog, stubs, kind, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(compiler.PIPELINES, kind, Stub(stubs[kind].real, fail="export"))
    outcome = Tezzeret(urza).compile(tiny_catalog.get("tiny_mlp"), artifact=kind)
    e = outcome.entry
    assert outcome.route == "eager" and (e.engine, e.status, e.artifact) == ("eager", "fallback", kind.value)
    assert e.failed_check == ("compile" if kind is ArtifactKind.INFERENCE else "train_compile")
    assert e.failure_reason and e.failure_reason.startswith("export failed: ZeroDivisionError")
    assert e.meta["failed_stage"] == "export" and e.meta["stub_started"] and e.id is not None
    if kind is ArtifactKind.TRAINING:
        assert e.meta["training"] == {"route": "eager", "reason": e.failure_reason}


def test_an_eager_decision_is_stored_without_a_failed_stage(urza, tiny_catalog, stubs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(compiler.PIPELINES, ArtifactKind.TRAINING, Stub(TrainingPipeline(), decide_eager=True))
    e = Tezzeret(urza).compile(tiny_catalog.get("tiny_mlp"), artifact="training").entry
    assert (e.engine, e.status, e.failure_reason) == ("eager", "fallback", "this kind runs eager here, by decision")
    assert "failed_stage" not in e.meta and e.meta["training"]["route"] == "eager"


def test_bad_requests_are_clear_errors(urza, tiny_catalog) -> None:  # type: ignore[no-untyped-def]
    bp = tiny_catalog.get("tiny_mlp")
    tezzeret = Tezzeret(urza)
    with pytest.raises(ValueError, match=r"unknown artifact kind 'onnx' \(known: inference, training\)"):
        tezzeret.compile(bp, artifact="onnx")
    with pytest.raises(ValueError, match="no shape profile 'batch=1-4'"):
        tezzeret.compile(bp, profile="batch=1-4")
    with pytest.raises(ValueError, match="profile must be 'default'"):
        tezzeret.compile(bp, artifact=ArtifactKind.TRAINING, profile="batch=1-4")
    with pytest.raises(ValueError, match="'default' variant only, not 'freezing'"):
        tezzeret.compile(bp, artifact=ArtifactKind.TRAINING, variant=VARIANTS["freezing"])
    assert urza.entries() == []


@pytest.mark.parametrize("kind", list(ArtifactKind))
def test_the_eager_route_writer_serves_every_kind(urza, tiny_catalog, kind) -> None:  # type: ignore[no-untyped-def]
    bp = tiny_catalog.get("tiny_mlp")
    evidence = {"performance": {"certification": {"batch=4": {}}}, "meta": {"note": "eager measured faster"}}
    e = Tezzeret(urza).store_eager_route(
        bp, artifact=kind, profile="default", guards=GUARDS, evidence=evidence, reason="eager measured faster"
    )
    assert (e.engine, e.status, e.variant, e.artifact) == ("eager", "certified", "eager", kind.value)
    assert (
        e.guards == GUARDS
        and e.performance == {**evidence["performance"], "version": EVIDENCE_VERSION}
        and e.meta["note"]
    )
    assert e.meta["source_digest"] == source_digest(bp, bp.build())
    if kind is ArtifactKind.TRAINING:
        assert e.meta["training"] == {"route": "eager", "reason": "eager measured faster"}
    weights = urza.store.verify(e.checksum, e.artifact_size)
    assert weights.stat().st_size == e.artifact_size
    # An eager route's identity differs from a compiled entry's of the same kind, and between kinds.
    other = next(k for k in ArtifactKind if k is not kind)
    twin = Tezzeret(urza).store_eager_route(bp, artifact=other, profile="default", guards=None, evidence={})
    assert twin.content_hash != e.content_hash and twin.guards is None
