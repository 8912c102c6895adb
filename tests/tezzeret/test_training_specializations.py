"""Training specializations: where the compiled training step serves only the sizes it was traced at in some
dims (a convolution's height and width), Tezzeret records those dims on the fallback and compiles one artifact
per representative combination of them, each serving exactly its sizes; every other size trains eager."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from esper.artifacts.kinds import ArtifactKind, spec
from esper.artifacts.variants import Variant
from esper.blueprint import Blueprint
from esper.catalog import load_catalog
from esper.certification.budgets import PROFILES
from esper.certification.run import BlueprintCertification, Certification
from esper.kasmina import Kasmina
from esper.kasmina.regions import region_lookup
from esper.kasmina.training_kernel import COMPILED, EAGER
from esper.numerics.coverage import edge_sizes
from esper.numerics.gradients import exact_gradients, gradients, tolerance
from esper.profiles import joint_specializations, split_profile
from esper.tezzeret import compiler
from esper.tezzeret.compiler import SPECIALIZE, Tezzeret
from esper.tezzeret.export import declared_guards
from esper.tezzeret.pipeline import VERIFY_SHAPES, Built, CompileJob, StageError
from esper.tezzeret.training_compile import HELD, TrainingPipeline, held_dims, layout_dims
from esper.urza import Entry, EntryEngine, EntryStatus, Urza
from esper.urza.evidence import ROUTE_TABLE
from tests.support import FIXTURES

SPECIAL = FIXTURES / "special"
NAME = "tiny_conv"
RANGES = {"batch": (2, 4), "height": (6, 12), "width": (6, 12)}
TRACED = {"batch": 3, "height": 9, "width": 11}
PAIR = "default@height=8,width=8"


@pytest.fixture(autouse=True, scope="module")
def training_specializations() -> Iterator[None]:
    """Training specializations are candidates only where switched on (the catalog's runs leave them off)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ESPER_TRAINING_SPECIALIZATIONS", "1")
        yield


def test_joint_specializations_are_the_shapes_own_combinations_not_the_cross_product() -> None:
    shapes = [{"batch": 2, "height": 8, "width": 8}, {"batch": 4, "height": 10, "width": 7}]
    names = joint_specializations({"default": RANGES}, shapes)
    pairs = [n for n in names if n.count("=") == 2 and "batch" not in n]
    assert pairs == ["default@height=8,width=8", "default@height=10,width=7"]
    assert names["default@height=10,width=7"] == {"batch": (2, 4), "height": (10, 10), "width": (7, 7)}
    # Every set of dims, each at a shape's own sizes: 3 singles x 2 shapes + 3 pairs x 2 + 1 triple x 2.
    assert len(names) == 14
    assert "default@height=8,width=7" not in names and "default@height=10,width=8" not in names


def test_the_training_kind_plans_its_specializations_after_its_whole_range() -> None:
    two = ({"batch": 2, "height": 8, "width": 8}, {"batch": 4, "height": 10, "width": 7})
    bp = dataclasses.replace(load_catalog([SPECIAL]).get(NAME), representative=two)
    ids = [c.id for c in spec(ArtifactKind.TRAINING).candidates(bp)]
    assert ids[0] == "default/default"
    assert "default@height=8,width=8/default" in ids and "default@height=10,width=7/default" in ids
    assert "default@height=8,width=7/default" not in ids


def fails_where(moved_together: set[str], moved_alone: set[str]) -> object:
    """A fake step that fails when every dim of ``moved_together`` leaves its traced size, or any one of
    ``moved_alone`` does."""

    def runs(sizes: Mapping[str, int]) -> bool:
        moved = {d for d in sizes if sizes[d] != TRACED[d]}
        return not (moved_together and moved_together <= moved) and not (moved & moved_alone)

    return runs


def test_held_dims_frees_dims_that_fail_only_together_one_at_a_time_only() -> None:
    failing = {"batch": 2, "height": 8, "width": 8}
    runs = fails_where({"height", "width"}, set())
    # The seeded defect of a probe that moves one dim at a time only: each alone runs, so it would free both.
    assert runs({**TRACED, "height": 8}) and runs({**TRACED, "width": 8})
    held = held_dims(runs, TRACED, failing, RANGES)  # type: ignore[arg-type]
    assert held == ["width"]
    # Held at their traced sizes, the held dims let the failing shape and both ends of the range run.
    assert all(runs({**s, **{d: TRACED[d] for d in held}}) for s in (failing, *edge_sizes(RANGES)))  # type: ignore[operator]
    # The clean twin: width alone fails; batch and height stay dynamic.
    assert held_dims(fails_where(set(), {"width"}), TRACED, failing, RANGES) == ["width"]  # type: ignore[arg-type]


def test_held_dims_is_empty_when_the_step_fails_at_its_traced_sizes_too() -> None:
    def never(sizes: Mapping[str, int]) -> bool:
        return False

    assert held_dims(never, TRACED, {"batch": 2, "height": 8, "width": 8}, RANGES) == []


def test_layout_dims_holds_the_other_non_leading_dims_of_the_held_dims_inputs() -> None:
    bp = load_catalog([SPECIAL]).get(NAME)
    assert layout_dims(bp, ["width"], RANGES) == ["height", "width"]
    assert layout_dims(bp, ["height"], RANGES) == ["height", "width"]
    # The leading dim enters no stride: held alone. A dim already held (a specialization's) is not named again.
    assert layout_dims(bp, ["batch"], RANGES) == ["batch"]
    assert layout_dims(bp, ["width"], {**RANGES, "height": (8, 8)}) == ["width"]
    assert layout_dims(bp, [], RANGES) == []


@pytest.fixture(scope="module")
def certified(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> Path:
    """The fixture conv's training candidates compiled and certified once into a fresh Urza: the whole range
    falls back, its step serving width only as traced, recording height and width (its input's layout) as the
    dims its specializations hold; the (height, width) specialization compiles; the others answer
    NotSpecialized without a compile."""
    urza = tmp_path_factory.mktemp("trainspec") / "urza.db"
    bp = load_catalog([SPECIAL]).get(NAME)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ESPER_CERTIFY_TRAINING", "1")
        run = Certification(bp, ArtifactKind.TRAINING, urza, PROFILES["cpu-2core"])
        BlueprintCertification({ArtifactKind.TRAINING: run}).certify()
    return urza


def training(urza: Path) -> dict[str, list[Entry]]:
    """The training entries by profile, newest first."""
    out: dict[str, list[Entry]] = {}
    with Urza(urza, readonly=True) as u:
        for e in u.entries(NAME, artifact="training"):
            out.setdefault(e.profile, []).append(e)
    return out


@pytest.mark.compiles
def test_the_whole_range_falls_back_naming_the_dim_its_step_holds(certified: Path) -> None:
    fallback = next(e for e in training(certified)["default"] if e.status == EntryStatus.FALLBACK)
    assert fallback.engine == EntryEngine.EAGER
    assert fallback.meta["failed_stage"] == VERIFY_SHAPES
    assert fallback.meta[HELD] == ["width"]
    assert "serves width only as traced" in (fallback.failure_reason or "")
    # Width held, a new compile pins height with it (they share the input's strides): both are held at once.
    assert fallback.meta[SPECIALIZE] == ["height", "width"]
    assert fallback.guards is not None and fallback.guards.dim_ranges() == RANGES


@pytest.mark.compiles
def test_the_pair_is_the_one_specialization_compiled_and_passes_every_check(certified: Path) -> None:
    entries = training(certified)
    # One compile per representative (height, width): no width-only specialization was attempted first.
    assert set(entries) == {"default", PAIR}
    # Its one compile; beside it at most the eager route certified where selection measured eager faster.
    assert [e.engine for e in entries[PAIR] if e.engine == EntryEngine.AOTI] == [EntryEngine.AOTI]
    assert all(e.status == EntryStatus.CERTIFIED for e in entries[PAIR] if e.engine == EntryEngine.EAGER)
    compiled = [e for es in entries.values() for e in es if e.engine == EntryEngine.AOTI]
    assert [e.profile for e in compiled] == [PAIR]
    # Certified where it wins, rejected by selection only where eager is faster: every other check passed.
    assert compiled[0].failed_check in (None, "selection"), compiled[0].failure_reason
    assert compiled[0].guards is not None
    assert compiled[0].guards.dim_ranges() == {"batch": (2, 4), "height": (8, 8), "width": (8, 8)}


@pytest.mark.compiles
def test_the_rest_of_the_range_is_a_certified_eager_route(certified: Path) -> None:
    (route,) = [e for e in training(certified)["default"] if e.status == EntryStatus.CERTIFIED]
    assert route.engine == EntryEngine.EAGER
    assert route.guards is not None and route.guards.dim_ranges() == RANGES


def oracle() -> torch.nn.Module:
    return load_catalog([SPECIAL]).get(NAME).build().train()


def same_step(kernel: torch.nn.Module, x: torch.Tensor, weights: torch.nn.Module) -> None:
    """The kernel's output and gradients at ``x`` are eager's (the oracle's, on the same weights)."""
    got_out, got = gradients(kernel, (x,), seed=1, weights=weights)
    want_out, want = gradients(oracle(), (x,), seed=1)
    exact_out, _ = exact_gradients(oracle(), (x,), seed=1)
    atol, rtol = tolerance(1e-4, 1e-4, want_out, exact_out)
    torch.testing.assert_close(got_out, want_out, atol=atol, rtol=rtol)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-3, rtol=1e-3, msg=n)


@pytest.fixture(scope="module")
def won(certified: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the certified Urza where the specialization won its selection (on this tiny module eager is
    usually faster): its compiled entry certified, its eager route not."""
    folder = tmp_path_factory.mktemp("won")
    shutil.copytree(certified.parent, folder, dirs_exist_ok=True)
    urza = folder / certified.name
    with Urza(urza) as u:
        for e in u.entries(NAME, artifact="training"):
            if e.profile == PAIR and e.engine == EntryEngine.AOTI:
                # Without the route table of its measured loss (eager in every region).
                meta = {k: v for k, v in e.meta.items() if k != ROUTE_TABLE}
                u.update(e.id, status=EntryStatus.CERTIFIED, failed_check=None, failure_reason=None, meta=meta)
            elif e.profile == PAIR and e.status == EntryStatus.CERTIFIED:
                u.update(e.id, status=EntryStatus.REJECTED, failed_check="selection", failure_reason="lost")
    return urza


@pytest.mark.compiles
@pytest.mark.parametrize("which", ["as certified", "won"])
def test_kasmina_trains_compiled_at_the_certified_sizes_and_eager_by_evidence_elsewhere(
    certified: Path, won: Path, which: str, caplog: pytest.LogCaptureFixture
) -> None:
    urza = certified if which == "as certified" else won
    # The oracle of where the step runs compiled: the certified compiled specializations in Urza, in the regions
    # their route tables (where selection recorded one) give the compiled code.
    won_entries = {
        tuple(split_profile(e.profile)[1].values()): e
        for es in training(urza).values()
        for e in es
        if e.engine == EntryEngine.AOTI and e.status == EntryStatus.CERTIFIED
    }
    if which == "won":
        assert set(won_entries) == {(8, 8)}

    def expected(x: torch.Tensor) -> str:
        entry = won_entries.get(tuple(x.shape[2:]))
        if entry is None:
            return EAGER
        compiled_at = region_lookup(entry)[1]
        return COMPILED if compiled_at is None or compiled_at((x,)) else EAGER

    with caplog.at_level(logging.INFO, logger="esper"):
        kernel = Kasmina(urza, blueprint_paths=[SPECIAL]).load_training(NAME, oracle())
        assert [e.profile for e in kernel.specializations] == [PAIR] * len(won_entries)
        assert "certified to train eager" in kernel.reason
        gen = torch.Generator().manual_seed(0)
        for batch, h, w in ((2, 8, 8), (4, 8, 8), (3, 8, 9), (2, 9, 8), (4, 12, 12), (2, 6, 6)):
            x = torch.randn(batch, 2, h, w, generator=gen)
            seed = kernel.bind(oracle())
            same_step(seed, x, seed.seed)
            assert seed.last_path == expected(x), (batch, h, w, seed.check(x))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.compiles
def test_the_specialization_trains_compiled_at_its_sizes_and_refuses_others(certified: Path) -> None:
    (entry,) = [e for e in training(certified)[PAIR] if e.engine == EntryEngine.AOTI]
    kernel = Kasmina(certified, blueprint_paths=[SPECIAL]).load_training(NAME, entry_id=entry.id)
    kernel.ignore_route_tables()  # the compiled code itself, wherever selection measured eager faster
    gen = torch.Generator().manual_seed(1)
    for batch in (2, 3, 4):
        x = torch.randn(batch, 2, 8, 8, generator=gen)
        seed = kernel.bind(oracle())
        same_step(seed, x, seed.seed)
        assert seed.last_path == COMPILED, seed.check(x)
    for hh, ww in ((9, 8), (8, 7)):
        why = kernel.check(torch.randn(2, 2, hh, ww))
        assert why is not None and ("height" in why or "width" in why), why


@dataclasses.dataclass(frozen=True)
class HoldingStep(TrainingPipeline):
    """A training pipeline whose compiled step serves width only as traced, and, compiled with width held,
    height, like the conv's; nothing is compiled. It counts the module builds (each candidate that builds also
    hashes the module) and the compiles (the ranges of each run)."""

    builds: list[str] = dataclasses.field(default_factory=list)
    runs: list[dict[str, tuple[int, int]]] = dataclasses.field(default_factory=list)

    def build(self, bp: Blueprint, device: torch.device) -> torch.nn.Module:
        self.builds.append("build")
        return super().build(bp, device)

    def run(self, job: CompileJob) -> Built:
        self.runs.append(dict(job.ranges))
        held = {d for d, (lo, hi) in job.ranges.items() if lo == hi}
        need = next((d for d in ("width", "height") if d not in held), None)
        if need is not None:
            job.meta[HELD] = [need]
            raise StageError(VERIFY_SHAPES, RuntimeError(f"it serves {need} only as traced"))
        path = job.tmp / "training.bin"
        path.write_bytes(repr(sorted(job.ranges.items())).encode())
        return Built(path=path, guards=declared_guards(job.bp, job.ranges, "cpu"), meta={}, parity={}, performance={})


@dataclasses.dataclass(frozen=True)
class OneDimAtATime(HoldingStep):
    """The seeded defect of a rule that holds only the dims the probe named: each compile discovers one more."""

    def static_dims(self, job: CompileJob) -> list[str]:
        return list(job.meta.get(HELD) or ())


def compile_with(step: HoldingStep, bp: Blueprint, urza: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    monkeypatch.setitem(compiler.PIPELINES, ArtifactKind.TRAINING, step)
    with Urza(urza) as u:
        outcomes = Tezzeret(u).compile_candidates(bp, artifacts=(ArtifactKind.TRAINING,))
    return [(o.entry.profile, o.entry.status, o.entry.meta.get(SPECIALIZE)) for o in outcomes]


def test_the_first_specialization_holds_the_held_dims_layout_one_compile_per_representative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    two = ({"batch": 2, "height": 8, "width": 8}, {"batch": 4, "height": 10, "width": 7})
    bp = dataclasses.replace(load_catalog([SPECIAL]).get(NAME), representative=two)
    step = HoldingStep()
    got = compile_with(step, bp, tmp_path / "urza.db", monkeypatch)
    assert got == [
        ("default", EntryStatus.FALLBACK, ["height", "width"]),
        (PAIR, EntryStatus.COMPILED, None),
        ("default@height=10,width=7", EntryStatus.COMPILED, None),
    ]
    # The whole range, then one compile per representative (height, width), batch dynamic in each.
    assert step.runs == [
        RANGES,
        {"batch": (2, 4), "height": (8, 8), "width": (8, 8)},
        {"batch": (2, 4), "height": (10, 10), "width": (7, 7)},
    ]
    # The candidates that are not specialized answer from the entries seen, without a build; each compiling
    # specialization builds once and reuses its profile's entry once (one build each).
    assert len(step.builds) == 1 + 2 * 2


def test_holding_only_the_probes_dims_does_not_compile_the_pair_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The seeded defect of a rule that holds only the dims the probe named: its first specialization is the
    # width one (which falls back), or none where the kind lists only whole layouts.
    got = compile_with(OneDimAtATime(), load_catalog([SPECIAL]).get(NAME), tmp_path / "urza.db", monkeypatch)
    assert got[0] == ("default", EntryStatus.FALLBACK, ["width"])
    assert got[1:2] != [(PAIR, EntryStatus.COMPILED, None)]


@dataclasses.dataclass(frozen=True)
class WholeLayoutsOnly(OneDimAtATime):
    """A kind that lists only the specializations holding height and width all or none."""

    def candidates(self, bp: Blueprint) -> list[tuple[str, Variant]]:
        return [(p, v) for p, v in super().candidates(bp) if ("height" in p) == ("width" in p)]


def test_a_specialization_whose_narrower_link_is_not_listed_is_not_specialized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = WholeLayoutsOnly()
    got = compile_with(step, load_catalog([SPECIAL]).get(NAME), tmp_path / "urza.db", monkeypatch)
    # The pair rests on the width one, which the kind does not list: nothing compiles after the whole range.
    assert got == [("default", EntryStatus.FALLBACK, ["width"])]
    assert len(step.runs) == 1


@dataclasses.dataclass(frozen=True)
class LayoutThenBatch(HoldingStep):
    """A compiled step that serves width only as traced, and, compiled with height and width held, batch."""

    def run(self, job: CompileJob) -> Built:
        held = {d for d, (lo, hi) in job.ranges.items() if lo == hi}
        if held == {"height", "width"}:
            self.runs.append(dict(job.ranges))
            job.meta[HELD] = ["batch"]
            raise StageError(VERIFY_SHAPES, RuntimeError("it serves batch only as traced"))
        return super().run(job)


TRIPLE = "default@batch=2,height=8,width=8"


def test_a_specialization_that_holds_more_dims_leads_to_the_wider_one_and_skips_build_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = LayoutThenBatch()
    bp = load_catalog([SPECIAL]).get(NAME)
    got = compile_with(step, bp, tmp_path / "urza.db", monkeypatch)
    assert got == [
        ("default", EntryStatus.FALLBACK, ["height", "width"]),
        (PAIR, EntryStatus.FALLBACK, ["batch"]),
        (TRIPLE, EntryStatus.COMPILED, None),
    ]
    assert len(step.runs) == 3
    # Three compiles, and the entries a compiling specialization rests on reused again (the pair: its profile;
    # the triple: its profile, and the pair, which reuses its profile once more). The candidates that are not
    # specialized answer from the entries seen, without a build.
    assert len(step.builds) == 3 + 1 + 3
