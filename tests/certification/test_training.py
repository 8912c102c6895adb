"""Certification of training artifacts through the one skeleton (``Certification`` with ``ArtifactKind.TRAINING``):
the checks, the decision, a failed check, an eager training route, turning it off."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.artifacts.kinds import ArtifactKind
from esper.certification import plan, timing
from esper.certification.budgets import PROFILES
from esper.certification.results import Check, CheckResult, Outcome
from esper.certification.run import Certification
from esper.urza import Urza
from tests.support import training_catalog

pytestmark = pytest.mark.compiles

CATALOG_TRAINING = training_catalog()


def training_run(urza: Path, name: str = "tiny_bn") -> Certification:
    return Certification(CATALOG_TRAINING.get(name), ArtifactKind.TRAINING, urza, PROFILES["lenient"], recheck=True)


def test_training_certification_checks_and_decides(training_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "1")
    monkeypatch.setenv("ESPER_HYPOTHESIS_PROFILE", "esper-ci")  # derandomized: the same cases every run
    cert = training_run(training_copy)
    # The whole range; the specializations after it compile only where the compiled step cannot stay dynamic.
    candidate, *specializations = cert.candidates
    assert candidate == "default/default" and all("@" in cid for cid in specializations)
    compiled_result = cert.compile(candidate)
    entry = cert.candidates[candidate].entry
    assert compiled_result.passed and compiled_result.figures["entry"] == entry.id
    assert cert.candidates[candidate].reused and entry.engine == "aoti"  # same content hash: nothing compiles
    parity = cert.check_parity(candidate)
    covered = cert.coverage("default")
    planned = len(cert.cases("default"))
    assert parity.passed and parity.figures["coverage"] == covered.evidence()
    assert covered.value_cases == planned and covered.values_tried["batch"] == (31, 31)  # every size of 2..32
    assert cert.check_drawn_cases(candidate).passed
    contract = cert.check_contract(candidate)  # on the same calls: inputs, output, the seed's weights and buffers
    assert contract.passed and contract.figures["breaches"] == {}
    assert contract.figures["cases"] == planned + cert.candidates[candidate].drawn
    # A seed's weights through the training kernel's bind, and many alternating steps of one bound seed.
    weights = cert.check_weights(candidate)
    assert weights.passed and weights.figures["cases"] == 4 * plan.WEIGHT_CASES, weights.reason
    repeated = cert.check_repeated(candidate)
    assert repeated.passed and repeated.figures["weights"] == ["own", "scaled-x10#0"], repeated.reason
    assert cert.check_guards(candidate).passed
    checked = cert.candidates[candidate]
    # Each dim below and above its range, a wrong dtype and rank per input, each fixed dim off by one.
    assert checked.parity.cases == planned + checked.drawn and checked.drawn > 0
    assert checked.guards_refused == len(cert.refused_cases(candidate)) >= 5
    # Output, every gradient and every mutated buffer judged against float64 in every case; with NaN and inf
    # among the inputs, the output only.
    nonfinite = sum(case.values.regime == "nonfinite" for case in cert.cases("default"))
    assert nonfinite > 0
    assert {part: len(vs) for part, vs in checked.verdicts.items()} == {
        "output": checked.parity.cases,
        "gradient": checked.parity.cases - nonfinite,
        "buffer": checked.parity.cases - nonfinite,
    }
    for label in cert.labels():
        assert cert.compare_latency(candidate, label).passed
        comparison = checked.comparisons[label]
        assert comparison.rounds >= 8 and comparison.decision in timing.DECISIONS
    # Every check recorded its own result: selection sees the candidate passed, publish sees select and budgets.
    assert cert.select().passed and cert.check_budgets().passed
    (decision,) = cert.decisions.values()
    assert cert.publish().passed
    (published,) = cert.published
    with Urza(training_copy, readonly=True) as urza:
        compiled = urza.get(entry.id)  # type: ignore[arg-type]
    evidence = compiled.parity["certify"]
    assert evidence["cases"] == checked.parity.cases and evidence["coverage"]["value_cases"] == planned
    assert set(evidence["parts"]) == {"output", "gradient", "buffer"} and evidence["nondeterministic"] is False
    assert evidence["parts"]["gradient"]["failures"] == 0 and evidence["rule"]["reference"] == "float64"
    assert evidence["weights"]["certified_for"] == weights.figures["weights"] and not evidence["weights"]["folded"]
    assert set(compiled.performance["certify"]) == set(cert.labels())
    assert compiled.meta["certification"]["artifact"] == "training"
    assert "p95_ms" not in compiled.meta["certification"]["limits"]  # p95 budgets are the forward pass's
    assert published.artifact == ArtifactKind.TRAINING
    if decision.winner == candidate:
        assert published.id == entry.id and compiled.status == "certified"
    else:  # eager measured faster: the artifact is rejected by selection and an eager route is certified
        assert compiled.status == "rejected" and compiled.failed_check == "selection"
        assert published.engine == "eager" and published.status == "certified"


def test_a_failed_training_check_rejects_the_artifact(training_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "1")
    cert = training_run(training_copy)
    assert cert.compile("default/default").passed
    entry = cert.candidates["default/default"].entry
    cert.record(CheckResult(Check.PARITY, Outcome.FAILED, "gradient of fc.weight differs", "default/default"))
    with Urza(training_copy, readonly=True) as urza:
        rejected = urza.get(entry.id)  # type: ignore[arg-type]
    assert rejected.status == "rejected" and rejected.failed_check == "parity"
    assert rejected.failure_reason == "gradient of fc.weight differs"  # Esper's own words, nothing added


def test_a_training_eager_route_skips_its_checks_with_the_reason(
    training_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "1")
    cert = training_run(training_copy, "tiny_dropout")
    assert cert.compile("default/default").passed
    entry = cert.candidates["default/default"].entry
    assert entry.engine == "eager"
    guards = cert.check_guards("default/default")
    assert guards.outcome is Outcome.SKIPPED and f"eager fallback (entry #{entry.id})" in guards.reason


def test_training_certification_can_be_turned_off(training_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "0")
    cert = training_run(training_copy)
    result = cert.compile("default/default")
    assert result.outcome is Outcome.SKIPPED and "off" in result.reason
