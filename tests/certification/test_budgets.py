"""Latency budgets (esper.certification.budgets): limits scaled by the budget profile, and what a measurement breaks."""

from __future__ import annotations

from esper.blueprint import Budget
from esper.certification.budgets import PROFILES, Figures, Violation, check, limits

BUDGET = Budget(p95_ms={"batch=8": 2.0}, max_ratio=1.2)


def test_limits_scale_with_the_budget_profile() -> None:
    assert limits(BUDGET, PROFILES["cpu-2core"]) == ({"batch=8": 2.0}, 1.2)
    assert limits(BUDGET, PROFILES["lenient"]) == ({"batch=8": 8.0}, 1.2)
    assert limits(Budget(), PROFILES["cuda"]) == ({}, PROFILES["cuda"].max_ratio)


def test_p95_and_ratio_violations() -> None:
    slow = {"batch=8": Figures(compiled_p50=1.0, compiled_p95=3.0, eager_p50=0.5, eager_p95=0.6)}
    assert check(BUDGET, PROFILES["cpu-2core"], slow) == [
        Violation("batch=8", "p95 ms", 3.0, 2.0),
        Violation("batch=8", "compiled/eager p50 ratio", 2.0, 1.2),
    ]
    assert check(BUDGET, PROFILES["cpu-2core"], {"batch=8": Figures(1.0, 1.5, 1.0, 1.5)}) == []


def test_a_training_step_is_held_to_the_ratio_cap_only() -> None:
    # The blueprint's p95 limits are for its forward pass: a training step over them is not a violation.
    step = {"batch=8": Figures(compiled_p50=3.0, compiled_p95=3.0, eager_p50=2.9, eager_p95=3.1)}
    assert check(BUDGET, PROFILES["cpu-2core"], step, p95=False) == []
    slower = {"batch=8": Figures(compiled_p50=4.0, compiled_p95=4.0, eager_p50=2.0, eager_p95=2.0)}
    assert [v.metric for v in check(BUDGET, PROFILES["cpu-2core"], slower, p95=False)] == ["compiled/eager p50 ratio"]
