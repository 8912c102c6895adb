"""The release gate (esper.certification.gate): per-round compiled/eager ratios of this run against a stored
baseline's, failing only on a regression beyond the threshold with confidence."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from esper.certification.gate import LOAD_LIMIT, Record, judge, load, load_record, record, regressions, threshold

KEY = ("swiglu", "inference", "default/default", "batch=8")


def ratios(center: float, spread: float, n: int = 12, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [center * (1 + spread * (rng.random() - 0.5)) for _ in range(n)]


def test_record_round_trips_and_refuses_other_versions(tmp_path: Path) -> None:
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(record([(KEY, [0.8, 0.9])], {"torch": "2.13"})))
    assert load(path) == {"swiglu|inference|default/default|batch=8": [0.8, 0.9]}
    path.write_text(json.dumps(record([(KEY, [0.8, 0.9])], {}, {KEY: 1.5})))
    assert load_record(path).eager_ms == {"swiglu|inference|default/default|batch=8": 1.5}
    # A version-1 record (no eager timings) is still read: its comparisons are judged without the load gauge.
    path.write_text(json.dumps({"version": 1, "context": {}, "ratios": {"k": [0.8]}}))
    assert load_record(path) == Record({"k": [0.8]}, {})
    path.write_text(json.dumps({"version": 99, "ratios": {}}))
    with pytest.raises(ValueError, match="version 1, 2"):
        load(path)


def test_an_unchanged_candidate_on_a_noisy_run_passes() -> None:
    # The same kernel: ratios centred on 0.8 in both runs, the second much noisier (a busy neighbour).
    base = {"k": ratios(0.8, 0.05)}
    noisy = {"k": ratios(0.8, 0.6, seed=1)}
    assert regressions(base, noisy, 0.2) == []


def test_a_real_regression_fails_with_the_figures() -> None:
    base = {"k": ratios(0.8, 0.05)}
    slower = {"k": ratios(1.2, 0.05, seed=1)}  # 1.5x the baseline's ratio
    (line,) = regressions(base, slower, 0.2)
    assert line.startswith("k: compiled/eager 1.5") and "(limit 1.20x)" in line


def test_keys_in_one_run_only_are_not_compared() -> None:
    assert regressions({"a": [1.0]}, {"b": [9.0]}, 0.2) == []


def test_threshold_parses_percent_or_fraction() -> None:
    assert threshold("20%") == pytest.approx(0.2) and threshold("0.1") == pytest.approx(0.1)
    for bad in ("fast", "-5%"):
        with pytest.raises(argparse.ArgumentTypeError):
            threshold(bad)


def test_a_run_beside_a_busy_neighbour_is_inconclusive_not_failed() -> None:
    """Measured: beside a neighbour on every core, eager ran 2.4-5x slower, and small compiled kernels with
    parallel loops 4-5x worse relative to eager: an unchanged candidate "regressed" with confidence. The
    eager gauge says the runs are not comparable: inconclusive, with the reason; not failed."""
    keys = [f"k{i}" for i in range(10)]
    base = Record({k: ratios(0.5, 0.05, seed=i) for i, k in enumerate(keys)}, {k: 0.2 for k in keys})
    loaded = Record(
        {k: ratios(2.0 if i < 3 else 0.55, 0.1, seed=10 + i) for i, k in enumerate(keys)},
        {k: 0.2 * 2.4 for k in keys},
    )
    assert len(regressions(base.ratios, loaded.ratios, 0.2)) == 3  # what the ratio rule alone says
    v = judge(base, loaded, 0.2)
    assert not v.failed and v.load == pytest.approx(2.4)
    assert "eager ran 2.40x its baseline time (median over 10 comparisons)" in v.inconclusive
    # The same regression on a machine as quiet as the baseline's fails.
    quiet = Record(loaded.ratios, dict(base.eager_ms))
    v = judge(base, quiet, 0.2)
    assert v.failed and len(v.regressions) == 3 and not v.inconclusive and v.load == pytest.approx(1.0)


def test_a_comparison_whose_eager_time_moved_is_not_judged() -> None:
    """A burst of load during one comparison of an otherwise quiet run: eager's time there moved beyond the
    limit, so that comparison is not judged; the others are."""
    steady = {f"s{i}": ratios(0.5, 0.05, seed=20 + i) for i in range(5)}
    base = Record(
        {"a": ratios(0.5, 0.05), "b": ratios(0.5, 0.05, seed=1), **steady}, {k: 1.0 for k in ["a", "b", *steady]}
    )
    run = Record(
        {"a": ratios(1.5, 0.05, seed=2), "b": ratios(1.5, 0.05, seed=3), **steady},
        {"a": 3.0, "b": 1.1, **{k: 1.0 for k in steady}},
    )
    v = judge(base, run, 0.2)
    assert v.unjudged == ["a"] and len(v.regressions) == 1 and v.regressions[0].startswith("b:")
    assert v.failed  # b regressed on a comparable measurement
    # Faster eager (the baseline was the loaded one) is just as incomparable.
    assert judge(run, base, 0.2).unjudged == ["a"]
    assert LOAD_LIMIT == 1.5


def test_without_eager_timings_the_ratio_rule_alone_judges() -> None:
    base, slower = Record({"k": ratios(0.8, 0.05)}), Record({"k": ratios(1.2, 0.05, seed=1)})
    v = judge(base, slower, 0.2)
    assert v.failed and v.load is None and v.unjudged == []
