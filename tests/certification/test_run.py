"""One certification skeleton for every artifact kind (esper.certification.run): candidates per kind, the
route decision, and outcomes kept per ``(kind, check)``, never routed by a test's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.variants import DEFAULT_VARIANTS
from esper.blueprint import Blueprint, Dim, Input
from esper.certification import plan
from esper.certification.budgets import PROFILES
from esper.certification.kinds import InferenceChecks, TrainingChecks
from esper.certification.results import Check, CheckResult, Outcome
from esper.certification.run import BlueprintCertification
from esper.urza.evidence import geomean


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
    buckets = [f"{p}/{v}" for p in ("batch=1-4", "batch=5-64") for v in DEFAULT_VARIANTS]
    assert list(inference.candidates)[: len(buckets)] == buckets
    # Then the exact-size specializations, compiled only where export cannot keep a dim dynamic.
    assert all("@" in cid for cid in list(inference.candidates)[len(buckets) :])
    assert len(DEFAULT_VARIANTS) >= 2
    # Training: one artifact over the whole declared range, default variant, then its exact-size
    # specializations where they are switched on (ESPER_TRAINING_SPECIALIZATIONS).
    whole, *specializations = training.candidates
    assert whole == "default/default"
    assert all("@" in cid and cid.endswith("/default") for cid in specializations)
    assert training.candidates["default/default"].ranges == {"batch": (1, 64)}
    assert plan.latency_cases(bucketed(), ArtifactKind.TRAINING) == [
        ("default/default", "batch=2"),
        ("default/default", "batch=8"),
    ]


def test_outcomes_are_kept_by_kind_and_check(certification: BlueprintCertification) -> None:
    # The same check name under both kinds: neither overwrites the other, whatever the test was called.
    failed = CheckResult(Check.PARITY, Outcome.FAILED, "gradient of w differs", "default/default")
    passed = CheckResult(Check.PARITY, Outcome.PASSED, "", "batch=1-4/default")
    selected = CheckResult(Check.SELECT, Outcome.PASSED)
    certification.record("training", failed)
    certification.record("inference", passed)
    certification.record("inference", selected)
    assert certification.outcomes() == {
        (ArtifactKind.TRAINING, Check.PARITY, "default/default"): failed,
        (ArtifactKind.INFERENCE, Check.PARITY, "batch=1-4/default"): passed,
        (ArtifactKind.INFERENCE, Check.SELECT, None): selected,
    }
    assert ("parity", "default/default") not in certification["inference"].outcomes


def test_a_check_keeps_its_worst_outcome(certification: BlueprintCertification) -> None:
    run = certification["inference"]
    for outcome in ("passed", "failed", "passed", "skipped"):
        run.record(CheckResult(Check.PARITY, Outcome(outcome), outcome, "batch=1-4/default"))
    assert run.outcomes[(Check.PARITY, "batch=1-4/default")].outcome is Outcome.FAILED


def test_training_checks_are_off_with_the_environment(
    certification: BlueprintCertification, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "0")
    training = certification["training"]
    assert "ESPER_CERTIFY_TRAINING=0" in (training.skip_reason(training.candidates["default/default"]) or "")
    result = training.compile("default/default")
    assert result.outcome is Outcome.SKIPPED and "off" in result.reason
    assert training.outcomes[(Check.COMPILE, "default/default")] == result
    assert certification["inference"].kind.disabled() is None
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "1")
    assert training.kind.disabled() is None


def test_geomean() -> None:
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert geomean(iter([3.0])) == pytest.approx(3.0)
    for bad in ([], [1.0, 0.0], [-1.0]):
        with pytest.raises(ValueError, match="positive"):
            geomean(bad)
