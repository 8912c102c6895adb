"""The weights and repeated-calls checks of the certification skeleton (Certification.check_weights,
check_repeated) and the shape design in the planned cases, without compiling: a stand-in kernel that runs the
module it serves (the blueprint's, or the seed's it was bound to), right or wrong under a condition. The
seeded compiled defects go through the real certification in test_contract_miscompiles_checks.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.blueprint import Blueprint, Dim, Input, Tolerance, seeded
from esper.certification import plan
from esper.certification.run import FOLDED
from esper.kasmina import COMPILED, EAGER
from esper.numerics import coverage
from esper.urza import Urza
from esper.urza.evidence import CertifiedParity, CertifiedWeights
from tests.support import stand_in_certification

Defect = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]


def clean(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
    return y


def linear() -> torch.nn.Module:
    with seeded(0):
        return torch.nn.Linear(4, 4).eval()


BP = Blueprint(
    name="w",
    version=1,
    build=linear,
    inputs=(Input("x", "float32", (Dim("batch", 1, 24), 4)),),
    representative=({"batch": 2}, {"batch": 8}),
    variants=("default",),
    tolerance=Tolerance(atol=1e-5, rtol=1e-5),
)


class StandIn:
    """What Kasmina's loaded kernel offers the checks: runs the module it serves, then ``defect`` (which sees
    the module, the input and the call's index); ``bind`` serves a seed's module the same way, or eager
    where ``folded`` (as Kasmina serves a seed through code that folded the weights in)."""

    route = COMPILED
    reason = ""

    def __init__(self, module: torch.nn.Module, defect: Defect, folded: bool = False, calls: list[int] | None = None):
        self.seed, self.defect, self.folded = module, defect, folded
        self.calls = calls if calls is not None else [0]  # shared by every seed bound from one kernel
        self.last_path = COMPILED

    def check(self, *args: Any) -> str | None:
        return None

    def bind(self, module: torch.nn.Module) -> StandIn:
        bound = StandIn(module, self.defect, self.folded, self.calls)
        bound.last_path = EAGER if self.folded else COMPILED
        return bound

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.seed(x)
        if self.last_path == EAGER:
            return y
        self.calls[0] += 1
        return self.defect(self.seed, x, y, self.calls[0])


def certification(
    tmp_path: Path,
    defect: Defect = clean,
    *,
    swappable: bool = True,
    serves: bool = False,
    constants: tuple[str, ...] = ("weight", "bias"),
) -> Any:
    meta = {"swappable": swappable, "constants": {n: {} for n in constants}}
    # serves: a stand-in for folded code that wrongly serves other weights compiled
    folded = not swappable and not serves
    return stand_in_certification(
        tmp_path, BP, lambda: StandIn(BP.build(), defect, folded=folded), max_batch=24, meta=meta
    )


def grows(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
    """Clamps the finite outputs at a bound the blueprint's weights never reach (weights ten times larger do)."""
    bound = 3.0 * x.abs().nan_to_num(nan=0.0, posinf=0.0).amax() + 1.0
    return torch.where(y.isfinite(), torch.minimum(torch.maximum(y, -bound), bound), y)


def test_a_kernel_wrong_once_the_weights_grow_is_rejected_by_weights_naming_the_set(tmp_path: Path) -> None:
    cert = certification(tmp_path, grows)
    assert cert.check_parity("default/default").passed  # exact at the blueprint's own weights
    result = cert.check_weights("default/default")
    assert result.failed and "weights scaled-x10#0" in result.reason and "output: " in result.reason, result.reason
    with Urza(cert.urza_path, readonly=True) as urza:
        entry = urza.get(cert.candidates["default/default"].entry.id)
    assert (entry.status, entry.failed_check) == ("rejected", "weights")


def test_a_right_kernel_is_certified_for_every_weight_set_and_the_evidence_says_which(tmp_path: Path) -> None:
    cert = certification(tmp_path)
    assert cert.check_parity("default/default").passed
    result = cert.check_weights("default/default")
    assert result.passed, result.reason
    assert result.figures["weights"] == ["own", "scaled-x10#0", "scaled-x0.1#0", "perturbed#0", "outliers#0"]
    assert result.figures["cases"] == 4 * plan.WEIGHT_CASES
    stored = CertifiedParity.from_json(cert.parity_evidence(cert.candidates["default/default"]))
    assert stored is not None and stored.weights == CertifiedWeights(
        certified_for=tuple(result.figures["weights"]), folded=False, held_own=(), cases=4 * plan.WEIGHT_CASES
    )


def test_weights_a_swappable_entry_folded_keep_the_blueprints_values_in_every_set(tmp_path: Path) -> None:
    own_bias = BP.build().bias.detach().clone()

    def folded_bias(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        # code that folded the bias computes with the blueprint's, whatever the seed holds
        return y - module.bias + own_bias

    assert certification(tmp_path, folded_bias).check_weights("default/default").failed
    (tmp_path / "held").mkdir()
    cert = certification(tmp_path / "held", folded_bias, constants=("weight",))
    result = cert.check_weights("default/default")
    assert result.passed and result.figures["held_own"] == ["bias"], result.reason
    assert cert.candidates["default/default"].weights.held_own == ("bias",)


def test_folded_code_is_certified_for_its_own_weights_only(tmp_path: Path) -> None:
    cert = certification(tmp_path, grows, swappable=False)
    result = cert.check_weights("default/default")
    assert result.passed and result.figures == {"weights": FOLDED}
    weights = cert.certified_parity(cert.candidates["default/default"]).weights
    assert weights is not None and (weights.certified_for, weights.folded) == (("own",), True)


def test_folded_code_that_serves_other_weights_compiled_is_rejected(tmp_path: Path) -> None:
    cert = certification(tmp_path, swappable=False, serves=True)
    result = cert.check_weights("default/default")
    assert result.failed and "folds the weights in, yet served weights scaled-x10#0 compiled" in result.reason


def test_a_seed_served_eager_cannot_certify_the_compiled_code(tmp_path: Path) -> None:
    cert = certification(tmp_path)
    cert.candidates["default/default"].kernel.folded = True  # binds run eager, though the row says swappable
    result = cert.check_weights("default/default")
    assert result.failed and result.reason.startswith("Kasmina ran eager for a seed's weights"), result.reason


def drifts_after(calls: int, by: float) -> Defect:
    def defect(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        return y + by if call > calls else y

    return defect


def test_a_kernel_that_goes_wrong_after_some_calls_is_rejected_by_repeated_naming_the_call(tmp_path: Path) -> None:
    cert = certification(tmp_path, drifts_after(5, 0.5))
    result = cert.check_repeated("default/default")
    assert result.failed and "repeated: call 5 (" in result.reason and "output: " in result.reason, result.reason


def test_a_drift_inside_the_tolerance_is_caught_by_reproducibility(tmp_path: Path) -> None:
    cert = certification(tmp_path, drifts_after(7, 1e-7))
    result = cert.check_repeated("default/default")
    assert result.failed and "differs from its own answer to the same call earlier" in result.reason, result.reason


def test_a_right_kernel_keeps_its_answers_over_alternating_shapes_and_weights(tmp_path: Path) -> None:
    cert = certification(tmp_path)
    result = cert.check_repeated("default/default")
    assert result.passed, result.reason
    figures = result.figures
    assert figures["weights"] == ["own", "scaled-x10#0"] and len(figures["shapes"]) == plan.REPEATED_SHAPES
    assert figures["calls"] == plan.REPEATED_ROUNDS * plan.REPEATED_SHAPES * 2
    # folded code alternates shapes with its own weights only
    (tmp_path / "folded").mkdir()
    folded = certification(tmp_path / "folded", swappable=False)
    assert folded.check_repeated("default/default").figures["weights"] == ["own"]


RESIDUE_RANGES = {"batch": (1, 16), "seq": (1, 16)}


@pytest.mark.parametrize("ranges", [RESIDUE_RANGES, {"batch": (1, 32), "height": (8, 64), "width": (8, 64)}])
def test_the_planned_cases_hold_the_covering_design_and_report_its_coverage(ranges: dict) -> None:
    bp = Blueprint(
        name="s",
        version=1,
        build=linear,
        inputs=(Input("x", "float32", (*(Dim(n, lo, hi) for n, (lo, hi) in ranges.items()), 4)),),
        representative=({n: (lo + hi) // 2 for n, (lo, hi) in ranges.items()},),
        variants=("default",),
    )
    cases = plan.parity_cases(bp, ranges)
    covered = plan.shape_coverage(cases, ranges)
    assert covered.residues_covered == covered.residues_total
    shapes = [dict(c.sizes) for c in cases]
    design, _ = coverage.shape_design(ranges, budget=plan.DESIGN_BUDGET)
    assert all(s in shapes for s in design)
    # without the design, the sweeps and sampled pairs leave residues of the products uncovered
    sweeps = coverage.plan(ranges, bp.representative, seeds=1, cap=plan.EVERY_SIZE_CAP, budget=plan.PAIR_BUDGET)
    assert coverage.shape_coverage([c.sizes for c in sweeps], ranges).residues_covered < covered.residues_total


def test_the_residue_of_a_product_is_met_by_the_plan() -> None:
    bp = Blueprint(
        name="r",
        version=1,
        build=linear,
        inputs=(Input("x", "float32", (Dim("batch", 1, 16), Dim("seq", 1, 16), 4)),),
        representative=({"batch": 4, "seq": 8},),
        variants=("default",),
    )
    rows = {c.sizes["batch"] * c.sizes["seq"] % 16 for c in plan.parity_cases(bp, RESIDUE_RANGES)}
    assert rows == set(range(16))


def test_the_weights_evidence_reader_is_tolerant() -> None:
    assert CertifiedWeights.from_json({}) is None and CertifiedWeights.from_json("x") is None
    odd = CertifiedWeights.from_json({"certified_for": ["own", 3], "folded": "yes", "cases": -1, "new": 1})
    assert odd == CertifiedWeights(certified_for=("own",), extra={"new": 1})
    assert CertifiedParity.from_json({"cases": 3}).weights is None  # a row of version 1
