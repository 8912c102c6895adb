"""Latency decisions that do not flip with machine load: interleaved rounds and confidence intervals.

A CI runner is a shared machine. Timing the candidate, then eager a moment later, compares two loads as much
as two kernels. :func:`compare` alternates them instead: every round times both on the same inputs, the order
inside each round drawn from a seeded RNG, so that a neighbour's burst slows both sides of the round it falls
in. Each round gives one paired ratio ``median(candidate) / median(eager)``; :func:`decide` puts a
distribution-free confidence interval on the median of those ratios (the sign test's order statistics) and
declares a winner only when the whole interval clears the margin. An undecided comparison measures more
rounds, up to a cap, and then says "inconclusive": the caller routes eager and records why.

A comparison left inconclusive, or measured under a load its reader cannot use (the release gate's gauge), is
measured again: :func:`confirm` runs fresh interleaved comparisons, pass after pass over what is still
unsettled, until each settles or a time budget is spent. Fresh rounds, not more of the same: rounds taken beside
a neighbour would outvote a quiet confirmation. A decision taken again after an undecided one is a second
look at the same question, so each confirmation decides at a stricter confidence
(:func:`confirmation_confidence`): the chance of a false decision over all looks stays below twice the asked one.

:func:`regressed` is the release gate's rule against a stored baseline: a bootstrap interval of the ratio
of the two runs' medians, so that the spread of both runs counts, not the medians alone.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

WINS = "wins"  # the candidate beats eager by the margin, with confidence
LOSES = "loses"  # eager is faster, with confidence
EVEN = "even"  # with confidence, neither slower than eager nor faster by the margin: eager serves
INCONCLUSIVE = "inconclusive"  # still undecided after max_rounds: eager serves, and the evidence says so
DECISIONS = (WINS, LOSES, EVEN, INCONCLUSIVE)
K = TypeVar("K")


@dataclass(frozen=True)
class Decision:
    """A verdict on paired ratios (candidate / eager): the decision, the median ratio and its interval."""

    decision: str
    ratio: float
    low: float
    high: float
    rounds: int
    confidence: float  # the interval's actual coverage (the sign test's is discrete, at least the asked one)


def _binom_cdf(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values``: the order statistics the sign test gives,
    covering the true median with probability at least ``confidence`` (min to max, with its lower coverage,
    when there are too few values for that). Returns ``(low, high, coverage)``."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    alpha = 1.0 - confidence
    k = 0  # the largest k with P(B <= k - 1) <= alpha / 2, B ~ Binomial(n, 1/2)
    while k + 1 <= n // 2 and _binom_cdf(k, n) <= alpha / 2:
        k += 1
    if k == 0:
        return xs[0], xs[-1], 1.0 - 2 * 0.5**n
    return xs[k - 1], xs[n - k], 1.0 - 2 * _binom_cdf(k - 1, n)


def decide(ratios: Sequence[float], *, margin: float, confidence: float = 0.95, final: bool = False) -> Decision:
    """The decision on paired per-round ratios ``candidate / eager``:

    - ``wins`` when the interval's upper end is below ``1 - margin``;
    - ``loses`` when its lower end is above 1;
    - ``even`` when it lies within ``[1 - margin, 1]`` (the candidate cannot win by the margin, nor is it
      surely slower: eager serves, no need to measure more);
    - otherwise ``inconclusive`` when ``final`` (no more rounds), else ``""``: measure more.
    """
    low, high, coverage = median_interval(ratios, confidence)
    mid = statistics.median(ratios)
    if coverage < confidence:
        verdict = INCONCLUSIVE if final else ""
    elif high < 1.0 - margin:
        verdict = WINS
    elif low > 1.0:
        verdict = LOSES
    elif low >= 1.0 - margin:
        verdict = EVEN
    else:
        verdict = INCONCLUSIVE if final else ""
    return Decision(verdict, mid, low, high, len(ratios), coverage)


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare`: the decision with its interval, and the per-round figures (seconds)."""

    decision: str
    ratio: float  # median of the per-round ratios candidate / eager
    low: float
    high: float
    margin: float
    confidence: float
    candidate_p50: float  # median over rounds of the per-round medians
    eager_p50: float
    candidate_p95: float = 0.0  # 95th percentile over every timed call
    eager_p95: float = 0.0
    ratios: tuple[float, ...] = field(default=(), repr=False)
    candidate_rounds: tuple[float, ...] = field(default=(), repr=False)
    eager_rounds: tuple[float, ...] = field(default=(), repr=False)
    confirmations: int = 0  # 0: a first measurement; n: the n-th time it was measured again (see confirm)

    @property
    def rounds(self) -> int:
        """How many paired rounds were measured."""
        return len(self.ratios)

    @property
    def wins(self) -> bool:
        """Whether the candidate should serve (only a confident win by the margin counts)."""
        return self.decision == WINS

    def reason(self) -> str:
        """One readable line: the decision, the ratio and its interval, the rounds."""
        again = f" (measured again {self.confirmations}x)" if self.confirmations else ""
        return (
            f"{self.decision}: candidate/eager {self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}] at "
            f"{self.confidence:.0%} over {self.rounds} interleaved rounds, margin {self.margin:.0%}{again}"
        )

    def evidence(self) -> dict[str, Any]:
        """A JSON-safe dict for Urza evidence."""
        return {
            "decision": self.decision,
            "ratio": self.ratio,
            "ratio_low": self.low,
            "ratio_high": self.high,
            "margin": self.margin,
            "confidence": self.confidence,
            "rounds": self.rounds,
            "candidate_p50_ms": self.candidate_p50 * 1e3,
            "eager_p50_ms": self.eager_p50 * 1e3,
            "candidate_p95_ms": self.candidate_p95 * 1e3,
            "eager_p95_ms": self.eager_p95 * 1e3,
        } | ({"confirmations": self.confirmations} if self.confirmations else {})


def _time_round(
    fns: tuple[Callable[[], Any], Callable[[], Any]],
    calls: int,
    first: int,
    clock: Callable[[], float],
    samples: tuple[list[float], list[float]] | None = None,
) -> tuple[float, float]:
    """One round: ``calls`` alternating pairs (ABAB..., starting with ``fns[first]``); per-side medians.
    Every call's time is also appended to ``samples`` (per side) when given."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(calls):
        for side in (first, 1 - first):
            t0 = clock()
            fns[side]()
            times[side].append(clock() - t0)
    if samples is not None:
        samples[0].extend(times[0])
        samples[1].extend(times[1])
    return statistics.median(times[0]), statistics.median(times[1])


def p95(values: Sequence[float]) -> float:
    """The 95th percentile of ``values`` (nearest rank; 0.0 for none)."""
    xs = sorted(values)
    return xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)] if xs else 0.0


def compare(
    candidate_fn: Callable[[], Any],
    eager_fn: Callable[[], Any],
    *,
    rounds: int = 4,
    min_rounds: int = 8,
    max_rounds: int = 40,
    margin: float = 0.05,
    calls: int = 5,
    warmup: int = 1,
    confidence: float = 0.95,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Time ``candidate_fn`` against ``eager_fn`` (each a no-argument call on the same inputs) in interleaved
    rounds, and decide with :func:`decide`.

    Each round runs ``calls`` alternating pairs, which side starts drawn from ``random.Random(seed)``, and
    keeps each side's median. After ``min_rounds`` rounds, and after every ``rounds`` more, the decision is
    taken; ``""`` (undecided) measures on, up to ``max_rounds``, where it becomes ``inconclusive``.
    ``warmup`` untimed calls of each come first. ``clock`` is injectable for tests."""
    if not 1 <= min_rounds <= max_rounds or rounds < 1 or calls < 1 or not 0 <= margin < 1:
        raise ValueError("need 1 <= min_rounds <= max_rounds, rounds >= 1, calls >= 1, 0 <= margin < 1")
    for _ in range(warmup):
        candidate_fn()
        eager_fn()
    rng = random.Random(seed)
    cand: list[float] = []
    eager: list[float] = []
    every: tuple[list[float], list[float]] = ([], [])
    target = min_rounds
    while True:
        while len(cand) < target:
            c, e = _time_round((candidate_fn, eager_fn), calls, rng.randrange(2), clock, every)
            cand.append(c)
            eager.append(e)
        ratios = [c / e if e > 0 else math.inf for c, e in zip(cand, eager, strict=True)]
        d = decide(ratios, margin=margin, confidence=confidence, final=target >= max_rounds)
        if d.decision:
            return Comparison(
                decision=d.decision,
                ratio=d.ratio,
                low=d.low,
                high=d.high,
                margin=margin,
                confidence=d.confidence,
                candidate_p50=statistics.median(cand),
                eager_p50=statistics.median(eager),
                candidate_p95=p95(every[0]),
                eager_p95=p95(every[1]),
                ratios=tuple(ratios),
                candidate_rounds=tuple(cand),
                eager_rounds=tuple(eager),
            )
        target = min(target + rounds, max_rounds)


def ratio_interval(
    baseline: Sequence[float],
    candidate: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``median(candidate) / median(baseline)`` and a percentile-bootstrap interval for it, resampling both
    runs (seeded: the same samples give the same interval). Returns ``(ratio, low, high)``."""
    if not baseline or not candidate:
        raise ValueError("both runs need samples")
    rng = random.Random(seed)
    ratio = statistics.median(candidate) / statistics.median(baseline)
    boots = sorted(
        statistics.median(rng.choices(candidate, k=len(candidate)))
        / statistics.median(rng.choices(baseline, k=len(baseline)))
        for _ in range(resamples)
    )
    tail = (1.0 - confidence) / 2
    return ratio, boots[int(tail * (resamples - 1))], boots[math.ceil((1.0 - tail) * (resamples - 1))]


def regressed(
    baseline_samples: Sequence[float],
    candidate_samples: Sequence[float],
    threshold: float,
    *,
    confidence: float = 0.95,
    seed: int = 0,
) -> bool:
    """The release gate: whether the candidate is slower than the baseline by more than ``threshold``
    (0.2 = 20%) with confidence, i.e. the lower end of :func:`ratio_interval` exceeds ``1 + threshold``. A
    difference of medians inside the runs' own spread does not fail the gate.

    Pass load-normalised samples (each round's compiled/eager ratio, :attr:`Comparison.ratios`) from both
    runs: a neighbour that slows a whole run slows its eager rounds too and cancels out. Raw times work, but
    then a run slowed throughout is indistinguishable from a slower kernel."""
    _, low, _ = ratio_interval(baseline_samples, candidate_samples, confidence=confidence, seed=seed)
    return low > 1.0 + threshold


def confirmation_confidence(confidence: float, attempt: int) -> float:
    """The confidence a confirmation decides at: the ``attempt``-th look (0: the first measurement) spends
    ``(1 - confidence) / 2**attempt`` of error, so that all looks together spend less than twice the first's."""
    if attempt < 0 or not 0 < confidence < 1:
        raise ValueError("need attempt >= 0 and 0 < confidence < 1")
    return 1.0 - (1.0 - confidence) / 2**attempt


@dataclass(frozen=True)
class Confirmation(Generic[K]):
    """The outcome of :func:`confirm`: per key, the confirmation that settled it, or the last one of a key that
    never settled (a key not measured again before the budget ran out is in neither); the passes run and the
    seconds spent (by the clock given)."""

    settled: dict[K, Comparison]
    unsettled: dict[K, Comparison]
    passes: int
    seconds: float

    @property
    def exhausted(self) -> bool:
        """Whether anything was left unsettled."""
        return bool(self.unsettled)


def confirm(
    keys: Sequence[K],
    measure: Callable[[K, int], Comparison | None],
    settled: Callable[[K, Comparison], bool],
    *,
    budget_s: float,
    max_passes: int | None = None,
    pause_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    wait: Callable[[float], Any] = time.sleep,
) -> Confirmation[K]:
    """Measure each of ``keys`` again (``measure(key, attempt)``, attempt 1, 2, ...: a fresh interleaved
    comparison, e.g. :func:`compare` seeded and at :func:`confirmation_confidence` by ``attempt``; ``None``
    when the key cannot be measured again, which drops it) until
    ``settled(key, comparison)``, pass after pass over the keys still unsettled, waiting ``pause_s`` between
    passes (a neighbour's burst passes while nothing is measured), for at most ``max_passes`` passes (``None``:
    the budget alone bounds them).

    No measurement starts once ``budget_s`` seconds have passed since the call; one under way finishes, so the
    budget can be overrun by one comparison. ``clock`` and ``wait`` are injectable for tests."""
    if budget_s < 0 or (max_passes is not None and max_passes < 0) or pause_s < 0:
        raise ValueError("need budget_s >= 0, max_passes >= 0, pause_s >= 0")
    start = clock()
    done: dict[K, Comparison] = {}
    last: dict[K, Comparison] = {}
    pending = list(dict.fromkeys(keys))
    passes = 0
    while pending and (max_passes is None or passes < max_passes):
        if passes and pause_s:
            wait(max(0.0, min(pause_s, budget_s - (clock() - start))))
        if clock() - start >= budget_s:
            break
        passes += 1
        for key in list(pending):
            if clock() - start >= budget_s:
                break
            measured = measure(key, passes)
            if measured is None:
                pending.remove(key)
                continue
            cmp = replace(measured, confirmations=passes)
            if settled(key, cmp):
                done[key] = cmp
                last.pop(key, None)
                pending.remove(key)
            else:
                last[key] = cmp
    return Confirmation(done, last, passes, clock() - start)


def decided(_: object, cmp: Comparison) -> bool:
    """A :func:`confirm` rule: settled once the comparison decides (anything but ``inconclusive``)."""
    return cmp.decision != INCONCLUSIVE
