"""The certify summary (esper.certification.session): one row per blueprint from Urza's entries, the training
artifact's route and ratio in columns of their own, never mixed into the inference figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from esper.artifacts.compat import current
from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint, Dim, Input
from esper.certification.budgets import PROFILES
from esper.certification.run import BlueprintCertification
from esper.certification.session import TABLE_HEADERS, summary_row, table_row
from esper.urza import Entry

BP = Blueprint(
    name="b",
    version=1,
    build=lambda: None,
    inputs=(Input("x", "float32", (Dim("batch", 1, 64), 4)),),
    representative=({"batch": 2}, {"batch": 8}),
)
GUARDS = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=64), DimGuard(size=4))),))


def figures(p50: float) -> dict[str, float]:
    return {"p50_ms": p50, "p95_ms": p50 * 1.1}


def entry(entry_id: int, artifact: ArtifactKind, kind: str, performance: dict[str, Any], **meta: Any) -> Entry:
    return Entry(
        "b",
        1,
        "h",
        current(),
        kind,
        "certified",
        "0" * 64,
        1,
        GUARDS,
        artifact=artifact,
        performance={"certify": performance},
        meta={"representative": [{"batch": 2}, {"batch": 8}], "profiles": ["default"], **meta},
        id=entry_id,
    )


# Newest first, as Urza lists them: a training eager route (its compiled step lost at 1.3x eager) newer than
# the certified inference entry; the training figures are ten times larger and must not leak into inference's.
ENTRIES = [
    entry(
        2,
        ArtifactKind.TRAINING,
        "eager",
        {"batch=2": {"eager": figures(10.0)}, "batch=8": {"eager": figures(40.0)}},
        certification={"decision": {"winner": None, "ratio": 1.3, "note": "eager"}},
    ),
    entry(
        1,
        ArtifactKind.INFERENCE,
        "aoti",
        {
            "batch=2": {"compiled": figures(0.5), "eager": figures(1.0)},
            "batch=8": {"compiled": figures(1.0), "eager": figures(4.0)},
        },
    ),
]


@pytest.fixture
def run(tmp_path: Path) -> BlueprintCertification:
    return BlueprintCertification.create(BP, tmp_path / "urza.db", PROFILES["cpu-2core"])


def test_training_sits_beside_inference(run: BlueprintCertification) -> None:
    row = summary_row(run, ENTRIES, current())
    assert row["status"] == "certified" and row["entries"] == "#1"
    assert row["p50_ms"] == {"batch=2": 0.5, "batch=8": 1.0}
    assert row["eager_p50_ms"] == {"batch=2": 1.0, "batch=8": 4.0}
    assert row["speedup"] == pytest.approx(2 * 2**0.5, abs=1e-3)  # geomean of 2x and 4x
    assert (row["train_route"], row["train_ratio"]) == ("eager", 1.3)
    cells = dict(zip(TABLE_HEADERS, table_row(row), strict=True))
    assert (cells["train route"], cells["train ratio"]) == ("eager", 1.3)
    assert cells["p50 ms"] == "0.5/1" and cells["eager p50"] == "1/4"


def test_a_compiled_training_route_shows_its_ratio(run: BlueprintCertification) -> None:
    compiled = entry(
        3,
        ArtifactKind.TRAINING,
        "aoti",
        {
            "batch=2": {"compiled": figures(5.0), "eager": figures(10.0)},
            "batch=8": {"compiled": figures(10.0), "eager": figures(40.0)},
        },
    )
    row = summary_row(run, [compiled, *ENTRIES], current())
    # No recorded decision: the inverse of the measured speedup (geomean of 2x and 4x).
    assert row["train_route"] == "compiled" and row["train_ratio"] == pytest.approx(1 / (2 * 2**0.5), abs=1e-3)
    assert row["p50_ms"] == {"batch=2": 0.5, "batch=8": 1.0}


def test_no_training_artifact(run: BlueprintCertification, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "0")
    assert summary_row(run, ENTRIES[1:], current())["train_route"] == "off (ESPER_CERTIFY_TRAINING=0)"
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "1")
    row = summary_row(run, ENTRIES[1:], current())
    assert (row["train_route"], row["train_ratio"]) == ("none", None)


def test_parity_comes_from_this_session_else_from_the_routes(run: BlueprintCertification) -> None:
    routed = ENTRIES[1].with_(parity={"certify": {"max_abs": 1e-6, "cases": 12}})
    row = summary_row(run, [ENTRIES[0], routed], current())
    assert (row["parity_max_abs"], row["cases"]) == (1e-6, 12)
    run["inference"].candidates["default/default"].parity.add(2e-6, 1e-6)
    row = summary_row(run, [ENTRIES[0], routed], current())
    assert (row["parity_max_abs"], row["cases"]) == (2e-6, 1)
