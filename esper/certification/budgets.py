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
    """One broken limit: the shape label, which metric, what was measured and the limit."""

    label: str
    metric: str
    measured: float
    limit: float

    def __str__(self) -> str:
        return f"{self.label}: {self.metric} {self.measured:.4g} exceeds the limit {self.limit:.4g}"


@dataclass(frozen=True)
class Figures:
    """Measured latency at one representative shape, in milliseconds: the route's (compiled, or eager where
    certification routes eager) and eager's. ``paired_ratio``, when given, is the route/eager ratio measured
    in interleaved rounds (:func:`~.timing.compare`: the median of per-round ratios), which a neighbour's
    load cancels out of; it is the ratio the cap is checked against, instead of the ratio of two p50s."""

    compiled_p50: float
    compiled_p95: float
    eager_p50: float
    eager_p95: float
    paired_ratio: float | None = None

    @property
    def ratio(self) -> float:
        if self.paired_ratio is not None:
            return self.paired_ratio
        return self.compiled_p50 / self.eager_p50 if self.eager_p50 > 0 else float("inf")


def limits(budget: Budget, profile: BudgetProfile) -> tuple[dict[str, float], float]:
    """The effective p95 limits (ms, by label) and ratio cap for ``budget`` on ``profile``'s class."""
    p95 = {label: ms * profile.p95_scale for label, ms in budget.p95_ms.items()}
    return p95, budget.max_ratio if budget.max_ratio is not None else profile.max_ratio


def check(
    budget: Budget, profile: BudgetProfile, figures: Mapping[str, Figures], *, p95: bool = True
) -> list[Violation]:
    """Every budget the measured ``figures`` break (empty: within budget). ``p95=False`` checks the ratio cap
    only: a blueprint declares its p95 limits for its forward pass, not for a training step."""
    p95_limits, max_ratio = limits(budget, profile)
    out: list[Violation] = []
    for label, f in figures.items():
        if p95 and label in p95_limits and f.compiled_p95 > p95_limits[label]:
            out.append(Violation(label, "p95 ms", f.compiled_p95, p95_limits[label]))
        if f.ratio > max_ratio:
            out.append(Violation(label, "compiled/eager p50 ratio", f.ratio, max_ratio))
    return out
