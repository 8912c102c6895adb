"""The parity check of the certification skeleton (Certification.check_parity) without compiling: a stand-in
kernel that wraps the module, right or wrong under a condition. The float64 rule itself is tested in
tests/numerics/test_parity.py; here, that certification runs it over the planned cases, stops at the first failing
one naming it, reports nondeterministic eager, computes each case's references once per profile, and
records coverage and both RMSEs in the evidence."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded
from esper.certification import plan
from esper.certification.results import Check, CheckFailure
from esper.certification.run import Certification
from esper.kasmina import COMPILED
from esper.urza import Urza
from tests.support import stand_in_certification


class Noisy(torch.nn.Module):
    """A linear layer plus fresh random noise: eager differs between two identical runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.rand(x.shape)


def linear() -> torch.nn.Module:
    with seeded(0):
        return torch.nn.Linear(4, 4).eval()


def noisy() -> torch.nn.Module:
    with seeded(0):
        return Noisy().eval()


def blueprint(build: Callable[[], torch.nn.Module] = linear, variants: tuple[str, ...] = ("default",)) -> Blueprint:
    return Blueprint(
        name="p",
        version=1,
        build=build,
        inputs=(Input("x", "float32", (Dim("batch", 1, 24), 4)),),
        representative=({"batch": 2}, {"batch": 8}),
        variants=variants,
        tolerance=Tolerance(atol=1e-5, rtol=1e-5),
    )


class StandIn:
    """What Kasmina's loaded kernel offers the parity check, running ``module`` then ``defect``."""

    route = COMPILED
    reason = ""
    last_path = COMPILED

    def __init__(self, module: torch.nn.Module, defect: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.module, self.defect = module, defect

    def check(self, *args: Any) -> str | None:
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.defect(x, self.module(x))


def certification(tmp_path: Path, bp: Blueprint, defect: Any = lambda x, y: y) -> Certification:
    # Real rows: a failed check rejects its candidate's entry in Urza.
    return stand_in_certification(tmp_path, bp, lambda: StandIn(bp.build(), defect), max_batch=24)


def test_a_right_kernel_passes_every_planned_case_with_coverage_in_the_evidence(tmp_path: Path) -> None:
    cert = certification(tmp_path, blueprint())
    assert cert.check_parity("default/default").passed
    covered = cert.coverage("default")
    assert covered.values_tried == {"batch": (24, 24)} and covered.value_cases == len(cert.cases("default"))
    assert set(covered.regimes) == {"unit", "tiny", "large", "some-zeros", "all-zeros", "mixed", "nonfinite"}
    evidence = cert.parity_evidence(cert.candidates["default/default"])
    assert evidence["cases"] == covered.value_cases and evidence["parts"]["output"]["failures"] == 0
    assert evidence["rmse_ratio"] == pytest.approx(1.0) and evidence["coverage"]["shapes"] == 24


def test_a_kernel_wrong_at_one_batch_size_is_rejected_naming_the_case(tmp_path: Path) -> None:
    cert = certification(tmp_path, blueprint(), lambda x, y: y + 1e-3 * (x.shape[0] == 13))
    result = cert.check_parity("default/default")
    assert result.failed and result.error is None
    assert re.search(r"at \{'batch': 13\}, \S+ seed 0: output: RMSE against float64", result.reason)
    # The check recorded its own result, and the candidate's entry holds Esper's words, not a test runner's.
    assert cert.outcomes[(Check.PARITY, "default/default")] == result
    with Urza(cert.urza_path, readonly=True) as urza:
        (entry,) = urza.entries("p")
    assert entry.status == "rejected" and entry.failed_check == "parity" and entry.failure_reason == result.reason


def test_a_kernel_that_loses_precision_inside_the_tolerance_is_rejected(tmp_path: Path) -> None:
    bp = blueprint()
    bp = Blueprint(**{**bp.__dict__, "tolerance": Tolerance(atol=1e-2, rtol=1e-2)})
    cert = certification(tmp_path, bp, lambda x, y: y.to(torch.bfloat16).float())
    result = cert.check_parity("default/default")
    assert result.failed and re.search(r"output: RMSE against float64 .* exceeds", result.reason)


def test_a_crash_in_a_check_is_a_failure_with_its_type_and_message(tmp_path: Path) -> None:
    def crash(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    cert = certification(tmp_path, blueprint(), crash)
    result = cert.check_parity("default/default")
    assert result.failed and result.reason == "RuntimeError: kernel exploded"
    assert isinstance(result.error, RuntimeError)
    with Urza(cert.urza_path, readonly=True) as urza:
        (entry,) = urza.entries("p")
    assert entry.status == "rejected" and entry.failure_reason == "RuntimeError: kernel exploded"
    with pytest.raises(CheckFailure, match="parity failed: RuntimeError"):
        result.raise_for_outcome()


def test_nondeterministic_eager_is_reported_not_compared(tmp_path: Path) -> None:
    cert = certification(tmp_path, blueprint(noisy))
    result = cert.check_parity("default/default")
    assert result.failed and "nondeterministic" in result.reason
    assert cert.candidates["default/default"].nondeterministic is True


def test_each_cases_references_are_computed_once_for_the_profiles_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert = certification(tmp_path, blueprint(variants=("default", "freezing")))
    calls = []
    expected = cert.kind.expected
    monkeypatch.setattr(cert.kind, "expected", lambda args, seed: calls.append(1) or expected(args, seed))
    for candidate in ("default/default", "default/freezing"):
        assert cert.check_parity(candidate).passed
    assert len(calls) == len(cert.cases("default"))


def test_the_plan_keeps_every_size_and_value_regime_for_the_catalogs_shapes() -> None:
    cases = plan.parity_cases(blueprint(), {"batch": (1, 24)})
    assert {c.sizes["batch"] for c in cases} == set(range(1, 25))
    # Representative and edge shapes meet every regime; the smallest representative shape, every regime under
    # three seeds.
    regimes = {"unit", "tiny", "large", "some-zeros", "all-zeros", "mixed", "nonfinite"}
    for batch in (1, 2, 8, 23, 24):
        assert {c.values.regime for c in cases if c.sizes == {"batch": batch}} == regimes
    smallest = {(c.values.regime, c.values.seed) for c in cases if c.sizes == {"batch": 2}}
    assert smallest == {(r, k) for r in regimes for k in range(3)}
