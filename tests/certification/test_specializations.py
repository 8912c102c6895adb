"""Exact-size specializations end to end: a GRU whose ``seq`` torch.export cannot keep dynamic is compiled at
its representative and hot sequence lengths, certified like any candidate, and served compiled at exactly those
sizes and eager by evidence everywhere else."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.artifacts.compat import current
from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard, compile_dispatch
from esper.catalog import load_catalog
from esper.certification.budgets import PROFILES
from esper.certification.compile_ahead import CompileAhead, CompileJob, CompilePool
from esper.certification.results import Outcome
from esper.certification.run import BlueprintCertification
from esper.kasmina import Kasmina
from esper.kasmina.choose import choose_entries
from esper.tezzeret.compiler import built_in_this_process
from esper.urza import Entry, EntryEngine, EntryStatus, Urza
from tests.support import FIXTURES

SPECIAL = FIXTURES / "special"
NAME = "tiny_gru"


@pytest.fixture(scope="module")
def certified(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> Path:
    """The fixture GRU compiled and certified once (inference) into a fresh Urza."""
    urza = tmp_path_factory.mktemp("special") / "urza.db"
    bp = load_catalog([SPECIAL]).get(NAME)
    BlueprintCertification.create(bp, urza, PROFILES["cpu-2core"]).certify()
    return urza


def rows(urza: Path) -> list[Entry]:
    with Urza(urza, readonly=True) as u:
        return [r.entry for r in u.stored_rows(NAME, newest_first=True) if r.entry is not None]


def oracle(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_catalog([SPECIAL]).get(NAME).build().eval()(x)


class RecordingPool(CompilePool):
    """The real pool (a spawned worker process), noting each job it is given."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.given: list[CompileJob] = []

    def submit(self, job: CompileJob) -> Any:
        self.given.append(job)
        return super().submit(job)


# First in this module: before the fixture above builds the same packages in this process.
def test_a_needed_specialization_compiles_in_a_worker_and_no_other_is_sent(
    tmp_path: Path, inductor_cache: Path
) -> None:
    """The certification's process times no package it built, specializations included: with compile workers,
    a specialization its profile's fallback needs is compiled by a worker and reused here; one it does not need
    (batch stays dynamic) is skipped without a job."""
    bp = load_catalog([SPECIAL]).get(NAME)
    run = BlueprintCertification.create(bp, tmp_path / "urza.db", PROFILES["cpu-2core"])
    inference = run["inference"]
    pool = RecordingPool(1)
    inference.ahead = CompileAhead.start([], pool)
    try:
        base = inference.compile("default/default")  # not planned here: compiled in this process, falls back
        unneeded = inference.compile("default@batch=2/default")
        needed = inference.compile("default@seq=8/default")
    finally:
        pool.close()
    assert base.outcome == Outcome.PASSED and unneeded.outcome == Outcome.SKIPPED, (base, unneeded)
    assert "does not need batch held exact" in unneeded.reason
    assert needed.outcome == Outcome.PASSED, needed
    assert [j.profile for j in pool.given] == ["default@seq=8"], "only the needed specialization is a job"
    c = inference.candidates["default@seq=8/default"]
    assert c.entry is not None and c.entry.engine == EntryEngine.AOTI and c.reused
    assert not built_in_this_process(c.entry), "compiled by the worker: timed apart from its compile"


def test_tezzeret_stores_specializations_instead_of_one_fallback(certified: Path) -> None:
    entries = rows(certified)
    fallback = [e for e in entries if e.status == EntryStatus.FALLBACK]
    assert [e.profile for e in fallback] == ["default"]
    assert fallback[0].meta["specialize"] == ["seq"]
    compiled = {e.profile: e for e in entries if e.engine == EntryEngine.AOTI}
    # The representative seq (8) and the declared hot one (24); batch stays dynamic, so no batch specialization.
    assert sorted(compiled) == ["default@seq=24", "default@seq=8"]
    for profile, e in compiled.items():
        n = int(profile.rsplit("=", 1)[1])
        assert e.guards is not None and e.guards.dim_ranges() == {"batch": (1, 16), "seq": (n, n)}


def test_the_rest_of_the_range_is_a_certified_eager_route(certified: Path) -> None:
    eager = [e for e in rows(certified) if e.profile == "default" and e.status == EntryStatus.CERTIFIED]
    assert len(eager) == 1 and eager[0].engine == EntryEngine.EAGER
    assert eager[0].guards is not None and eager[0].guards.dim_ranges() == {"batch": (1, 16), "seq": (2, 96)}
    # Its decision says why no compiled code serves there: the whole-range compile fell back (seq held exact).
    note = eager[0].meta["certification"]["decision"]["note"]
    assert note.startswith("seq cannot stay dynamic (export failed: "), note


def test_kasmina_serves_the_exact_sizes_compiled_and_eager_elsewhere_without_warning(
    certified: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The oracle of which sizes run compiled: the certified compiled specializations in Urza (certification may
    # have routed one eager where it did not win).
    won = {
        int(e.profile.rsplit("=", 1)[1])
        for e in rows(certified)
        if e.engine == EntryEngine.AOTI and e.status == EntryStatus.CERTIFIED
    }
    with caplog.at_level(logging.INFO, logger="esper"):
        kernel = Kasmina(certified, blueprint_paths=[SPECIAL]).load(NAME)
        for seq in (7, 8, 9, 23, 24, 25, 2, 96):
            x = torch.randn(3, seq, 16, generator=torch.Generator().manual_seed(seq))
            # Compiled code may reassociate: a tolerance for float32 rounding, far below any wrong result.
            torch.testing.assert_close(kernel(x), oracle(x), atol=1e-4, rtol=1e-4)
            assert kernel.last_path == ("compiled" if seq in won else "eager"), seq
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_specialization_refuses_a_neighbouring_size(certified: Path) -> None:
    entry = next(e for e in rows(certified) if e.profile == "default@seq=8")
    kernel = Kasmina(certified, blueprint_paths=[SPECIAL]).load_entry(NAME, entry.id)  # type: ignore[arg-type]
    assert kernel.check(torch.randn(2, 8, 16)) is None
    for seq in (7, 9):
        assert kernel.check(torch.randn(2, seq, 16)) is not None


def schema(seq: tuple[int, int]) -> GuardSchema:
    dims = (DimGuard(name="batch", min=1, max=16), DimGuard(name="seq", min=seq[0], max=seq[1]), DimGuard(size=16))
    return GuardSchema(inputs=(InputGuard("x", "float32", dims),))


def test_the_first_route_that_accepts_serves_so_specializations_go_first() -> None:
    special, whole = schema((8, 8)), schema((2, 96))
    route_of = compile_dispatch([special, whole])
    assert route_of is not None
    assert route_of([torch.zeros(2, 8, 16)]) == 0
    assert route_of([torch.zeros(2, 9, 16)]) == 1
    # The seeded defect: the whole range first would shadow the specialization.
    shadowed = compile_dispatch([whole, special])
    assert shadowed is not None and shadowed([torch.zeros(2, 8, 16)]) == 0


def test_choose_entries_puts_specializations_first_whatever_the_meta_order() -> None:
    key = current("cpu")
    profiles = ["default", "default@seq=8"]

    def entry(i: int, profile: str, engine: EntryEngine) -> Entry:
        return Entry(
            blueprint=NAME,
            blueprint_version=1,
            content_hash=f"{i:064x}",
            compat=key,
            engine=engine,
            status=EntryStatus.CERTIFIED,
            checksum=f"{i:064x}",
            artifact_size=1,
            guards=schema((8, 8) if "@" in profile else (2, 96)),
            profile=profile,
            variant="default",
            artifact="inference",
            meta={"profiles": profiles},
            id=i,
        )

    newest_first = [entry(2, "default", EntryEngine.EAGER), entry(1, "default@seq=8", EntryEngine.AOTI)]
    assert [e.profile for e in choose_entries(newest_first, key)] == ["default@seq=8", "default"]


def test_an_urza_without_specializations_loads_as_before(
    certified: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The twin: the same Urza as one written before specializations existed (the blueprint's only rows are its
    fallbacks) still loads, eager with the fallback's WARNING, and serves the right results."""
    shutil.copytree(certified.parent, tmp_path / "urza", ignore=shutil.ignore_patterns("inductor-cache"))
    old = tmp_path / "urza" / certified.name
    with sqlite3.connect(old) as db:
        db.execute("DELETE FROM entries WHERE profile LIKE '%@%' OR status = 'certified'")
    assert {e.status for e in rows(old)} == {EntryStatus.FALLBACK}
    with caplog.at_level(logging.INFO, logger="esper"):
        kernel = Kasmina(old, blueprint_paths=[SPECIAL]).load(NAME)
        x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(kernel(x), oracle(x))
    assert kernel.route == "eager" and kernel.last_path == "eager"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING]
