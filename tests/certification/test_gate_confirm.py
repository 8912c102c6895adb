"""A release gate that can block: comparisons the load gauge rules out are measured again (timing.confirm,
gate.reconcile) until the load settles or the budget is spent, and a run that stays unjudged passes or fails
by the user's policy. Synthetic clocks throughout: nothing real is timed, nothing sleeps."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from esper.certification import gate
from esper.certification.gate import INCONCLUSIVE_EXIT, Outcome, Policy, Record
from esper.certification.session import CertifySession
from esper.certification.timing import (
    INCONCLUSIVE,
    WINS,
    Comparison,
    compare,
    confirm,
    confirmation_confidence,
    decided,
)
from esper.settings import Settings

KEYS = [f"bp|inference|default/default|batch={b}" for b in (1, 4, 16)]


class Runner:
    """A fake shared runner: a clock, a compiled kernel and eager of fixed cost (with 5% jitter), and a neighbour
    that keeps every core busy until ``quiet_at`` (seconds on this clock). Under it eager runs ``eager_load``
    times slower and the compiled kernel, whose parallel loops wait for descheduled threads, ``compiled_load``
    times slower."""

    def __init__(
        self,
        compiled: float = 0.6e-3,
        eager: float = 1e-3,
        *,
        quiet_at: float = 0.0,
        eager_load: float = 2.4,
        compiled_load: float = 5.0,
        seed: int = 0,
    ):
        self.t = 0.0
        self.cost = {"compiled": compiled, "eager": eager}
        self.load = {"compiled": compiled_load, "eager": eager_load}
        self.quiet_at = quiet_at
        self.rng = random.Random(seed)
        self.measured: list[tuple[str, int]] = []

    def run(self, side: str) -> None:
        factor = self.load[side] if self.t < self.quiet_at else 1.0
        self.t += self.cost[side] * factor * (1.0 + 0.05 * self.rng.random())

    def clock(self) -> float:
        return self.t

    def wait(self, seconds: float) -> None:
        self.t += seconds

    def compare(self, look: int = 0) -> Comparison:
        return compare(
            lambda: self.run("compiled"),
            lambda: self.run("eager"),
            clock=self.clock,
            seed=look,
            confidence=confirmation_confidence(0.95, look),
        )

    def measure(self, key: str, look: int) -> Comparison:
        self.measured.append((key, look))
        return self.compare(look)


def record_of(runner: Runner, keys: list[str] = KEYS) -> Record:
    cmps = {k: runner.compare() for k in keys}
    return Record({k: list(c.ratios) for k, c in cmps.items()}, {k: c.eager_p50 * 1e3 for k, c in cmps.items()})


# -- the re-measure loop ---------------------------------------------------------------------------------------


def test_confirm_measures_again_until_settled_pass_after_pass() -> None:
    runner = Runner(quiet_at=0.5)
    seen = []

    def settled(key: str, cmp: Comparison) -> bool:
        seen.append(cmp.confirmations)
        return runner.t >= runner.quiet_at

    out = confirm(KEYS, runner.measure, settled, budget_s=60, pause_s=0.2, clock=runner.clock, wait=runner.wait)
    assert set(out.settled) == set(KEYS) and not out.unsettled and not out.exhausted
    # Each pass measures what is still unsettled, with the look number as its attempt; nothing settled twice.
    looks = [look for _, look in runner.measured]
    assert looks == sorted(looks) and looks[0] == 1 and out.passes == looks[-1] > 1
    assert len(runner.measured) == len(set(runner.measured))
    assert seen == looks  # every confirmation says which look it is
    assert all(c.confirmations >= 1 for c in out.settled.values())
    assert out.seconds == pytest.approx(runner.t)


def test_confirm_starts_nothing_once_the_budget_is_spent() -> None:
    runner = Runner(quiet_at=1e9)  # the neighbour never leaves
    out = confirm(KEYS, runner.measure, lambda k, c: False, budget_s=1.0, clock=runner.clock, wait=runner.wait)
    assert not out.settled and set(out.unsettled) == set(KEYS) and out.exhausted
    # Every measurement started before the budget ran out; the last one may overrun it.
    one = max(c.rounds for c in out.unsettled.values()) * 5 * 2 * 5.0 * 1.05e-3
    assert 1.0 <= out.seconds <= 1.0 + one
    assert confirm(KEYS, runner.measure, lambda k, c: False, budget_s=0, clock=runner.clock).passes == 0


def test_confirm_pauses_between_passes_within_the_budget_and_stops_at_max_passes() -> None:
    runner = Runner(quiet_at=1e9)
    waits: list[float] = []

    def wait(s: float) -> None:
        waits.append(s)
        runner.wait(s)

    out = confirm(
        ["k"], runner.measure, lambda k, c: False, budget_s=1e6, max_passes=3, pause_s=5, clock=runner.clock, wait=wait
    )
    assert out.passes == 3 and waits == [5, 5] and [look for _, look in runner.measured] == [1, 2, 3]
    # A pause never runs past the budget.
    waits.clear()
    confirm(
        ["k"], Runner(quiet_at=1e9).measure, lambda k, c: False, budget_s=0.3, pause_s=60, clock=runner.clock, wait=wait
    )
    assert all(w <= 0.3 for w in waits)


def test_a_key_that_cannot_be_measured_again_is_dropped() -> None:
    runner = Runner()
    out = confirm(
        ["gone", "k"],
        lambda key, look: None if key == "gone" else runner.measure(key, look),
        lambda key, cmp: False,
        budget_s=1e6,
        max_passes=2,
        clock=runner.clock,
    )
    assert list(out.unsettled) == ["k"] and not out.settled
    assert runner.measured == [("k", 1), ("k", 2)]


def test_each_look_decides_at_a_stricter_confidence() -> None:
    assert confirmation_confidence(0.95, 0) == pytest.approx(0.95)
    looks = [1 - confirmation_confidence(0.95, a) for a in range(12)]
    assert looks[1] == pytest.approx(0.025) and sum(looks) < 2 * 0.05
    for bad in ((0.95, -1), (1.0, 1)):
        with pytest.raises(ValueError):
            confirmation_confidence(*bad)


def test_an_inconclusive_comparison_is_decided_by_a_quiet_confirmation() -> None:
    """A kernel 0.6x eager measured in bursts of a neighbour that hits compiled harder: a noisy, undecided
    comparison; measured again once the neighbour left, it wins."""
    noisy = Comparison(INCONCLUSIVE, 0.9, 0.5, 1.4, 0.05, 0.95, 1e-3, 1e-3)
    runner = Runner(quiet_at=0.0)
    out = confirm(["k"], runner.measure, decided, budget_s=3, max_passes=2, clock=runner.clock)
    assert noisy.decision == INCONCLUSIVE and out.settled["k"].decision == WINS
    assert out.settled["k"].confirmations == 1 and "measured again 1x" in out.settled["k"].reason()
    assert out.settled["k"].evidence()["confirmations"] == 1 and "confirmations" not in noisy.evidence()


# -- the gate: reconcile, judge, policy ----------------------------------------------------------------------------


def baseline() -> Record:
    return record_of(Runner(seed=1))


@pytest.mark.parametrize("policy", list(Policy))
def test_a_busy_run_measured_again_once_the_neighbour_leaves_is_judged(policy: Policy) -> None:
    base = baseline()
    busy = Runner(quiet_at=30.0, seed=2)
    current = record_of(busy)
    v = gate.judge(base, current, 0.2)
    assert v.outcome is Outcome.INCONCLUSIVE and v.inconclusive and set(gate.out_of_range(base, current)) == set(KEYS)
    amended, confirmation = gate.reconcile(base, current, busy.measure, budget_s=120, clock=busy.clock, wait=busy.wait)
    assert set(confirmation.settled) == set(KEYS) and busy.t >= 30.0
    v = gate.judge(base, amended, 0.2)
    assert v.outcome is Outcome.PASSED and not v.unjudged and v.load == pytest.approx(1.0, abs=0.1)
    assert gate.exit_status(v, policy) == 0


def test_a_run_that_stays_busy_is_inconclusive_and_the_policy_decides() -> None:
    base = baseline()
    busy = Runner(quiet_at=1e9, seed=3)
    current = record_of(busy)
    # What the ratio rule alone would say: the busy run's compiled kernel lost more than eager.
    assert gate.regressions(base.ratios, current.ratios, 0.2)
    amended, confirmation = gate.reconcile(base, current, busy.measure, budget_s=10, clock=busy.clock, wait=busy.wait)
    assert confirmation.exhausted and not confirmation.settled and amended == current
    v = gate.judge(base, amended, 0.2)
    assert v.outcome is Outcome.INCONCLUSIVE and not v.failed
    assert gate.exit_status(v, Policy.PASS) == 0
    assert gate.exit_status(v, Policy.FAIL) == INCONCLUSIVE_EXIT == 75


@pytest.mark.parametrize("policy", list(Policy))
def test_a_real_regression_fails_either_way_and_a_clean_twin_passes(policy: Policy) -> None:
    base = baseline()
    regressed = record_of(Runner(compiled=1.0e-3, seed=4))  # compiled 1.67x slower on a quiet machine
    v = gate.judge(base, regressed, 0.2)
    assert v.outcome is Outcome.REGRESSED and len(v.regressions) == len(KEYS)
    assert gate.exit_status(v, policy) == 1
    twin = gate.judge(base, record_of(Runner(seed=5)), 0.2)
    assert twin.outcome is Outcome.PASSED and gate.exit_status(twin, policy) == 0
    assert gate.exit_status(None, policy) == 0  # no baseline, no gate


def test_one_comparison_left_out_of_range_leaves_the_run_inconclusive_unless_another_regressed() -> None:
    base = Record({k: [0.6] * 8 for k in KEYS}, {k: 1.0 for k in KEYS})
    burst = Record({k: [0.6] * 8 for k in KEYS}, {**{k: 1.0 for k in KEYS}, KEYS[0]: 3.0})
    v = gate.judge(base, burst, 0.2)
    assert v.unjudged and not v.inconclusive and v.outcome is Outcome.INCONCLUSIVE
    worse = Record({**burst.ratios, KEYS[1]: [1.2] * 8}, burst.eager_ms)
    assert gate.judge(base, worse, 0.2).outcome is Outcome.REGRESSED


def test_policy_and_seconds_parse_or_refuse() -> None:
    assert gate.policy("fail") is Policy.FAIL and gate.policy("pass") is Policy.PASS
    assert gate.seconds("30") == 30 and gate.seconds("2.5s") == 2.5 and gate.seconds("0") == 0
    for parse, bad in ((gate.policy, "retry"), (gate.seconds, "-1"), (gate.seconds, "soon"), (gate.seconds, "inf")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


# -- the session: plain calls, as both front ends make them ----------------------------------------------------


class TimedSession(CertifySession):
    """A certify session whose comparisons come from a fake runner instead of compiled kernels."""

    def __init__(self, tmp_path: Path, runner: Runner, **kw: object) -> None:
        settings = Settings(root=tmp_path, urza=tmp_path / "urza.db", blueprint_paths=(), budget_profile="cpu-2core")
        super().__init__(settings=settings, build_dir=tmp_path / "build", enabled=True, **kw)  # type: ignore[arg-type]
        self.runner = runner
        self.first = {k: runner.compare() for k in KEYS}

    def latency_rows(self) -> list[tuple[gate.Key, list[float], float]]:
        return [(tuple(k.split("|")), list(c.ratios), c.eager_p50 * 1e3) for k, c in self.first.items()]  # type: ignore[misc]

    def measure_again(self, key: str, look: int) -> Comparison:
        return self.runner.measure(key, look)


def write_baseline(tmp_path: Path) -> Path:
    base = baseline()
    path = tmp_path / "baseline.json"
    rows = [(tuple(k.split("|")), v) for k, v in base.ratios.items()]
    path.write_text(json.dumps(gate.record(rows, {}, {tuple(k.split("|")): ms for k, ms in base.eager_ms.items()})))  # type: ignore[misc]
    return path


@pytest.mark.parametrize(("policy", "status", "line"), [(Policy.PASS, 0, "not failed"), (Policy.FAIL, 75, "exit 75")])
def test_session_maps_a_run_that_stays_busy_to_the_policy(
    tmp_path: Path, policy: Policy, status: int, line: str
) -> None:
    s = TimedSession(
        tmp_path,
        Runner(quiet_at=1e9, seed=6),
        baseline=write_baseline(tmp_path),
        inconclusive=policy,
        confirm_seconds=0,
    )
    assert not s.finish() and s.exit_status() == status
    report = s.gate_report()
    assert any(r.startswith("  INCONCLUSIVE") and line in r for r in report), report
    assert any("not judged" in r for r in report)


def test_session_measures_again_and_writes_what_it_judged(tmp_path: Path) -> None:
    runner = Runner(quiet_at=1e9, seed=7)
    s = TimedSession(tmp_path, runner, baseline=write_baseline(tmp_path), inconclusive=Policy.FAIL, confirm_seconds=60)
    runner.quiet_at = runner.t  # the first measurements were busy, the neighbour left since
    assert not s.finish() and s.exit_status() == 0
    assert s.verdict is not None and s.verdict.confirmed == len(KEYS)
    assert any("measured again" in r for r in s.gate_report())
    written = gate.load_record(tmp_path / "build" / "latency.json")
    assert not gate.out_of_range(gate.load_record(tmp_path / "baseline.json"), written)


def test_session_fails_a_real_regression_under_either_policy(tmp_path: Path) -> None:
    path = write_baseline(tmp_path)
    for policy in Policy:
        s = TimedSession(tmp_path, Runner(compiled=1.0e-3, seed=8), baseline=path, inconclusive=policy)
        assert s.finish() and s.exit_status() == 1


def test_both_front_ends_share_the_policy_option(pytester: pytest.Pytester) -> None:
    from click.testing import CliRunner

    from esper.cli import cli

    done = CliRunner().invoke(cli, ["certify", "--inconclusive", "retry"])
    assert done.exit_code == 2 and "must be one of pass, fail" in done.output
    help_text = CliRunner().invoke(cli, ["certify", "--help"]).output
    assert "--inconclusive" in help_text and "--confirm-seconds" in help_text and "75" in help_text
    result = pytester.runpytest_subprocess("--certify", "--certify-inconclusive", "retry")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--certify-inconclusive*must be one of pass, fail*"])
