"""Interleaved, confidence-based timing decisions (certification.timing), on synthetic clocks: nothing real is timed."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from esper.certification.timing import (
    EVEN,
    INCONCLUSIVE,
    LOSES,
    WINS,
    compare,
    decide,
    median_interval,
    ratio_interval,
    regressed,
)


class Machine:
    """A fake machine: a clock, two kernels of fixed cost, per-call jitter, and a neighbour whose bursts
    multiply every cost while they last (bursts of ``burst`` seconds, on or off at random per slot)."""

    def __init__(self, candidate: float, eager: float, *, load: float = 1.0, burst: float = 0.0, seed: int = 0):
        self.t = 0.0
        self.cost = {"candidate": candidate, "eager": eager}
        self.load, self.burst = load, burst
        self.rng = random.Random(seed)
        self.slots: dict[int, bool] = {}
        self.calls: list[str] = []

    def busy(self) -> bool:
        if not self.burst:
            return self.load > 1.0
        slot = int(self.t / self.burst)
        return self.slots.setdefault(slot, self.rng.random() < 0.5)

    def run(self, side: str) -> None:
        self.calls.append(side)
        factor = self.load if self.busy() else 1.0
        self.t += self.cost[side] * factor * (1.0 + 0.05 * self.rng.random())

    def clock(self) -> float:
        return self.t

    def compare(self, **kw: object):
        return compare(lambda: self.run("candidate"), lambda: self.run("eager"), clock=self.clock, **kw)

    def one_shot_ratio(self, n: int = 20) -> float:
        """What a non-interleaved benchmark does: all candidate calls, then all eager calls, medians."""
        samples: dict[str, list[float]] = {"candidate": [], "eager": []}
        for side in ("candidate", "eager"):
            for _ in range(n):
                t0 = self.t
                self.run(side)
                samples[side].append(self.t - t0)
        return statistics.median(samples["candidate"]) / statistics.median(samples["eager"])


def test_median_interval_is_the_sign_test_interval() -> None:
    xs = [float(v) for v in range(1, 11)]
    assert median_interval(xs, 0.95) == (2.0, 9.0, pytest.approx(1 - 2 * 11 / 1024))
    low, high, cover = median_interval(xs[:8], 0.95)
    assert (low, high) == (1.0, 8.0) and cover == pytest.approx(1 - 2 / 256)
    assert median_interval([5.0, 1.0, 3.0], 0.95)[2] < 0.95  # three values cannot give 95%
    with pytest.raises(ValueError):
        median_interval([], 0.95)


def test_decide() -> None:
    assert decide([0.80, 0.82, 0.79, 0.81, 0.80, 0.83, 0.78, 0.80], margin=0.05).decision == WINS
    assert decide([1.20, 1.25, 1.22, 1.19, 1.30, 1.21, 1.24, 1.23], margin=0.05).decision == LOSES
    assert decide([0.97, 0.98, 0.99, 0.98, 0.97, 0.99, 0.98, 0.97], margin=0.05).decision == EVEN
    straddle = [0.90, 1.05, 0.93, 1.02, 0.96, 1.08, 0.91, 1.01]
    assert decide(straddle, margin=0.05).decision == ""  # measure more
    assert decide(straddle, margin=0.05, final=True).decision == INCONCLUSIVE
    # a win by less than the margin, with one lucky outlier round: never a win; with enough rounds the
    # interval drops the outlier and says so with confidence
    lucky = [0.96, 0.97, 0.96, 0.5, 0.97, 0.96, 0.97, 0.96]
    assert decide(lucky, margin=0.05).decision == ""
    assert decide(lucky * 3, margin=0.05).decision == EVEN
    # too few rounds for the confidence asked: undecided, whatever the ratios say
    assert decide([0.5, 0.5, 0.5], margin=0.05).decision == ""
    assert decide([0.5, 0.5, 0.5], margin=0.05, final=True).decision == INCONCLUSIVE


@pytest.mark.parametrize(("candidate", "want"), [(0.8, WINS), (1.3, LOSES), (0.985, EVEN), (0.95, INCONCLUSIVE)])
def test_compare_on_a_quiet_machine(candidate: float, want: str) -> None:
    m = Machine(candidate * 1e-3, 1e-3)
    c = m.compare(margin=0.05, min_rounds=8, max_rounds=24, rounds=4)
    assert c.decision == want, c.reason()
    assert c.wins is (want == WINS)
    if want in (WINS, LOSES):
        assert c.rounds == 8  # decided as soon as it could be
    if want == INCONCLUSIVE:
        assert c.rounds == 24  # measured up to the cap first
    assert c.low <= c.ratio <= c.high
    assert c.candidate_p50 == pytest.approx(candidate * 1e-3, rel=0.06)
    json.dumps(c.evidence(), allow_nan=False)
    assert c.reason().startswith(f"{want}: candidate/eager ")


def test_rounds_alternate_and_the_order_is_seeded() -> None:
    m = Machine(1e-3, 2e-3)
    m.compare(min_rounds=8, max_rounds=8, calls=3, warmup=0, seed=7)
    rounds = [m.calls[i : i + 6] for i in range(0, len(m.calls), 6)]
    assert len(rounds) == 8
    for r in rounds:
        assert r[0] != r[1] and r[::2] == [r[0]] * 3  # ABABAB or BABABA
    firsts = [r[0] for r in rounds]
    assert set(firsts) == {"candidate", "eager"}  # the order is drawn per round...
    again = Machine(1e-3, 2e-3)
    again.compare(min_rounds=8, max_rounds=8, calls=3, warmup=0, seed=7)
    assert again.calls == m.calls  # ...from the seed


def test_a_noisy_neighbour_flips_one_shot_medians_but_not_the_decision() -> None:
    """A neighbour keeping the cores busy in bursts (3x slower while it runs): timed one side after the
    other, the verdict depends on which side the bursts fell on; interleaved, it does not."""
    one_shot, decisions = [], []
    for seed in range(12):
        m = Machine(0.8e-3, 1e-3, load=3.0, burst=0.03, seed=seed)
        one_shot.append(m.one_shot_ratio())
        m2 = Machine(0.8e-3, 1e-3, load=3.0, burst=0.03, seed=seed)
        decisions.append(m2.compare(margin=0.05, min_rounds=8, max_rounds=40).decision)
    assert min(one_shot) < 0.95 and max(one_shot) > 1.0  # one-shot medians flip
    assert decisions == [WINS] * 12  # the interleaved decision does not


def test_equal_kernels_never_win_under_load() -> None:
    for seed in range(12):
        m = Machine(1e-3, 1e-3, load=3.0, burst=0.01, seed=seed)
        assert m.compare(margin=0.05, min_rounds=8, max_rounds=24).decision != WINS


def test_compare_validates_its_arguments() -> None:
    with pytest.raises(ValueError):
        compare(lambda: None, lambda: None, min_rounds=10, max_rounds=5)


def test_ratio_interval_is_deterministic() -> None:
    a, b = [1.0, 1.1, 0.9, 1.05, 0.95], [2.0, 2.2, 1.8, 2.1, 1.9]
    ratio, low, high = ratio_interval(a, b, seed=3)
    assert ratio == pytest.approx(2.0) and low <= ratio <= high
    assert ratio_interval(a, b, seed=3) == (ratio, low, high)


def test_regressed_uses_both_runs_spread() -> None:
    rng = random.Random(0)
    base = [1.0 + 0.02 * rng.random() for _ in range(30)]
    same = [1.0 + 0.02 * rng.random() for _ in range(30)]
    slower = [1.5 + 0.02 * rng.random() for _ in range(30)]
    assert not regressed(base, same, 0.2)
    assert regressed(base, slower, 0.2)
    # medians 25% apart, but each run spreads over a factor of three: not a regression with confidence
    wide_base = [rng.uniform(0.5, 1.5) for _ in range(12)]
    wide_cand = [v * 1.25 for v in wide_base[::-1]]
    assert statistics.median(wide_cand) / statistics.median(wide_base) > 1.2  # a medians-only gate fails it
    assert not regressed(wide_base, wide_cand, 0.2)


def test_an_unchanged_candidate_measured_beside_a_neighbour_passes_the_gate() -> None:
    """The baseline ran on a quiet machine; the unchanged candidate beside a neighbour keeping every core
    busy (1.7x slower throughout). Its raw times fail a 20% gate; its interleaved ratios to eager do not."""
    quiet = Machine(0.8e-3, 1e-3, seed=1).compare(min_rounds=30, max_rounds=30)
    busy = Machine(0.8e-3, 1e-3, load=1.7, seed=2).compare(min_rounds=30, max_rounds=30)
    assert regressed(quiet.candidate_rounds, busy.candidate_rounds, 0.2)  # raw times: a false alarm
    assert not regressed(quiet.ratios, busy.ratios, 0.2)
    worse = Machine(1.2e-3, 1e-3, load=1.7, seed=3).compare(min_rounds=30, max_rounds=30)
    assert regressed(quiet.ratios, worse.ratios, 0.2)  # a real 50% regression still fails


def test_compare_reports_each_sides_p95_over_every_call() -> None:
    m = Machine(candidate=1.0, eager=2.0, seed=3)
    c = m.compare(min_rounds=8, max_rounds=8, calls=5)
    # Fixed costs with up to 5% jitter: each side's p95 sits in its cost band.
    assert 1.0 <= c.candidate_p95 <= 1.05 and 2.0 <= c.eager_p95 <= 2.1
    assert c.evidence()["candidate_p95_ms"] == pytest.approx(c.candidate_p95 * 1e3)
