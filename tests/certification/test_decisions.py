"""The decision rule (esper.certification.run.choose): interleaved comparisons with confidence, budgets that
judge the route that will serve, and rejection only when no route meets a declared budget."""

from __future__ import annotations

from typing import Any

import pytest

from esper.blueprint import Budget
from esper.certification import timing
from esper.certification.budgets import PROFILES, Figures, check
from esper.certification.run import NO_CONTENDER, choose, eager_figures, figures, wins

CPU = PROFILES["cpu-2core"]  # ratio cap 1.5
LABELS = ["batch=2", "batch=8"]


def cmp(
    decision: str, ratio: float, eager_ms: float = 1.0, p95_ms: float | None = None, spread: float = 0.02
) -> timing.Comparison:
    """A comparison as timing.compare returns it: candidate p50 = ratio x eager's, times in seconds, and 16
    per-round ratios spread +-``spread`` around ``ratio``."""
    c50 = ratio * eager_ms / 1e3
    return timing.Comparison(
        decision, ratio, ratio * 0.95, ratio * 1.05, 0.05, 0.96, c50, eager_ms / 1e3,
        candidate_p95=(p95_ms if p95_ms is not None else ratio * eager_ms * 1.2) / 1e3,
        eager_p95=eager_ms * 1.2 / 1e3,
        ratios=tuple(ratio * (1 + spread * (k / 7.5 - 1)) for k in range(16)),
    )  # fmt: skip


def both(decision: str, ratio: float, **kw: Any) -> dict[str, timing.Comparison]:
    return {label: cmp(decision, ratio, **kw) for label in LABELS}


def test_a_confident_win_at_one_shape_and_no_loss_elsewhere_wins() -> None:
    assert wins({"a": cmp(timing.WINS, 0.8), "b": cmp(timing.EVEN, 0.97)})
    assert not wins({"a": cmp(timing.WINS, 0.8), "b": cmp(timing.LOSES, 1.2)})
    # Undecided after the cap: it might be slower there, so the profile stays on eager.
    assert not wins({"a": cmp(timing.WINS, 0.8), "b": cmp(timing.INCONCLUSIVE, 0.9)})
    assert not wins({"a": cmp(timing.EVEN, 0.96), "b": cmp(timing.EVEN, 0.97)})


def test_the_fastest_winner_within_budget_is_routed() -> None:
    d = choose("p", LABELS, {"p/default": both(timing.WINS, 0.8), "p/freezing": both(timing.WINS, 0.6)}, Budget(), CPU)
    assert (d.winner, d.over_budget) == ("p/freezing", ())
    assert d.ratio == pytest.approx(0.6) and "wins: candidate/eager 0.600" in d.note


def test_a_later_winner_takes_the_route_only_when_faster_by_the_margin_with_confidence() -> None:
    """Two ratios measured at different moments differ by noise: a winner faster by a hair, or faster but
    with a spread too wide to be sure (a busy machine), must not take the route from the first-listed one
    (the route would flip from run to run); faster by more than the margin with confidence, it does."""
    scored = {"p/default": both(timing.WINS, 0.80), "p/freezing": both(timing.WINS, 0.78)}
    d = choose("p", LABELS, scored, Budget(), CPU)
    assert d.winner == "p/default" and d.ratio == pytest.approx(0.80)
    assert "preferred to p/freezing at 0.78x, not faster by 5% with confidence" in d.note
    scored["p/freezing"] = both(timing.WINS, 0.70)
    assert choose("p", LABELS, scored, Budget(), CPU).winner == "p/freezing"
    scored["p/freezing"] = both(timing.WINS, 0.70, spread=0.4)  # as fast on median, but all over the place
    assert choose("p", LABELS, scored, Budget(), CPU).winner == "p/default"
    # Faster at one shape but surely slower at another: not faster.
    mixed = {"batch=2": cmp(timing.WINS, 0.6), "batch=8": cmp(timing.WINS, 0.9)}
    scored["p/freezing"] = mixed
    assert choose("p", LABELS, scored, Budget(), CPU).winner == "p/default"
    # Order is the blueprint's variant order, not the names'.
    flipped = {"p/freezing": both(timing.WINS, 0.80), "p/default": both(timing.WINS, 0.78)}
    assert choose("p", LABELS, flipped, Budget(), CPU).winner == "p/freezing"


def test_an_inconclusive_comparison_routes_eager_and_says_so() -> None:
    d = choose("p", LABELS, {"p/default": both(timing.INCONCLUSIVE, 0.9)}, Budget(), CPU)
    assert d.winner is None and d.over_budget == ()
    assert "inconclusive: candidate/eager 0.900" in d.note and "with confidence" in d.note


def test_a_winner_over_its_p95_budget_is_not_routed_eager_is() -> None:
    # The candidate wins on p50 but its p95 breaks the limit at batch=8; eager's p95 (1.2 ms) is within it.
    scored = {"p/default": {"batch=2": cmp(timing.WINS, 0.8), "batch=8": cmp(timing.WINS, 0.8, p95_ms=5.0)}}
    d = choose("p", LABELS, scored, Budget(p95_ms={"batch=8": 2.0}), CPU)
    assert d.winner is None and d.over_budget == ()
    assert "p/default: over budget (batch=8: p95 ms 5 exceeds the limit 2)" in d.note


def test_a_candidate_within_budget_serves_where_eager_is_not() -> None:
    # Eager's p95 at batch=8 (12 ms) breaks the 10 ms limit; the candidate's (9 ms) does not, though it only
    # breaks even on p50: it is the only route within budget.
    scored = {"p/default": {label: cmp(timing.EVEN, 0.97, eager_ms=10.0, p95_ms=9.0) for label in LABELS}}
    d = choose("p", LABELS, scored, Budget(p95_ms={"batch=8": 10.0}), CPU)
    assert d.winner == "p/default" and d.over_budget == ()
    assert "the only route within budget (eager: batch=8: p95 ms 12 exceeds the limit 10)" in d.note


def test_no_route_within_budget_is_rejected_with_every_routes_figures() -> None:
    scored = {"p/default": both(timing.WINS, 0.8, eager_ms=10.0)}  # candidate p95 9.6 ms, eager's 12 ms
    d = choose("p", LABELS, scored, Budget(p95_ms={"batch=2": 1.0}), CPU)
    assert d.winner is None
    assert d.over_budget == (
        "eager: batch=2: p95 ms 12 exceeds the limit 1",
        "p/default: batch=2: p95 ms 9.6 exceeds the limit 1",
    )


def test_the_ratio_cap_uses_the_paired_ratio_not_p50s_measured_at_other_moments() -> None:
    # Candidate and eager p50s read 1.71x apart (as two moments of a loaded machine gave), but the
    # interleaved rounds put the candidate at 1.1x eager: within the 1.5 cap.
    f = Figures(1.71, 2.0, 1.0, 1.2, paired_ratio=1.1)
    assert check(Budget(), CPU, {"batch=32": f}) == []
    assert [v.metric for v in check(Budget(), CPU, {"batch=32": Figures(1.71, 2.0, 1.0, 1.2)})] == [
        "compiled/eager p50 ratio"
    ]
    loses = {label: cmp(timing.LOSES, 1.6) for label in LABELS}
    d = choose("p", LABELS, {"p/default": loses}, Budget(), CPU)
    assert d.winner is None and "compiled/eager p50 ratio 1.6 exceeds the limit 1.5" in d.note
    assert figures(loses["batch=2"]).ratio == pytest.approx(1.6)


def test_eager_figures_are_the_median_over_candidates_comparisons() -> None:
    scored = {cid: {"batch=2": cmp(timing.WINS, 0.8, eager_ms=ms)} for cid, ms in (("a", 1.0), ("b", 3.0), ("c", 2.0))}
    f = eager_figures(scored, ["batch=2"])["batch=2"]
    assert (f.compiled_p50, f.eager_p50, f.ratio) == (pytest.approx(2.0), pytest.approx(2.0), 1.0)


def test_no_contender() -> None:
    assert choose("p", LABELS, {}, Budget(), CPU).note == NO_CONTENDER
