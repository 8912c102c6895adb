"""The release gate (esper.certification.gate): per-round compiled/eager ratios of this run against a stored
baseline's, failing only on a regression beyond the threshold with confidence."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from esper.certification.gate import load, record, regressions, threshold

KEY = ("swiglu", "inference", "default/default", "batch=8")


def ratios(center: float, spread: float, n: int = 12, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [center * (1 + spread * (rng.random() - 0.5)) for _ in range(n)]


def test_record_round_trips_and_refuses_other_versions(tmp_path: Path) -> None:
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(record([(KEY, [0.8, 0.9])], {"torch": "2.13"})))
    assert load(path) == {"swiglu|inference|default/default|batch=8": [0.8, 0.9]}
    path.write_text(json.dumps({"version": 99, "ratios": {}}))
    with pytest.raises(ValueError, match="version 1"):
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
