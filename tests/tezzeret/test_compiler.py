"""Tezzeret on real (tiny) blueprints: guards from export, entries in Urza, reuse, eager fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.artifacts.weights import load_state
from esper.catalog import load_catalog
from esper.tezzeret.compiler import Tezzeret
from esper.tezzeret.content import source_digest
from esper.urza import Urza
from tests.support import BROKEN

pytestmark = pytest.mark.compiles


def test_guard_schema_matches_the_declared_dims(compiled_urza: Path) -> None:
    with Urza(compiled_urza, readonly=True) as urza:
        (entry,) = urza.entries("tiny_mlp")
    assert entry.guards == GuardSchema(
        inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=32), DimGuard(size=8))),),
        device="cpu",
        range_constraints=entry.guards.range_constraints,  # type: ignore[union-attr]
    )
    assert list(entry.guards.range_constraints.values()) == ["[1, 32]"]  # type: ignore[union-attr]


def test_entry_records_compile_evidence(compiled_urza: Path, tiny_catalog) -> None:  # type: ignore[no-untyped-def]
    with Urza(compiled_urza, readonly=True) as urza:
        (entry,) = urza.entries("tiny_mlp")
        artifact = urza.store.verify(entry.checksum, entry.artifact_size)
    assert entry.engine == "aoti" and artifact.stat().st_size == entry.artifact_size
    assert (entry.artifact, entry.variant, entry.profile) == ("inference", "default", "default")
    assert entry.meta["source_digest"] == source_digest(
        tiny_catalog.get("tiny_mlp"), tiny_catalog.get("tiny_mlp").build()
    )
    assert entry.meta["compile_seconds"] > 0 and entry.meta["aoti_seconds"] > 0
    assert entry.meta["package_metadata"]["AOTI_DEVICE_KEY"] == "cpu"
    # The package's constants are a subset of the state dict (Inductor may fold some into the code).
    assert entry.meta["constants"]["fc.weight"] == {"shape": [8, 8], "dtype": "float32"}
    assert set(entry.meta["constants"]) <= {"fc.weight", "fc.bias"}
    for label in ("batch=4", "batch=16"):
        figures = entry.performance["tezzeret"][label]
        assert figures["compiled"]["p50_ms"] <= figures["compiled"]["p95_ms"]
        assert entry.parity["representative"][label]["max_abs"] <= 1e-5


def test_inductor_cache_is_persistent_and_user_choice_wins(compiled_urza: Path, inductor_cache: Path) -> None:
    with Urza(compiled_urza, readonly=True) as urza:
        (entry,) = urza.entries("tiny_mlp")
    # The test session set TORCHINDUCTOR_CACHE_DIR, so Tezzeret kept it rather than its default beside Urza.
    assert entry.meta["inductor_cache"] == str(inductor_cache) == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert any(inductor_cache.iterdir())


def test_unchanged_blueprint_is_reused(compiled_urza: Path, tiny_catalog) -> None:  # type: ignore[no-untyped-def]
    with Urza(compiled_urza) as urza:
        outcome = Tezzeret(urza).compile(tiny_catalog.get("tiny_mlp"))
        assert outcome.reused and len(urza.entries("tiny_mlp")) == 1


def test_unexportable_blueprint_becomes_an_eager_fallback(tmp_path: Path) -> None:
    bp = load_catalog([BROKEN]).get("not_exportable")
    with Urza(tmp_path / "urza.db") as urza:
        outcome = Tezzeret(urza).compile(bp)
        entry = outcome.entry
        weights = load_state(urza.store.verify(entry.checksum, entry.artifact_size))
    assert (entry.engine, entry.status, entry.failed_check) == ("eager", "fallback", "compile")
    assert entry.artifact == "inference" and not outcome.reused and outcome.route == "eager"
    assert entry.failure_reason and entry.failure_reason.startswith("export failed:")
    assert entry.meta["failed_stage"] == "export"
    assert set(weights) == {"fc.weight", "fc.bias"}
