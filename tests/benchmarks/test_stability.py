"""The stability study's bookkeeping (benchmarks/stability.py), from plain rows: routes, false rejections,
routing changes and the report. Nothing is certified here."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import stability


def row(i: int, bp: str, artifact: str, profile: str, status: str, kind: str = "aoti", variant: str = "default"):
    return {
        "id": i, "blueprint": bp, "artifact": artifact, "profile": profile, "status": status, "kind": kind,
        "variant": variant,
    }  # fmt: skip


def run(index: int, routes: dict[str, str], failed: tuple[str, ...] = ()) -> stability.Run:
    return stability.Run(index, 1 if failed else 0, 600.0, failed, routes, stability.certified_kinds(routes))


def test_routes_are_the_newest_certified_row_per_profile() -> None:
    rows = [
        row(1, "mlp", "inference", "default", "certified", variant="default"),
        row(2, "mlp", "inference", "default", "rejected", variant="freezing"),
        row(3, "mlp", "inference", "default", "certified", variant="freezing"),
        row(4, "mlp", "training", "default", "certified", kind="eager", variant="eager"),
        row(5, "conv", "training", "default", "fallback", kind="eager", variant="default"),
    ]
    assert stability.routes_from_rows(rows) == {
        "mlp/inference/default": "freezing",
        "mlp/training/default": "eager",
    }
    # Rows that share their profile's cells are one route: their variants, in the group's order.
    shared = [{**r, "group": [1, 3]} if r["id"] in (1, 3) else r for r in rows]
    assert stability.routes_from_rows(shared)["mlp/inference/default"] == "default+freezing"


def test_false_rejections_and_changes_between_runs() -> None:
    a = run(
        1, {"mlp/inference/default": "freezing", "mlp/training/default": "default", "se/inference/default": "eager"}
    )
    b = run(2, {"mlp/inference/default": "eager", "mlp/training/default": "default"}, failed=("se::test_budgets",))
    expected = stability.expected_kinds([a, b])
    assert expected == {"mlp": ["inference", "training"], "se": ["inference"]}
    assert stability.false_rejections(a, expected) == []
    assert stability.false_rejections(b, expected) == ["se/inference"]
    assert stability.changes([a, b]) == {
        "mlp/inference/default": {"1": "freezing", "2": "eager"},
        "se/inference/default": {"1": "eager", "2": "-"},
    }
    summary = stability.summarize([a, b], {"neighbour": "matmul", "threads": 2, "ci": True})
    assert summary["verdict_changes"] == ["se/inference"]
    text = stability.markdown(summary)
    assert "| 2 | 1 | 600 |  | 1 | se/inference |  |" in text
    assert "Routing changes: 2 of 3 routes." in text


def test_failed_tests_read_from_junit(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="m" name="test_ok"/>'
        '<testcase classname="m" name="test_parity[x]"><failure message="no"/></testcase>'
        '<testcase classname="m" name="test_guards"><error message="boom"/></testcase></testsuite></testsuites>'
    )
    assert stability.failed_tests(junit) == ("m::test_parity[x]", "m::test_guards")
    assert stability.failed_tests(tmp_path / "missing.xml") == ()


def test_cpu_busy_fraction() -> None:
    assert stability.busy_fraction((100, 400), (300, 600)) == 1.0
    assert stability.busy_fraction((100, 400), (150, 600)) == 0.25
    assert stability.busy_fraction(None, (1, 2)) is None and stability.busy_fraction((1, 2), (1, 2)) is None
    now = stability.cpu_times()
    if now is not None:  # Linux
        busy, total = now
        assert 0 <= busy <= total


def test_a_pair_runs_two_certifications_at_once_and_judges_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two stand-in certifications (each waits until the other has started, so they must overlap) are both
    recorded, each with its own exit status and the other as its neighbour."""
    script = (
        "import sys, time, pathlib; d = pathlib.Path(sys.argv[1]); (d / 'started').touch(); "
        "other = d.parent / sys.argv[2] / 'started'; t = time.time() + 30\n"
        "while not other.exists() and time.time() < t: time.sleep(0.05)\n"
        "sys.exit(0 if other.exists() and d.name == 'run-1' else 3)"
    )

    def command(folder: Path, k: str | None) -> list[str]:
        other = "run-2" if folder.name == "run-1" else "run-1"
        return [sys.executable, "-c", script, str(folder), other]

    monkeypatch.setattr(stability, "certify_command", command)
    opts = argparse.Namespace(out=str(tmp_path), k=None, ci=False)
    runs = stability.certify_pair(1, opts)
    assert [(r.index, r.returncode, r.neighbour) for r in runs] == [
        (1, 0, {"kind": "pair", "with": 2}),
        (2, 3, {"kind": "pair", "with": 1}),
    ]
    assert all(r.routes == {} and r.seconds < 30 for r in runs)


def test_the_release_gate_judges_every_run_against_the_first_or_a_baseline(tmp_path: Path) -> None:
    """Every run certifies the same code: a regression the gate reports is a false alarm, counted per run."""
    from esper.certification.gate import record

    def write(index: int, ratios: list[float], folder: Path = tmp_path) -> Path:
        path = stability.latency_record(folder / f"run-{index}")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record([(("mlp", "inference", "default/default", "batch=2"), ratios)], {})))
        return path

    steady = [0.80, 0.82, 0.79, 0.81, 0.80, 0.83, 0.78, 0.80]
    write(1, steady)
    write(2, [r * 1.03 for r in steady])  # noise
    write(3, [r * 1.6 for r in steady])  # 60% slower, far outside both runs' spread
    runs = stability.gated([run(1, {}), run(2, {}), run(3, {})], tmp_path, None)
    assert [r.gate for r in runs[:2]] == [None, []]
    assert len(runs[2].gate or []) == 1 and "mlp inference default/default batch=2" in runs[2].gate[0]
    summary = stability.summarize(runs, {"neighbour": "pair", "threads": 2, "ci": True})
    assert list(summary["gate_false_alarms"]) == ["3"]
    text = stability.markdown(summary)
    assert "| 2 | 0 | 600 |  | 0 | 0 | 0 |" in text and "- run 3: mlp inference" in text
    # A run whose eager ran 3x slower than the baseline's everywhere was measured on a busier machine: its
    # 60% ratio regression is inconclusive, not an alarm.
    path = write(5, [r * 1.6 for r in steady])
    doc = json.loads(path.read_text())
    doc["eager_ms"] = {k: 3.0 for k in doc["ratios"]}
    path.write_text(json.dumps(doc))
    base_doc = json.loads(stability.latency_record(tmp_path / "run-1").read_text())
    base_doc["eager_ms"] = {k: 1.0 for k in base_doc["ratios"]}
    stability.latency_record(tmp_path / "run-1").write_text(json.dumps(base_doc))
    (busy,) = stability.gated([run(1, {}), run(5, {})], tmp_path, None)[1:]
    assert busy.gate == [] and "eager 3.00x the baseline's; inconclusive, not failed" in busy.gate_note
    # Against a stored baseline, the first run is judged too; a run with no record is not judged.
    base = write(9, steady, tmp_path / "stored")
    judged = stability.gated([run(1, {}), run(4, {})], tmp_path, base)
    assert judged[0].gate == [] and judged[1].gate is None


def test_rejudge_rereads_a_recorded_study(tmp_path: Path) -> None:
    """``--rejudge`` certifies nothing: it judges the recorded runs again (here: against a baseline given
    afterwards) and rewrites the report."""
    from esper.certification.gate import record

    key = ("mlp", "inference", "default/default", "batch=2")
    for index, scale in ((1, 1.0), (2, 1.6)):
        path = stability.latency_record(tmp_path / f"run-{index}")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record([(key, [0.8 * scale, 0.81 * scale, 0.79 * scale] * 4)], {})))
    options = {"neighbour": "pair", "threads": 2, "ci": True, "baseline": None}
    recorded = stability.summarize([run(1, {}), run(2, {})], options)
    (tmp_path / "stability.json").write_text(json.dumps(recorded))
    assert stability.main(["--rejudge", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "stability.json").read_text())
    assert list(summary["gate_false_alarms"]) == ["2"] and summary["options"]["neighbour"] == "pair"
    assert "Release gate false alarms" in (tmp_path / "stability.md").read_text()


def cmp(ratio: float, low: float, high: float, margin: float = 0.05) -> dict[str, float]:
    return {"ratio": ratio, "ratio_low": low, "ratio_high": high, "margin": margin}


def test_best_ratios_take_each_keys_lowest_candidate() -> None:
    rows = [
        {"blueprint": "mlp", "artifact": "inference", "profile": "default", "variant": "default",
         "comparisons": {"batch=2": cmp(0.9, 0.85, 0.95), "batch=8": cmp(0.7, 0.6, 0.8)}},
        {"blueprint": "mlp", "artifact": "inference", "profile": "default", "variant": "freezing",
         "comparisons": {"batch=2": cmp(0.8, 0.75, 0.85), "batch=8": None}},
        {"blueprint": "se", "artifact": "inference", "profile": "default", "variant": "default", "comparisons": {}},
    ]  # fmt: skip
    best = stability.best_ratios(rows)
    assert list(best) == ["mlp/inference/default"]
    assert best["mlp/inference/default"] == {
        "variant": "default", "shape": "batch=8", "ratio": 0.7, "low": 0.6, "high": 0.8, "margin": 0.05,
    }  # fmt: skip


def interval(low: float, high: float, margin: float = 0.05) -> dict[str, float]:
    return {"ratio": (low + high) / 2, "low": low, "high": high, "margin": margin}


def test_a_change_is_explained_only_where_the_intervals_reach_across_the_winning_line() -> None:
    # One run's interval straddles 0.95, or the runs' spread does: a ratio at the line, either decision fair.
    assert stability.explained([interval(0.90, 0.97), interval(0.96, 1.02)])
    assert stability.explained([interval(0.90, 0.94), interval(0.96, 1.00)])
    # Every run clearly wins, or clearly does not: a route that changed anyway did not reproduce.
    assert not stability.explained([interval(0.50, 0.60), interval(0.55, 0.65)])
    assert not stability.explained([interval(0.97, 1.10), interval(1.00, 1.20)])
    assert not stability.explained([])
    # The line follows the margin.
    assert stability.explained([interval(0.88, 0.92, margin=0.1)])


def test_route_changes_and_p2_spread_are_judged_and_reported() -> None:
    key, other, variants = "mlp/inference/default", "se/inference/default", "sw/inference/default"
    a = replace(
        run(1, {key: "default", other: "default", variants: "default"}),
        ratios={key: interval(0.90, 0.97), other: interval(0.5, 0.6), variants: interval(0.5, 0.6)},
        p2={"representative": 0.60, "grid": 0.75, "slower": 0},
    )
    b = replace(
        run(2, {key: "eager", other: "eager", variants: "freezing"}),
        ratios={key: interval(0.96, 1.02), other: interval(0.5, 0.6), variants: interval(0.5, 0.6)},
        p2={"representative": 0.63, "grid": 0.82, "slower": 1},
    )
    moved = stability.route_changes([a, b])
    assert moved[key]["explained"] and not moved[key]["variant_only"]
    assert not moved[other]["explained"]
    assert moved[variants]["variant_only"] and moved[variants]["explained"]
    summary = stability.summarize([a, b], {"neighbour": "none", "threads": 2, "ci": False})
    assert summary["unexplained_route_changes"] == [other]
    assert summary["p2_spread"] == {"representative": 0.03, "grid": 0.07}
    assert summary["p2_within"] is False  # the grid's P2 moved by more than 0.05
    text = stability.markdown(summary)
    assert f"Route changes the margin does not explain: 1 ({other})" in text
    assert f"| {other} | 1: default 0.55 [0.50-0.60]; 2: eager 0.55 [0.50-0.60] | **no** |" in text
    assert "| 2 | 0.630 | 0.820 | 1 |" in text
    assert "representative 0.030, grid 0.070; limit 0.05: **exceeded**" in text
    quiet = stability.summarize([a, replace(b, p2={"representative": 0.62, "grid": 0.77})], {"neighbour": "none"})
    assert quiet["p2_within"] is True


def test_p2_spread_needs_two_measured_runs() -> None:
    assert stability.p2_spread([replace(run(1, {}), p2={"representative": 0.6, "grid": None}), run(2, {})]) == {
        "representative": None,
        "grid": None,
    }
