"""Typed evidence (esper.urza.evidence): the write-side dataclasses round-trip through their JSON, and the one
tolerant reader reads rows as the previous release wrote them (tests/fixtures/evidence_13101fa.json: real rows of
a catalog certification by that release's code) in ``esper urza list``, ``esper report`` and the summary.

The oracles are the fixture's raw JSON, read here by hand: never the reader under test."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from esper.artifacts.kinds import ArtifactKind
from esper.certification.session import routed_latency, training_ratio
from esper.cli import cli
from esper.report import KindEvidence, rows, series
from esper.urza import Entry, EntryEngine, EntryStatus, Urza
from esper.urza.evidence import (
    EVIDENCE_VERSION,
    CertificationRecord,
    CertifiedParity,
    CompileRecord,
    DecisionRecord,
    Evidence,
    Meta,
    Parity,
    Performance,
    ShapeParity,
    ShapeTiming,
    Timing,
    summarize,
)
from tests.support import FIXTURES

OLD = json.loads((FIXTURES / "evidence_13101fa.json").read_text())["rows"]


def old_entry(raw: dict[str, Any]) -> Entry:
    """A fixture row as Urza stores it (JSON columns as text), read by today's row reader."""
    row = dict(raw)
    for column in ("parity", "performance", "meta"):
        row[column] = json.dumps(raw[column], sort_keys=True)
    return Entry.from_row(row)


def by(artifact: str, kind: str, status: str) -> dict[str, Any]:
    return next(r for r in OLD if (r["artifact"], r["kind"], r["status"]) == (artifact, kind, status))


def geomean(xs: list[float]) -> float:
    return math.prod(xs) ** (1 / len(xs))


# -- the write side ------------------------------------------------------------------------------------------


def test_each_evidence_value_round_trips_through_its_json() -> None:
    timing = ShapeTiming(Timing(0.5, 0.7, {"n": 30}), Timing(1.0, 1.2, {"rounds": 4}), 0.5, {"decision": "faster"})
    perf = Performance(tezzeret={"batch=2": ShapeTiming(Timing(1.0, 2.0), Timing(3.0, 4.0))}, certify={"b=1": timing})
    parity = Parity(
        representative={"batch=2": ShapeParity(1e-6, 1.5, True)},
        certify=CertifiedParity(cases=12, max_abs=2e-6, rmse_ratio=None, parts={"output": {"failures": 0}}),
    )
    record = CertificationRecord("2025-01-01T00:00:00+00:00", "inference", "ci", {"max_ratio": 1.0}, {"host": "h"})
    decided = CertificationRecord(None, "training", None, decision=DecisionRecord(None, 1.3, "eager is faster"))
    timed = CertificationRecord(None, "inference", None, timed_apart=False)
    assert timed.to_json()["timed_apart"] is False and "timed_apart" not in record.to_json()
    for value in (perf, parity):
        stored = json.loads(json.dumps(value.to_json()))
        assert stored["version"] == EVIDENCE_VERSION and type(value).from_json(stored) == value
    for value in (record, decided, timed):
        assert CertificationRecord.from_json(json.loads(json.dumps(value.to_json()))) == value
    meta = json.loads(json.dumps({"certification": decided.to_json(), **CompileRecord(1.23456, ("w",)).to_json()}))
    read = Meta.from_json(meta)
    assert (read.compile_seconds, read.decided_ratio(), read.version) == (1.235, 1.3, EVIDENCE_VERSION)


def test_the_reader_reads_wrong_types_as_not_recorded_and_keeps_unknown_keys() -> None:
    raw = {
        "certify": {"b=1": {"compiled": {"p50_ms": "fast", "p95_ms": float("nan")}, "eager": [1], "ratio": True}},
        "tezzeret": "not a table",
        "future": {"kept": 1},
        "version": EVIDENCE_VERSION + 5,
    }
    perf = Performance.from_json(raw)
    row = perf.certify["b=1"]
    assert row.compiled == Timing(None, None) and row.eager is None and row.ratio is None
    assert perf.tezzeret == {} and row.speedup() is None
    assert perf.to_json()["future"] == {"kept": 1}
    assert Parity.from_json({"certify": {"cases": -3, "max_abs": "x"}}).error() == (None, None)
    assert Parity.from_json(["not", "a", "mapping"]) == Parity(version=0)
    assert Meta.from_json({"representative": "x", "ranges": {"batch": [1]}, "certification": 3}) == Meta()


# -- rows the previous release wrote -------------------------------------------------------------------------


def test_every_old_row_reads_and_rewrites_without_losing_a_figure() -> None:
    kinds = {(r["artifact"], r["kind"], r["status"]) for r in OLD}
    assert kinds >= {
        ("inference", "aoti", "certified"),
        ("inference", "aoti", "rejected"),
        ("inference", "eager", "certified"),
        ("training", "aoti", "certified"),
        ("training", "eager", "fallback"),
    }
    for raw in OLD:
        entry = old_entry(raw)
        assert isinstance(entry.status, EntryStatus) and isinstance(entry.engine, EntryEngine)
        assert entry.to_row()["status"] == raw["status"]  # stored as the same text
        ev = Evidence.of(entry)
        assert ev.parity.version == ev.performance.version == ev.meta.version == 0
        for typed, column in ((ev.parity, "parity"), (ev.performance, "performance")):
            rewritten = typed.to_json()
            rewritten.pop("version")
            assert rewritten == raw[column], (raw["id"], column)


def test_an_old_certified_compiled_row_reads_its_certification_figures() -> None:
    raw = by("inference", "aoti", "certified")
    ev = Evidence.of(old_entry(raw))
    cert = raw["parity"]["certify"]
    assert ev.parity.error() == (cert["max_abs"], cert["cases"]) and ev.parity.rmse_ratio() == cert["rmse_ratio"]
    table = raw["performance"]["certify"]  # certification's figures win over Tezzeret's
    labels = [",".join(f"{k}={v}" for k, v in r.items()) for r in raw["meta"]["representative"]]
    assert list(ev.latency()) == [label for label in labels if label in table]
    speedups = [t["eager"]["p50_ms"] / t["compiled"]["p50_ms"] for t in table.values()]
    assert ev.speedup() == pytest.approx(geomean(speedups))
    assert ev.meta.context()["git_commit"] == raw["meta"]["certification"]["context"]["git_commit"]


def test_an_old_fallback_and_an_old_eager_route_read_as_such() -> None:
    fallback = Evidence.of(old_entry(by("training", "eager", "fallback")))
    assert fallback.parity.error() == (None, None) and fallback.latency() == {} and fallback.speedup() is None
    assert fallback.meta.eager_reason == by("training", "eager", "fallback")["meta"]["training"]["reason"]
    raw = by("training", "eager", "certified")
    route = old_entry(raw)
    assert Evidence.of(route).route_path() == "eager"
    # The summary's training ratio is the one certification decided on, as recorded.
    assert training_ratio(route) == round(raw["meta"]["certification"]["decision"]["ratio"], 3)


# -- the listing, the report and the summary read through it -------------------------------------------------


@pytest.fixture
def old_urza(tmp_path: Path) -> Path:
    path = tmp_path / "urza.db"
    with Urza(path) as urza:
        urza.import_entries([old_entry(r) for r in OLD])
    return path


def test_urza_list_and_show_read_old_rows(old_urza: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(cli, ["urza", "list", "--json", "--urza", str(old_urza)])
    assert listed.exit_code == 0, listed.output
    got = {r["id"]: r for r in json.loads(listed.output)}
    assert set(got) == {r["id"] for r in OLD}
    raw = by("inference", "aoti", "certified")
    row = got[raw["id"]]
    assert row["status"] == "certified" and row["artifact"] == "inference"
    assert row["cases"] == raw["parity"]["certify"]["cases"]
    assert row["parity_max_abs"] == pytest.approx(raw["parity"]["certify"]["max_abs"], rel=1e-3)
    label, figures = next(iter(raw["performance"]["certify"].items()))
    assert row["p50_ms"][label] == pytest.approx(figures["compiled"]["p50_ms"], rel=1e-3)
    fallback = got[by("training", "eager", "fallback")["id"]]
    assert (fallback["parity_max_abs"], fallback["speedup"], fallback["p50_ms"]) == (None, None, {})
    shown = runner.invoke(cli, ["urza", "show", str(raw["id"]), "--json", "--urza", str(old_urza)])
    assert json.loads(shown.output)[0]["summary"]["cases"] == raw["parity"]["certify"]["cases"]


def test_report_and_summary_read_old_rows() -> None:
    raw = by("inference", "aoti", "certified")
    entry = old_entry(raw)
    ev = KindEvidence(ArtifactKind.INFERENCE, (entry,), (entry,), None)
    (cells,) = rows(ev)
    assert cells[3] == "certified (routed)" and cells[6] == str(raw["parity"]["certify"]["cases"])
    dim, lines = series(ev)
    label, figures = next(iter(raw["performance"]["certify"].items()))
    size = int(dict(p.split("=") for p in label.split(","))[dim])
    assert lines["routed"][size] == figures["compiled"]["p50_ms"] == lines[raw["variant"]][size]
    assert lines["eager"][size] == figures["eager"]["p50_ms"]

    class Bp:  # what routed_latency asks of a blueprint
        representative = raw["meta"]["representative"]

        @staticmethod
        def profiles() -> dict[str, dict[str, tuple[int, int]]]:
            return {raw["profile"]: {k: tuple(v) for k, v in raw["meta"]["ranges"].items()}}

        @staticmethod
        def measured_shapes() -> list[dict[str, int]]:
            return list(raw["meta"]["representative"])

    routed = routed_latency(Bp(), [entry])  # type: ignore[arg-type]
    assert routed[label].compiled == Timing.from_json(figures["compiled"])
    assert routed[label].eager == Timing.from_json(figures["eager"])


def test_the_conditioning_and_contract_figures_round_trip_and_old_rows_read_them_as_not_recorded() -> None:
    from esper.urza.evidence import CertifiedContract, Conditioning, PartConditioning

    parity = CertifiedParity(
        cases=3,
        conditioning={"gradient": PartConditioning(2, 1, 1.8, 3.5e5, Conditioning.ILL)},
        contract=CertifiedContract(cases=3, tensors=12, breaches={"mutation": 1}),
    )
    stored = json.loads(json.dumps(Parity(certify=parity).to_json()))
    assert stored["certify"]["conditioning"]["gradient"]["conditioning"] == "ill-conditioned"
    assert Parity.from_json(stored).certify == parity
    # A value the reader does not know reads as not recorded; the rest of the part stays.
    stored["certify"]["conditioning"]["gradient"]["conditioning"] = "wobbly"
    read = Parity.from_json(stored).certify
    assert read is not None and read.conditioning["gradient"].conditioning is None
    assert read.conditioning["gradient"].rejudged == 2
    for raw in OLD:
        certify = Parity.from_json(raw["parity"]).certify
        if certify is not None:
            assert (dict(certify.conditioning), certify.contract, certify.ill_conditioned()) == ({}, None, ())
            assert certify.cases == raw["parity"]["certify"]["cases"]


def test_the_summary_row_names_the_ill_conditioned_parts() -> None:
    from esper.urza.evidence import Conditioning, PartConditioning

    raw = by("inference", "aoti", "certified")
    parity = CertifiedParity(
        cases=3,
        conditioning={
            "gradient": PartConditioning(2, 1, 1.8, 3.5e5, Conditioning.ILL),
            "output": PartConditioning(1, 1, 1.1, 3.0, Conditioning.WELL),
        },
    )
    entry = old_entry(raw).with_(parity=Parity(certify=parity).to_json())
    assert summarize(entry)["ill_conditioned"] == ["gradient"]
    assert summarize(old_entry(raw))["ill_conditioned"] == []
