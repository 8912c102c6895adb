"""Latency budgets: a blueprint's own limits, scaled by the budget profile of the machine class.

A blueprint declares p95 milliseconds per representative shape for the reference class (``cpu-2core``) and
optionally a maximum compiled/eager ratio. A profile scales the p95 limits for its class and supplies the
ratio default. Checking is a pure function of the measured figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from esper.blueprint import Budget


@dataclass(frozen=True)
class BudgetProfile:
    """A machine class: how its p95 limits relate to the reference class, and the default ratio cap."""

    name: str
    p95_scale: float
    max_ratio: float
    description: str


PROFILES = {
    p.name: p
    for p in (
        BudgetProfile("cpu-2core", 1.0, 1.5, "2-core x86-64 CPU (CI, the reference class)"),
        BudgetProfile("cpu-workstation", 0.5, 1.25, "8+ core x86-64 CPU"),
        BudgetProfile("cuda", 0.25, 1.25, "one data-centre GPU"),
        BudgetProfile("lenient", 4.0, 2.0, "noisy shared machines: catches only gross regressions"),
    )
}


@dataclass(frozen=True)
class Violation:
    label: str
    metric: str
    measured: float
    limit: float

    def __str__(self) -> str:
        return f"{self.label}: {self.metric} {self.measured:.4g} exceeds the limit {self.limit:.4g}"


@dataclass(frozen=True)
class Figures:
    """Measured latency at one representative shape, in milliseconds: the route's (compiled, or eager where
    certification routes eager) and eager's."""

    compiled_p50: float
    compiled_p95: float
    eager_p50: float
    eager_p95: float

    @property
    def ratio(self) -> float:
        return self.compiled_p50 / self.eager_p50 if self.eager_p50 > 0 else float("inf")


def limits(budget: Budget, profile: BudgetProfile) -> tuple[dict[str, float], float]:
    """The effective p95 limits (ms, by label) and ratio cap for ``budget`` on ``profile``'s class."""
    p95 = {label: ms * profile.p95_scale for label, ms in budget.p95_ms.items()}
    return p95, budget.max_ratio if budget.max_ratio is not None else profile.max_ratio


def check(budget: Budget, profile: BudgetProfile, figures: Mapping[str, Figures]) -> list[Violation]:
    """Every budget the measured ``figures`` break (empty: within budget)."""
    p95_limits, max_ratio = limits(budget, profile)
    out: list[Violation] = []
    for label, f in figures.items():
        if label in p95_limits and f.compiled_p95 > p95_limits[label]:
            out.append(Violation(label, "p95 ms", f.compiled_p95, p95_limits[label]))
        if f.ratio > max_ratio:
            out.append(Violation(label, "compiled/eager p50 ratio", f.ratio, max_ratio))
    return out
