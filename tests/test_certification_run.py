"""One certification skeleton for every artifact kind (esper.certification.run): candidates per kind, the
route decision, and outcomes kept per ``(kind, check)``, never routed by a test's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.artifacts import ArtifactKind
from esper.blueprint import Blueprint, Dim, Input
from esper.budgets import PROFILES
from esper.certification import plan
from esper.certification.kinds import InferenceChecks, TrainingChecks
from esper.certification.run import BlueprintCertification, Outcome
from esper.evidence import geomean
from esper.variants import DEFAULT_VARIANTS


def bucketed() -> Blueprint:
    return Blueprint(
        name="b",
        version=1,
        build=lambda: None,
        inputs=(Input("x", "float32", (Dim("batch", 1, 64), 4)),),
        representative=({"batch": 2}, {"batch": 8}),
        buckets={"batch": [(1, 4), (5, 64)]},
    )


@pytest.fixture
def certification(tmp_path: Path) -> BlueprintCertification:
    return BlueprintCertification.create(bucketed(), tmp_path / "urza.db", PROFILES["cpu-2core"])


def test_each_kind_has_its_own_candidates_and_checks(certification: BlueprintCertification) -> None:
    inference, training = certification["inference"], certification[ArtifactKind.TRAINING]
    assert isinstance(inference.kind, InferenceChecks) and isinstance(training.kind, TrainingChecks)
    # Inference: every profile under every variant the blueprint declares (here the default set).
    assert list(inference.candidates) == [f"{p}/{v}" for p in ("batch=1-4", "batch=5-64") for v in DEFAULT_VARIANTS]
    assert len(DEFAULT_VARIANTS) >= 2
    # Training: one artifact over the whole declared range, default variant.
    assert list(training.candidates) == ["default/default"]
    assert training.candidates["default/default"].ranges == {"batch": (1, 64)}
    assert plan.latency_cases(bucketed(), ArtifactKind.TRAINING) == [
        ("default/default", "batch=2"),
        ("default/default", "batch=8"),
    ]


def test_outcomes_are_kept_by_kind_and_check(certification: BlueprintCertification) -> None:
    # The same check name under both kinds: neither overwrites the other, whatever the test was called.
    certification.record("training", Outcome("parity", "failed", "gradient of w differs", "default/default"))
    certification.record("inference", Outcome("parity", "passed", "", "batch=1-4/default"))
    certification.record("inference", Outcome("select", "passed"))
    assert certification.outcomes() == {
        (ArtifactKind.TRAINING, "parity", "default/default"): Outcome(
            "parity", "failed", "gradient of w differs", "default/default"
        ),
        (ArtifactKind.INFERENCE, "parity", "batch=1-4/default"): Outcome("parity", "passed", "", "batch=1-4/default"),
        (ArtifactKind.INFERENCE, "select", None): Outcome("select", "passed"),
    }
    assert ("parity", "default/default") not in certification["inference"].outcomes


def test_a_check_keeps_its_worst_outcome(certification: BlueprintCertification) -> None:
    run = certification["inference"]
    for outcome in ("passed", "failed", "passed", "skipped"):
        run.record(Outcome("parity", outcome, outcome, "batch=1-4/default"))
    assert run.outcomes[("parity", "batch=1-4/default")].outcome == "failed"


def test_training_checks_are_off_with_the_environment(
    certification: BlueprintCertification, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "0")
    training = certification["training"]
    assert "ESPER_CERTIFY_TRAINING=0" in (training.skip_reason(training.candidates["default/default"]) or "")
    with pytest.raises(pytest.skip.Exception, match="off"):
        training.compile("default/default")
    assert certification["inference"].kind.disabled() is None
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "1")
    assert training.kind.disabled() is None


def test_geomean() -> None:
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert geomean(iter([3.0])) == pytest.approx(3.0)
    for bad in ([], [1.0, 0.0], [-1.0]):
        with pytest.raises(ValueError, match="positive"):
            geomean(bad)
