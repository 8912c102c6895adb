"""The contract check (Certification.check_contract) and the non-finite regime through plain calls of the
library, without compiling: a stand-in kernel that wraps the module, honest or with a seeded defect the
output values do not show. The clauses' own rules are tested in test_contract.py; here, that certification
judges them on the very calls parity makes, and names the clause, the tensor and the case."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded
from esper.catalog import load_catalog
from esper.certification.results import Check, Outcome
from esper.certification.run import Certification
from esper.kasmina import COMPILED
from esper.numerics.inputs import Regime, make_inputs
from esper.numerics.parity import float64_reference, judge
from esper.urza import Urza
from tests.support import stand_in_certification

BLUEPRINTS = Path(__file__).resolve().parents[2] / "blueprints"


def linear() -> torch.nn.Module:
    with seeded(0):
        return torch.nn.Linear(4, 4).eval()


BP = Blueprint(
    name="c",
    version=1,
    build=linear,
    inputs=(Input("x", "float32", (Dim("batch", 1, 12), 4)),),
    representative=({"batch": 2},),
    variants=("default",),
    tolerance=Tolerance(atol=1e-5, rtol=1e-5),
)


class StandIn:
    """What Kasmina's loaded kernel offers the checks: ``call(module, x)`` in place of the compiled code."""

    route = COMPILED
    reason = ""
    last_path = COMPILED

    def __init__(self, module: torch.nn.Module, call: Callable[[torch.nn.Module, torch.Tensor], Any]):
        self.module, self.call = module, call

    def check(self, *args: Any) -> str | None:
        return None

    def __call__(self, x: torch.Tensor) -> Any:
        return self.call(self.module, x)


def certification(tmp_path: Path, call: Callable[[torch.nn.Module, torch.Tensor], Any]) -> Certification:
    return stand_in_certification(tmp_path, BP, lambda: StandIn(BP.build(), call), max_batch=12)


def honest(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def writes_its_input(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = m(x)
    x.mul_(0.5)  # after the output is computed: the output is exact
    return y


def column_major(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x).t().contiguous().t()  # eager's values, in a layout a caller's .view() cannot use


def hides_nonfinite(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(torch.nan_to_num(x, 0.0, 0.0, 0.0))


CANDIDATE = "default/default"


def test_an_honest_kernel_keeps_the_contract_on_every_call_parity_made(tmp_path: Path) -> None:
    cert = certification(tmp_path, honest)
    parity = cert.check_parity(CANDIDATE)
    assert parity.passed, parity.reason
    assert "nonfinite" in parity.figures["coverage"]["regimes"]  # NaN/inf inputs among the planned cases
    contract = cert.check_contract(CANDIDATE)
    assert contract.passed, contract.reason
    # One output and one input per call: the same calls parity judged, none run again.
    assert contract.figures == {
        "cases": parity.figures["cases"],
        "tensors": 2 * parity.figures["cases"],
        "breaches": {},
    }


def test_a_kernel_that_writes_into_its_input_passes_parity_and_breaks_the_contract(tmp_path: Path) -> None:
    cert = certification(tmp_path, writes_its_input)
    assert cert.check_parity(CANDIDATE).passed  # the values are exact
    result = cert.check_contract(CANDIDATE)
    assert result.failed and result.error is None
    assert "breaks the contract: mutation: input 0: written by the call" in result.reason
    assert "eager writes nothing (at {'batch': " in result.reason
    # A failed contract check rejects the candidate in Urza with Esper's words, as every check does.
    with Urza(cert.urza_path, readonly=True) as urza:
        (entry,) = urza.entries("c")
    assert (entry.status, entry.failed_check, entry.failure_reason) == ("rejected", "contract", result.reason)
    assert not cert.passed(cert.candidates[CANDIDATE])


def test_an_output_in_another_layout_breaks_the_metadata_clause(tmp_path: Path) -> None:
    cert = certification(tmp_path, column_major)
    assert cert.check_parity(CANDIDATE).passed
    result = cert.check_contract(CANDIDATE)
    assert result.failed and "metadata: output: not contiguous in torch.contiguous_format" in result.reason


def test_a_kernel_that_hides_nan_and_inf_is_rejected_by_parity_in_the_nonfinite_regime(tmp_path: Path) -> None:
    cert = certification(tmp_path, hides_nonfinite)
    result = cert.check_parity(CANDIDATE)
    assert result.failed and ", nonfinite seed " in result.reason
    assert "non-finite placement differs" in result.reason and "compiled finite where eager is" in result.reason


def test_contract_skips_where_parity_judged_no_call(tmp_path: Path) -> None:
    cert = certification(tmp_path, honest)
    result = cert.check_contract(CANDIDATE)
    assert result.outcome is Outcome.SKIPPED and "parity judged no call" in result.reason
    assert cert.outcomes[(Check.CONTRACT, CANDIDATE)] == result


def test_where_eager_overflows_and_float64_does_not_a_finite_answer_near_float64_passes_parity() -> None:
    """The catalog's residual_mlp at |x| ~ 1e20: eager's output is NaN where its float32 intermediates
    overflow, the float64 reference is finite. A kernel that gives float64's values (rounded to float32) is no
    fault; one that gives other finite values there is."""
    bp = load_catalog([BLUEPRINTS]).get("residual_mlp")
    module = bp.build().eval()
    args = make_inputs(bp, dict(bp.representative[0]), Regime(scale=1e20))
    with torch.no_grad():
        eager = module(*args)
    exact = float64_reference(module, args)
    assert bool(eager.isnan().any()) and bool(exact.isfinite().all())
    tol = bp.tolerance
    assert judge(exact.float(), eager, exact, atol=tol.atol, rtol=tol.rtol).passed
    wrong = judge(torch.zeros_like(eager), eager, exact, atol=tol.atol, rtol=tol.rtol)
    assert not wrong.passed and "compiled finite where eager is NaN and float64 finite" in wrong.reason
