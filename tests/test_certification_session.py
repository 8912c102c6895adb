"""The certify session (esper.certification.session): a generated test's outcome reaches the certification of
the artifact kind its parameters name, under its check, never routed by the test's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.artifacts import ArtifactKind
from esper.blueprint import Blueprint, Dim, Input
from esper.certification.run import BlueprintCertification, Outcome
from esper.certification.session import CertifySession
from esper.settings import Settings

BP = Blueprint(
    name="b",
    version=1,
    build=lambda: None,
    inputs=(Input("x", "float32", (Dim("batch", 1, 64), 4)),),
    representative=({"batch": 2},),
)


@pytest.fixture
def session(tmp_path: Path) -> CertifySession:
    settings = Settings(root=tmp_path, urza=tmp_path / "urza.db", blueprint_paths=(), budget_profile="cpu-2core")
    s = CertifySession(settings=settings, build_dir=tmp_path / "build", enabled=True)
    s.runs["b"] = BlueprintCertification.create(BP, settings.urza, s.budget_profile)
    return s


def test_a_test_outcome_is_recorded_by_kind_check_and_candidate(session: CertifySession) -> None:
    session.record_test("b", "test_parity", {"artifact": "training", "candidate": "default/default"}, "passed", "")
    session.record_test(
        "b", "test_latency", {"artifact": "inference", "path": "eager", "shape": "batch=2"}, "passed", ""
    )
    session.record_test(
        "b", "test_latency", {"artifact": "inference", "path": "default/freezing", "shape": "batch=2"}, "skipped", "s"
    )
    session.record_test("b", "test_select", {"artifact": "training"}, "passed", "")
    session.record_test("b", "test_declaration", {}, "failed", "not a check")
    assert set(session.runs["b"].outcomes()) == {
        (ArtifactKind.TRAINING, "parity", "default/default"),
        (ArtifactKind.INFERENCE, "latency", None),
        (ArtifactKind.INFERENCE, "latency", "default/freezing"),
        (ArtifactKind.TRAINING, "select", None),
    }
    assert session.runs["b"]["inference"].outcomes[("latency", "default/freezing")] == Outcome(
        "latency", "skipped", "s", "default/freezing"
    )


def test_an_unknown_blueprint_is_ignored(session: CertifySession) -> None:
    session.record_test("other", "test_parity", {"artifact": "training", "candidate": "default/default"}, "failed", "")
    assert session.runs["b"].outcomes() == {}
