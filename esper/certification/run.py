"""One blueprint's certification: the checks a generated test module (or ``esper certify``) calls, and the
decision it publishes. Each check returns a :class:`~esper.certification.results.CheckResult` and records it.

:class:`Certification` is the one skeleton for every artifact kind (inference, training), parameterized by
its :class:`~esper.certification.kinds.KindChecks`. A kind's *candidates* (see :mod:`.plan`) are each
checked (parity against a float64 reference over the planned cases, see :mod:`esper.numerics.parity`; guards) and
timed against eager in interleaved rounds (:func:`esper.certification.timing.compare`) at the representative shapes
and over a grid across the profile (:mod:`.regions`); then :func:`choose_regions` picks each profile's route and
its route table (compiled only where the candidate won), or, where no grid was measured, :func:`choose` picks each
profile's route (see there: the candidate that meets the budget and beats eager with confidence, the first in
variant order unless a later one is faster by the margin with confidence, else
eager when eager meets the budget, else the fastest candidate that meets it; nothing meets it: rejected by
``budgets``, with the figures). A failed check marks that candidate ``rejected`` at once, with the check's
name and message and the figures measured so far;
:meth:`Certification.publish` writes the winners (``certified``), the losers (``rejected`` by ``selection``,
with their figures) and any eager routes, each in one transaction.

:class:`BlueprintCertification` holds one :class:`Certification` per kind; outcomes are keyed by
``(ArtifactKind, check)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from esper.artifacts.context import machine_context
from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint
from esper.certification import budgets, contract, plan, regions, timing
from esper.certification.cases import RefusedCase, refused_cases
from esper.certification.compile_ahead import CompileAhead, CompileJob
from esper.certification.contract import ClauseResult
from esper.certification.kinds import KINDS, Expected, KindChecks
from esper.certification.results import CANDIDATE_CHECKS, Check, CheckResult, Fail, Skip, check
from esper.kasmina import COMPILED, EAGER, telemetry
from esper.numerics import coverage, executions
from esper.numerics.inputs import Regime, make_inputs
from esper.numerics.parity import FLOOR_ULPS, POINTWISE_SLACK, ParityStats, ParityVerdict, bitwise_equal, summarize
from esper.profiles import is_specialization
from esper.tezzeret.compiler import SPECIALIZE, built_in_this_process
from esper.tezzeret.pipeline import NotSpecialized
from esper.urza import Entry, EntryEngine, EntryStatus, Urza
from esper.urza.evidence import (
    OWN_ROUTE_TABLE,
    ROUTE_GROUP,
    ROUTE_TABLE,
    CertificationRecord,
    CertifiedContract,
    CertifiedParity,
    CertifiedWeights,
    Conditioning,
    DecisionRecord,
    Parity,
    PartConditioning,
    Performance,
    RouteTable,
    ShapeTiming,
    Timing,
    geomean,
)

log = logging.getLogger("esper.certify")

CHECKS = tuple(Check)
# A compiled route must beat eager by this much, with confidence (interleaved rounds), or eager it is.
MARGIN = 0.05
CONFIDENCE = 0.95  # of a latency decision's interval
# Interleaved rounds of a latency comparison before an undecided one is called inconclusive (and routes eager).
MAX_ROUNDS = 24
# An inconclusive comparison at a representative shape is measured again (fresh interleaved rounds, each look at
# a stricter confidence: :func:`esper.certification.timing.confirm`) at most this often, and no new look starts
# once this many seconds were spent on it; still undecided, it stays inconclusive.
CONFIRM_LOOKS = 2
CONFIRM_SECONDS = 3.0
# A grid point's comparison (:meth:`Certification.compare_regions`): fewer calls a round and fewer rounds than at
# a representative shape, stopping as soon as the interval decides; at most about GRID_SECONDS a candidate,
# estimated from the representative shapes' timings (the costliest points are left unmeasured, and run eager).
GRID_CALLS = 3
GRID_MIN_ROUNDS = 6
GRID_ROUNDS = 2
GRID_MAX_ROUNDS = 12
GRID_SECONDS = 4.0
# Eager and float64 results of the planned cases are kept for the profile's other candidates up to this size.
REFERENCE_CACHE_BYTES = 256 * 2**20
SELECTION = "selection"
# The seed of the weight sets a candidate's seeds are certified at (esper.certification.contract.weight_sets).
WEIGHT_SEED = 0
FOLDED = "own only (folded)"
NO_CONTENDER = "no candidate passed its checks"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Parity runs hundreds of small calls: one intra-op thread is faster than waking several, and far faster
    on a busy machine (measured on 2 loaded cores, tiny_mlp's training parity: 2.7 s on one thread, 8.6 s on
    two). Timing (:meth:`Certification.compare_latency`) keeps the machine's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ContractTally:
    """The contract clauses judged on a candidate's parity calls (planned and drawn): how many calls and
    tensors, the breaches per clause, and the first breach with its case."""

    cases: int = 0
    tensors: int = 0
    breaches: dict[str, int] = field(default_factory=dict)  # by clause
    first: str | None = None

    def add(self, clauses: Sequence[ClauseResult], tensors: int, where: str) -> None:
        if not clauses:
            return
        self.cases += 1
        self.tensors += tensors
        for result in clauses:
            if result.breaches:
                self.breaches[str(result.clause)] = self.breaches.get(str(result.clause), 0) + len(result.breaches)
                if self.first is None:
                    self.first = f"{result.reason} (at {where})"

    def figures(self) -> dict[str, Any]:
        return self.record().to_json()

    def record(self) -> CertifiedContract:
        """The figures as Urza's evidence records them."""
        return CertifiedContract(cases=self.cases, tensors=self.tensors, breaches=dict(self.breaches))


@dataclass
class ConditioningTally:
    """The cases of one part (output, gradient, buffer) that failed the RMSE rule alone and were judged again
    against the spread of eager's legitimate executions (:func:`esper.numerics.executions.calibrate`), with the
    worst the executions said of them."""

    rejudged: int = 0
    admitted: int = 0
    spread_ratio: float = 0.0
    disagreement_ulps: float = 0.0
    conditioning: executions.Conditioning | None = None

    def add(self, part: executions.PartCalibration) -> None:
        self.rejudged += 1
        self.admitted += part.admitted
        self.spread_ratio = max(self.spread_ratio, part.spread_ratio)
        self.disagreement_ulps = max(self.disagreement_ulps, part.disagreement_ulps)
        ranks = (None, executions.Conditioning.UNRESOLVED, executions.Conditioning.WELL, executions.Conditioning.ILL)
        if ranks.index(part.conditioning) > ranks.index(self.conditioning):
            self.conditioning = part.conditioning  # ill where any case was

    def record(self) -> PartConditioning:
        """The figures as Urza's evidence records them."""
        return PartConditioning(
            rejudged=self.rejudged,
            admitted=self.admitted,
            spread_ratio=_finite_or_none(self.spread_ratio),
            disagreement_ulps=_finite_or_none(self.disagreement_ulps),
            conditioning=None if self.conditioning is None else Conditioning(str(self.conditioning)),
        )


def conditioning_of(tallies: dict[str, ConditioningTally], calibrated: executions.Calibrated) -> None:
    """Add a re-judged case's parts to ``tallies`` (by part)."""
    for part in calibrated.parts:
        tallies.setdefault(part.part, ConditioningTally()).add(part)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class Candidate:
    """One shape profile compiled under one variant, and what this session learned about it."""

    profile: str
    variant: str
    ranges: dict[str, tuple[int, int]]
    entry: Entry | None = None
    reused: bool = False
    compile_seconds: float | None = None
    kernel: Any = None
    parity: ParityStats = field(default_factory=ParityStats)
    verdicts: dict[str, list[ParityVerdict]] = field(default_factory=dict)  # by part: output, gradient, buffer
    contract: ContractTally = field(default_factory=ContractTally)
    # By part: the cases judged again against the calibrated yardstick (parity, weights, repeated calls).
    conditioning: dict[str, ConditioningTally] = field(default_factory=dict)
    drawn: int = 0  # hypothesis-drawn cases judged, on top of the planned ones
    nondeterministic: bool | None = None
    guards_refused: int = 0
    weights: CertifiedWeights | None = None  # the weight sets its seeds were certified at
    repeated: int = 0  # calls made by the repeated-calls check
    comparisons: dict[str, timing.Comparison] = field(default_factory=dict)  # by representative shape
    grid: regions.Grid | None = None  # the grid measured across the profile (None: not measured this session)
    grid_comparisons: dict[str, timing.Comparison] = field(default_factory=dict)  # by grid point label
    failed: str | None = None

    @property
    def latency(self) -> dict[str, dict[str, float]]:
        """The candidate's p50/p95 (ms) per representative shape, from its interleaved comparisons."""
        return {label: _side(cmp, COMPILED) for label, cmp in self.comparisons.items()}

    @property
    def id(self) -> str:
        return f"{self.profile}/{self.variant}"

    def route_table(self, margin: float = MARGIN) -> RouteTable | None:
        """The candidate's route table over its measured grid (``None`` when no grid was measured)."""
        if self.grid is None:
            return None
        return regions.route_table(self.grid, self.grid_comparisons, margin=margin)


@dataclass(frozen=True)
class Decision:
    """A profile's route: the winning candidate, or eager (``winner is None``), and why. ``over_budget`` lists
    every route's broken limits when no route meets the budget (the blueprint is then rejected)."""

    profile: str
    winner: str | None
    ratio: float | None
    note: str
    over_budget: tuple[str, ...] = ()
    table: RouteTable | None = None  # the winner's route by region (None: compiled everywhere in the profile)
    # Where the profile's cells are shared between candidates (the winner among them), each one's table of the
    # cells routed to it, in preference order; empty when the winner serves the profile alone.
    shares: Mapping[str, RouteTable] = field(default_factory=dict)

    def routed(self) -> dict[str, RouteTable | None]:
        """Every candidate this decision certifies, with the table it is stored with."""
        if self.shares:
            return dict(self.shares)
        return {} if self.winner is None else {self.winner: self.table}


def figures(cmp: timing.Comparison) -> budgets.Figures:
    """A comparison's figures (ms) for the budget check: the candidate's p50/p95, eager's, their paired ratio."""
    return budgets.Figures(
        cmp.candidate_p50 * 1e3, cmp.candidate_p95 * 1e3, cmp.eager_p50 * 1e3, cmp.eager_p95 * 1e3, cmp.ratio
    )


def eager_figures(
    scored: Mapping[str, Mapping[str, timing.Comparison]], labels: list[str]
) -> dict[str, budgets.Figures]:
    """Eager's own figures per shape: the median over every candidate's comparison at that shape (eager was
    timed in each), with ratio 1."""
    out = {}
    for label in labels:
        cmps = [by_label[label] for by_label in scored.values() if label in by_label]
        p50 = statistics.median(c.eager_p50 * 1e3 for c in cmps)
        p95 = statistics.median(c.eager_p95 * 1e3 for c in cmps)
        out[label] = budgets.Figures(p50, p95, p50, p95, 1.0)
    return out


def wins(by_label: Mapping[str, timing.Comparison]) -> bool:
    """Whether a candidate beats eager over a profile: a confident win by the margin at one shape at least,
    and at every other shape a win or ``even`` (confidently not slower). A shape where it ``loses``, or
    where the comparison stayed ``inconclusive`` after its rounds, keeps the profile on eager."""
    decisions = [c.decision for c in by_label.values()]
    return timing.WINS in decisions and all(d in (timing.WINS, timing.EVEN) for d in decisions)


def outpaces(a: Mapping[str, timing.Comparison], b: Mapping[str, timing.Comparison], labels: list[str]) -> bool:
    """Whether candidate ``a`` is faster than candidate ``b`` by the margin with confidence: at one shape at
    least the bootstrap interval of ``median(a's per-round ratios) / median(b's)`` lies below ``1 - MARGIN``,
    and at no shape above 1. Each ratio is against eager in its own interleaved rounds, so load cancels
    within a ratio but not between two measured at different moments: the interval carries both spreads."""
    faster = False
    for label in labels:
        if not a[label].ratios or not b[label].ratios:
            return False
        _, low, high = timing.ratio_interval(b[label].ratios, a[label].ratios)
        if low > 1.0:
            return False
        faster = faster or high < 1.0 - MARGIN
    return faster


def choose(
    profile: str,
    labels: list[str],
    scored: Mapping[str, Mapping[str, timing.Comparison]],
    budget: Any,
    budget_profile: budgets.BudgetProfile,
    *,
    p95: bool = True,
) -> Decision:
    """The route of ``profile`` from each contender's interleaved comparisons with eager at the profile's
    representative shapes (``scored``: the candidates that passed every check). The decision rule:

    1. a candidate is *within budget* when :func:`~.budgets.check` finds nothing at every shape (its p95,
       and its paired compiled/eager ratio against the cap); candidates rank by the geometric mean of their
       paired ratios over the shapes (load cancels out of a ratio measured in interleaved rounds);
    2. of the within-budget candidates that :func:`wins`, the first in the blueprint's variant order is
       routed unless a later one :func:`outpaces` it (faster by the margin with confidence): picking the
       faster of two winners by a hair flipped the route from run to run on a busy machine;
    3. else eager, when eager meets the budget (its own p95 at every shape), with every candidate's reason;
    4. else the fastest within-budget candidate, though it does not beat eager by the margin with confidence;
    5. else no route meets the budget: eager, with ``over_budget`` naming every route's broken limits.
    """
    if not scored:
        return Decision(profile, None, None, NO_CONTENDER)
    ratio = {cid: geomean(by_label[label].ratio for label in labels) for cid, by_label in scored.items()}
    broken = {
        cid: [
            str(v) for v in budgets.check(budget, budget_profile, {k: figures(c) for k, c in by_label.items()}, p95=p95)
        ]
        for cid, by_label in scored.items()
    }
    within = sorted((ratio[cid], cid) for cid in scored if not broken[cid])
    winners = [(r, cid) for r, cid in within if wins(scored[cid])]
    if winners:
        winning = {cid for _, cid in winners}
        ordered = [cid for cid in scored if cid in winning]  # the blueprint's variant order
        cid = ordered[0]
        for other in ordered[1:]:
            if outpaces(scored[other], scored[cid], labels):
                cid = other
        r = ratio[cid]
        note = f"{cid} at {r:.2f}x eager, " + _reasons(scored[cid], labels)
        if cid != winners[0][1]:
            note += (
                f"; preferred to {winners[0][1]} at {winners[0][0]:.2f}x, not faster by {MARGIN:.0%} with confidence"
            )
        return Decision(profile, cid, r, note)
    eager_broken = [str(v) for v in budgets.check(budget, budget_profile, eager_figures(scored, labels), p95=p95)]
    why = "; ".join(
        f"{cid}: over budget ({', '.join(broken[cid])})" if broken[cid] else f"{cid}: {_reasons(scored[cid], labels)}"
        for cid in sorted(scored)
    )
    best = min(ratio.values())
    if not eager_broken:
        return Decision(profile, None, best, f"eager: no candidate beats eager by {MARGIN:.0%} with confidence ({why})")
    if within:
        r, cid = within[0]
        note = f"{cid} at {r:.2f}x eager: the only route within budget (eager: {', '.join(eager_broken)})"
        return Decision(profile, cid, r, note)
    over = tuple([f"eager: {v}" for v in eager_broken] + [f"{cid}: {v}" for cid in sorted(scored) for v in broken[cid]])
    return Decision(profile, None, best, f"no route meets the budget ({why})", over)


def choose_regions(
    profile: str,
    labels: list[str],
    scored: Mapping[str, Mapping[str, timing.Comparison]],
    tables: Mapping[str, RouteTable],
    grids: Mapping[str, Mapping[str, timing.Comparison]],
    budget: Any,
    budget_profile: budgets.BudgetProfile,
    *,
    p95: bool = True,
    shared: bool = True,
) -> Decision:
    """The route of ``profile`` by region: :func:`choose`'s rule, where a candidate *wins* when its route table
    (``tables``, from its comparisons over the profile's grid, ``grids``) is compiled in one cell at least.

    1. the budget rule is :func:`choose`'s, at the representative shapes (``scored``), on what the candidate's
       table serves there: its compiled figures where the table routes the shape compiled, eager's where it
       routes it eager (the compiled code's time at an eager cell is no part of the route);
    2. the within-budget candidates compiled somewhere share the profile's cells
       (:func:`esper.certification.regions.share`): each cell goes to a candidate that won all over it, the
       first in variant order unless a later one :func:`outpaces` it there; a cell none won runs eager. Each
       candidate that gets a cell is routed, its table compiled in its own cells; the one with the most cells
       (the first in variant order on a tie) is the decision's ``winner``, and its ratio over the representative
       shapes is each shape's serving candidate's ratio (the winner's at a shape that runs eager);
    3. no candidate wins anywhere: :func:`choose` (eager, or the fastest within budget, or over budget).

    ``shared`` false (a kind whose runtime serves one entry per profile): one candidate in step 2, the first in
    variant order unless a later one outpaces it over the grid points where both win (where they win in no
    common cell, the one compiled in more cells), its table compiled where it won.
    """
    fallback = choose(profile, labels, scored, budget, budget_profile, p95=p95)
    ratio = {cid: geomean(by_label[label].ratio for label in labels) for cid, by_label in scored.items()}
    eager_at = eager_figures(scored, labels)
    within = [
        cid
        for cid, by_label in scored.items()
        if cid in tables
        and tables[cid].compiled_anywhere
        and not budgets.check(
            budget,
            budget_profile,
            {k: figures(c) if _served_compiled(tables[cid], k) else eager_at[k] for k, c in by_label.items()},
            p95=p95,
        )
    ]
    if not within:
        return fallback
    if shared:
        shares = regions.share(
            {cid: tables[cid] for cid in within},
            {cid: grids[cid] for cid in within},
            lambda a, b: outpaces({"": a}, {"": b}, [""]),
        )
    else:
        one = _preferred(within, tables, grids)
        shares = {one: tables[one]}
    cid = max(shares, key=lambda k: shares[k].compiled_cells())  # the first of the most cells on a tie
    table = shares[cid]
    if len(shares) == 1:
        eager_cells = [c for c in table.cells if c.path != COMPILED]
        note = f"{cid} {table.describe()}, at {ratio[cid]:.2f}x eager over the representative shapes"
        if eager_cells:
            note += "; eager at " + ", ".join(f"{c.label} ({c.decision or c.why})" for c in eager_cells)
        others = [o for o in within if o != cid]
        if others:
            note += f"; preferred to {', '.join(others)}"
        return Decision(profile, cid, ratio[cid], note, table=table)
    served = {}
    for label in labels:
        owner = next((k for k, t in shares.items() if _served_compiled(t, label)), cid)
        served[label] = scored[owner][label].ratio
    routed = geomean(served.values())
    cells = len(table.cells)
    eager = sum(1 for i in range(cells) if all(t.cells[i].path != COMPILED for t in shares.values()))
    note = (
        "shared by cell: "
        + ", ".join(f"{k} in {t.compiled_cells()}" for k, t in shares.items())
        + f" of {cells} cells, eager in {eager}; {routed:.2f}x eager over the representative shapes"
    )
    others = [o for o in within if o not in shares]
    if others:
        note += f"; preferred to {', '.join(others)} in every cell"
    return Decision(profile, cid, routed, note, table=table, shares=shares)


def _preferred(
    within: list[str], tables: Mapping[str, RouteTable], grids: Mapping[str, Mapping[str, timing.Comparison]]
) -> str:
    """One candidate for a whole profile (see :func:`choose_regions`' ``shared``)."""
    cid = within[0]
    for other in within[1:]:
        both = [
            cell.label
            for cell in tables[cid].cells
            if cell.path == COMPILED
            and cell.label in grids[other]
            and grids[other][cell.label].decision == timing.WINS
            and cell.label in grids[cid]
        ]
        if both:
            if outpaces(grids[other], grids[cid], both):
                cid = other
        elif tables[other].compiled_cells() > tables[cid].compiled_cells():
            cid = other
    return cid


def _served_compiled(table: RouteTable, label: str) -> bool:
    """Whether ``table`` sends the representative shape ``label`` (``"batch=8,seq=32"``) to compiled code."""
    sizes = Blueprint.label_sizes(label)
    if not all(d in sizes for d in table.dims):
        return True  # a shape the table does not place: judged as compiled, the stricter reading
    return table.cell_of(sizes).path == COMPILED


def _reasons(by_label: Mapping[str, timing.Comparison], labels: list[str]) -> str:
    return ", ".join(f"{label} {by_label[label].reason()}" for label in labels if label in by_label)


@dataclass
class Certification:
    """State and checks of one artifact kind of one blueprint in one certification session. Each check returns
    a :class:`~esper.certification.results.CheckResult` and records it (see :meth:`record`)."""

    bp: Blueprint
    artifact: ArtifactKind
    urza_path: Path
    budget_profile: budgets.BudgetProfile
    device: str = "cpu"
    recheck: bool = False
    candidates: dict[str, Candidate] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    outcomes: dict[tuple[Check, str | None], CheckResult] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)  # candidates whose checks ran in this session
    published: list[Entry] = field(default_factory=list)  # what the last publish wrote
    kind: KindChecks = field(init=False)
    # Expected results of planned cases by (profile, case index), shared by the profile's candidates.
    _expected: dict[tuple[str, int], Expected] = field(default_factory=dict, repr=False)
    _expected_bytes: int = field(default=0, repr=False)
    _cases: dict[str, list[coverage.Case]] = field(default_factory=dict, repr=False)
    _designs: dict[str, coverage.ShapeCoverage] = field(default_factory=dict, repr=False)
    # Compile workers sharing this blueprint's planned compiles (None: compile here, one after another).
    ahead: CompileAhead | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.artifact = ArtifactKind(self.artifact)
        self.kind = KINDS[self.artifact](self.bp, self.urza_path, self.device)
        profiles = self.profiles()
        for cid in plan.candidate_ids(self.bp, self.artifact):
            pname, v = cid.rsplit("/", 1)
            c = Candidate(pname, v, dict(profiles[pname]))
            self.candidates[c.id] = c

    def profiles(self) -> dict[str, dict[str, tuple[int, int]]]:
        return plan.profiles(self.bp, self.artifact)

    def labels(self) -> dict[str, dict[str, int]]:
        return plan.shape_labels(self.bp)

    # -- 1. compile --------------------------------------------------------------------------------

    @check(Check.COMPILE)
    def compile(self, candidate: str) -> dict[str, Any]:
        """Compile one candidate with Tezzeret, or reuse the entry with the same content hash and key."""
        off = self.kind.disabled()
        if off:
            raise Skip(off)
        c = self.candidates[candidate]
        try:
            if self.ahead is not None:
                self._compile_apart(c)
            outcome = self.kind.compile(profile=c.profile, variant=c.variant)
        except NotSpecialized as e:
            raise Skip(str(e)) from None
        c.entry, c.reused, c.compile_seconds = outcome.entry, outcome.reused, outcome.seconds
        return {"entry": c.entry.id, "engine": c.entry.engine, "reused": c.reused, "seconds": c.compile_seconds}

    def job(self, candidate: str, *, planned: bool = True) -> CompileJob | None:
        """``candidate`` as a job a compile worker can run (``None``: this kind is off, no such candidate, or a
        blueprint not read from a file). ``planned``: the job a plan lists, so also ``None`` for a candidate this
        Urza holds already (nothing to compile: no worker need start) and for a specialization, which no plan can
        list (it compiles only where its profile fell back, known once that profile's entry is)."""
        c = self.candidates.get(candidate)
        if c is None or self.bp.source is None or self.kind.disabled():
            return None
        if planned and (is_specialization(c.profile) or self.kind.stored(profile=c.profile, variant=c.variant)):
            return None
        return CompileJob(
            self.bp.source, self.bp.name, self.artifact.value, c.profile, c.variant, str(self.urza_path), self.device
        )

    def _compile_apart(self, c: Candidate) -> None:
        """Have a compile worker compile ``c`` before this process looks it up (it then reuses the entry): a
        planned candidate as :meth:`CompileAhead.claim` does (one no plan listed, such as one stored already,
        is left to the lookup); a specialization once this process has found it would compile (its profile's
        entry decides; :class:`NotSpecialized` says why not) and Urza does not hold it. So the certification
        times no package it built, specializations included."""
        ahead = self.ahead
        assert ahead is not None
        job = self.job(c.id, planned=False)
        if job is None:
            return
        if not is_specialization(c.profile):
            ahead.claim(job)
            return
        self.kind.check_specialization(profile=c.profile, variant=c.variant)
        if self.kind.stored(profile=c.profile, variant=c.variant) is None:
            ahead.compile_now(job)

    def skip_reason(self, c: Candidate) -> str | None:
        """Why ``c`` is not checked in this session: its kind is off, a fallback, or a profile decided already.

        A profile is skipped only when every one of its candidates was decided by an earlier run with the
        same content hash: a new or changed candidate makes the whole profile compete again.
        """
        off = self.kind.disabled()
        if off:
            return off
        if c.entry is None:
            return f"{self.artifact} {c.id} was not compiled in this session (test_compile failed or did not run)"
        if c.entry.status == EntryStatus.FALLBACK or c.entry.engine == EntryEngine.EAGER:
            return f"{self.artifact} eager fallback (entry #{c.entry.id}): {c.entry.failure_reason}"
        peers = [p for p in self.candidates.values() if p.profile == c.profile and p.entry is not None]
        decided = all(
            p.entry.status in (EntryStatus.CERTIFIED, EntryStatus.FALLBACK) or p.entry.failed_check == SELECTION  # type: ignore[union-attr]
            for p in peers
        )
        if decided and not self.recheck:
            return (
                f"{self.artifact} profile {c.profile} already decided (entry #{c.entry.id} {c.entry.status}; same "
                "content hash and compatibility key); --certify-recheck runs the checks again"
            )
        return None

    def ready(self, candidate: str) -> Candidate:
        """The candidate under test; skips the calling test when there is nothing to check."""
        c = self.candidates[candidate]
        why = self.skip_reason(c)
        if why:
            raise Skip(why)
        self.checked.add(candidate)
        return c

    def _kernel(self, c: Candidate) -> Any:
        """The entry loaded exactly as Kasmina loads it (checksum, C++ loader, pre-warm, guards)."""
        assert c.entry is not None and c.entry.id is not None
        if c.kernel is None:
            c.kernel = self.kind.load(c.entry.id)
            # An entry certified before carries its route table: certification measures the compiled code itself.
            c.kernel.ignore_route_tables()
        if c.kernel.route != COMPILED:
            raise Fail(f"Kasmina cannot load {self.artifact} entry #{c.entry.id}: {c.kernel.reason}")
        return c.kernel

    def _inputs(self, sizes: Mapping[str, int], regime: Regime | None = None) -> tuple[torch.Tensor, ...]:
        return make_inputs(self.bp, sizes, regime or Regime(), self.device)

    # -- 2. parity ---------------------------------------------------------------------------------

    def cases(self, profile: str) -> list[coverage.Case]:
        """The planned parity cases of ``profile`` (:func:`esper.certification.plan.parity_cases`)."""
        if profile not in self._cases:
            self._cases[profile] = plan.parity_cases(self.bp, self.profiles()[profile])
        return self._cases[profile]

    def coverage(self, profile: str) -> coverage.Coverage:
        """What the planned cases of ``profile`` cover (shapes, value cases, each dim's sizes, pairs)."""
        return coverage.summarize(self.cases(profile), self.profiles()[profile])

    def shape_coverage(self, profile: str) -> coverage.ShapeCoverage:
        """What the planned shapes of ``profile`` cover of the value pairs and residues compiled loops meet
        (:func:`esper.certification.plan.shape_coverage`)."""
        if profile not in self._designs:
            self._designs[profile] = plan.shape_coverage(self.cases(profile), self.profiles()[profile])
        return self._designs[profile]

    def _case_expected(self, profile: str, index: int, args: tuple[torch.Tensor, ...], seed: int) -> Expected:
        """Eager's and float64's results of planned case ``index``: computed once, kept for the profile's
        other candidates while the cache holds :data:`REFERENCE_CACHE_BYTES`."""
        key = (profile, index)
        if key in self._expected:
            return self._expected[key]
        expected = self.kind.expected(args, seed)
        if self._expected_bytes + expected.nbytes <= REFERENCE_CACHE_BYTES and self._peers(profile) > 1:
            self._expected[key] = expected
            self._expected_bytes += expected.nbytes
        return expected

    def _peers(self, profile: str) -> int:
        return sum(1 for c in self.candidates.values() if c.profile == profile)

    def _judge(
        self, c: Candidate, kernel: Any, args: tuple[torch.Tensor, ...], expected: Expected, seed: int, where: str
    ) -> None:
        refused = kernel.check(*args)
        if refused is not None:
            raise Fail(f"guards refuse a shape inside the profile's range, {where}: {refused}")
        judged = self.kind.call(kernel, args, expected, seed)
        path, verdicts = judged.path, judged.verdicts
        if path == COMPILED:
            c.contract.add(judged.contract, judged.tensors, where)
        if path != COMPILED:
            raise Fail(f"Kasmina ran {path} for accepted inputs, {where}")
        c.parity.cases += 1
        verdicts = self._calibrated(c, args, expected, seed, verdicts)
        for part, v in verdicts.items():
            c.verdicts.setdefault(part, []).append(v)
            c.parity.max_abs = max(c.parity.max_abs, v.max_abs)
        failure = first_failure(verdicts)
        if failure:
            raise Fail(f"{self.artifact} {c.id} at {where}: {failure}")

    def _calibrated(
        self,
        c: Candidate,
        args: Sequence[Any],
        expected: Expected,
        seed: int,
        verdicts: Mapping[str, ParityVerdict],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, ParityVerdict]:
        """``verdicts``, where every failing output of every part (output; a training step's gradients and
        buffers) failed on its finite values alone, judged again against the spread of eager's legitimate float32
        executions of the same call (:meth:`KindChecks.spread_of` on the module holding ``state``, a seed's
        weights; :func:`esper.numerics.executions.calibrate`: reordered contractions and reductions, forward
        and backward, intermediates rounded to either float32 neighbour, another thread count, the batch in
        another order where valid): eager's own error is one sample of them, and an ill-conditioned computation
        spreads them far beyond it. The RMSE and pointwise rules are widened only as far as the executions go
        (NaN/inf placement and shapes stand), so a lower-precision accumulation is still rejected. Each
        re-judged part is tallied in the candidate's conditioning."""
        if not executions.calibratable(verdicts):
            return dict(verdicts)
        # The spread stops once it admits the case: more executions could only widen the yardstick further.
        spread = self.kind.spread_of(
            args, expected, seed, state, enough=lambda s: executions.calibrate(verdicts, s).admitted
        )
        calibrated = executions.calibrate(verdicts, spread)
        conditioning_of(c.conditioning, calibrated)
        if calibrated.admitted:
            c.parity.calibrated += 1
        return calibrated.verdicts

    @check(Check.PARITY)
    def check_parity(self, candidate: str) -> dict[str, Any]:
        """The candidate (loaded once, as Kasmina loads it) against eager and a float64 reference on every
        planned case of its profile (every size of each dim, pairwise sizes, value regimes, seeds), judged by
        :func:`esper.numerics.parity.judge`; stops at the first failing case, naming it. Eager that differs between
        two identical runs is reported as nondeterministic instead. Its figures: the cases judged and the
        profile's coverage."""
        c = self.ready(candidate)
        kernel = self._kernel(c)
        with one_thread():
            covered = self._check_planned(c, kernel)
        return {
            "cases": c.parity.cases,
            "max_abs": c.parity.max_abs,
            "ill_conditioned": c.parity.calibrated,
            "coverage": covered.evidence(),
        }

    def _check_planned(self, c: Candidate, kernel: Any) -> coverage.Coverage:
        cases = self.cases(c.profile)
        first = cases[0]
        args = make_inputs(self.bp, first.sizes, self.kind.value_case(first.values), self.device)
        c.nondeterministic = self.kind.nondeterministic(args)
        if c.nondeterministic:
            raise Fail(
                f"eager {self.artifact} is nondeterministic: two identical runs at {dict(first.sizes)} differ, so "
                "parity has no reference to hold the compiled code to (make the blueprint deterministic)"
            )
        for index, case in enumerate(cases):
            values = self.kind.value_case(case.values)
            args = make_inputs(self.bp, case.sizes, values, self.device)
            expected = self._case_expected(c.profile, index, args, values.seed)
            self._judge(
                c, kernel, args, expected, values.seed, f"{dict(case.sizes)}, {values.regime} seed {values.seed}"
            )
        return self.coverage(c.profile)

    @check(Check.PARITY)
    def check_drawn(self, candidate: str, sizes: Mapping[str, int], regime: Regime) -> dict[str, Any]:
        """One drawn case (on top of the planned ones), judged the same way."""
        self._drawn(candidate, sizes, regime)
        return {"drawn": self.candidates[candidate].drawn}

    @check(Check.PARITY)
    def check_drawn_cases(self, candidate: str) -> dict[str, Any]:
        """A few hypothesis-drawn cases inside the candidate's profile (:func:`.strategies.check_cases`); a
        failing one is shrunk by hypothesis and reported as the smallest case that fails."""
        from esper.certification import strategies

        c = self.ready(candidate)
        strategies.check_cases(lambda sizes, regime: self._drawn(candidate, sizes, regime), c.ranges, [])
        return {"drawn": c.drawn}

    def _drawn(self, candidate: str, sizes: Mapping[str, int], regime: Regime) -> None:
        c = self.ready(candidate)
        kernel = self._kernel(c)
        regime = self.kind.parity_regime(regime)
        args = self._inputs(sizes, regime)
        c.drawn += 1
        with one_thread():
            expected = self.kind.expected(args, regime.seed)
            self._judge(c, kernel, args, expected, regime.seed, f"{dict(sizes)}, {regime!r}")

    @check(Check.CONTRACT)
    def check_contract(self, candidate: str) -> dict[str, Any]:
        """The rest of the contract with the caller, judged on the very calls parity judged (planned and drawn
        cases; :meth:`KindChecks.call`): every output has eager's dtype, shape, device, layout and dense memory
        formats, shares memory with an input or another output only where eager's does, and the call leaves
        every input (training: every parameter and buffer of the seed) unchanged unless eager changes it, and
        then changes it as eager does. Fails with the first breach (clause, tensor, case); skips where parity
        judged no call. Its figures: the calls and tensors judged, the breaches per clause."""
        c = self.ready(candidate)
        tally = c.contract
        if not tally.cases:
            raise Skip(f"{self.artifact} {c.id}: parity judged no call, so there is no call to hold to the contract")
        if tally.first is not None:
            more = sum(tally.breaches.values()) - 1
            extra = f"; {more} more breach(es) ({', '.join(f'{k} {n}' for k, n in tally.breaches.items())})"
            raise Fail(f"{self.artifact} {c.id} breaks the contract: {tally.first}" + (extra if more else ""))
        return tally.figures()

    # -- 2b. any weights a seed binds ------------------------------------------------------------

    def weight_sets(self, c: Candidate) -> tuple[bool, tuple[str, ...], tuple[contract.WeightSet, ...]]:
        """Whether ``c``'s code folded the weights in, the weights a swappable ``c`` folded (every set holds
        them at the blueprint's values), and the weight sets beyond the blueprint's own its seeds are certified
        at (none where folded)."""
        assert c.entry is not None
        folded, held = self.kind.folded(c.entry)
        if folded:
            return True, (), ()
        sets = contract.weight_sets(self.kind.built().state_dict(), WEIGHT_SEED, keep=held)
        return False, held, tuple(ws for ws in sets if ws.change is not contract.WeightChange.OWN)

    @check(Check.WEIGHTS)
    def check_weights(self, candidate: str) -> dict[str, Any]:
        """Parity at each weight set beyond the blueprint's own (scaled x10 and x0.1, perturbed, outliers:
        :func:`~esper.certification.contract.weight_sets`) on a few planned cases
        (:func:`~esper.certification.plan.weight_cases`), served exactly as Kasmina serves a seed's weights (the
        loaded kernel bound to a fresh module holding them) and judged against eager and float64 on another
        fresh module holding them; every call must take the compiled path, and leave the served seed's parameters
        and buffers as eager's call leaves its own (the contract's mutation clause, for the seed's state). Code
        that folded the weights in is certified for its own only, after checking that Kasmina serves no other
        weights through it."""
        c = self.ready(candidate)
        kernel = self._kernel(c)
        folded, held, sets = self.weight_sets(c)
        if folded:
            self._refuses_other_weights(c, kernel)
            c.weights = CertifiedWeights(certified_for=(str(contract.WeightChange.OWN),), folded=True, cases=0)
            return {"weights": FOLDED}
        cases = plan.weight_cases(self.bp, c.ranges, self.cases(c.profile))
        judged = 0
        with one_thread():
            for ws in sets:
                for case in cases:
                    values = self.kind.value_case(case.values)
                    args = make_inputs(self.bp, case.sizes, values, self.device)
                    where = f"weights {ws.name}, {dict(case.sizes)}, {values.regime} seed {values.seed}"
                    own = self.kind.seed(ws.state)
                    expected = self.kind.expected_with(own, args, values.seed)
                    served = self.kind.serving(kernel, ws.state)
                    before = contract.snapshot(contract.named_state((), served.seed))
                    path, got = self.kind.serve(served, args, values.seed)
                    if path != COMPILED:
                        raise Fail(f"Kasmina ran {path} for a seed's weights inside the profile, {where}")
                    verdicts = self.kind.judge_parts(got, expected)
                    failure = first_failure(self._calibrated(c, args, expected, values.seed, verdicts, ws.state))
                    if failure:
                        raise Fail(f"{self.artifact} {c.id} at {where}: {failure}")
                    wrote = self._seed_writes(before, served.seed, own, expected)
                    if wrote:
                        raise Fail(f"{self.artifact} {c.id} breaks the contract with the seed, {where}: {wrote}")
                    judged += 1
        names = (str(contract.WeightChange.OWN), *(ws.name for ws in sets))
        c.weights = CertifiedWeights(certified_for=names, folded=False, held_own=held, cases=judged)
        return {"weights": list(names), "held_own": list(held), "cases": judged}

    def _seed_writes(
        self,
        before: Mapping[str, torch.Tensor],
        served: torch.nn.Module,
        eager: torch.nn.Module,
        expected: Expected,
    ) -> str:
        """What a served call wrote into the seed's parameters and buffers beyond what eager's call wrote into
        its own seed (``eager``, which started from the same weights): '' when nothing. Buffers eager updates
        are judged against the float64 step's where the case has one, else left out (their values are
        undefined with non-finite inputs); everything eager leaves alone must stay bitwise unchanged."""
        eager_after = contract.named_state((), eager)
        exact = expected.exact.get("buffer")
        exact_after = {f"buffer[{n!r}]": b for n, b in exact.items()} if isinstance(exact, Mapping) else None
        if exact_after is None:
            after = {n: t.detach() for n, t in eager_after.items()}
            before = {n: t for n, t in before.items() if n in after and bitwise_equal(after[n], t)}
        tol = self.bp.tolerance
        clause = contract.check_mutation(
            before, contract.named_state((), served), eager_after, exact_after, atol=tol.atol, rtol=tol.rtol
        )
        return clause.reason

    def _refuses_other_weights(self, c: Candidate, kernel: Any) -> None:
        """Folded code must serve no other weights: a seed holding weights ten times the blueprint's, bound to
        it, runs eager."""
        (other,) = contract.weight_sets(self.kind.built().state_dict(), WEIGHT_SEED, (contract.WeightChange.SCALED_UP,))
        path, _ = self.kind.serve(
            self.kind.serving(kernel, other.state), self._inputs(self.cases(c.profile)[0].sizes), 0
        )
        if path == COMPILED:
            entry = c.entry.id if c.entry is not None else None
            raise Fail(f"{self.artifact} entry #{entry} folds the weights in, yet served weights {other.name} compiled")

    # -- 2c. repeated calls -----------------------------------------------------------------------

    @check(Check.REPEATED)
    def check_repeated(self, candidate: str) -> dict[str, Any]:
        """Many calls of the loaded kernel in one process (:func:`~esper.certification.contract.repeated_calls`),
        alternating shapes of the profile (:func:`~esper.certification.plan.repeated_shapes`) and, where a seed
        can hold other weights, the blueprint's own and other weight sets (one served kernel per set, kept
        across calls): every call takes the compiled path and passes parity against eager and float64 (a
        training step's output and gradients; its buffer updates accumulate across calls on both sides), and
        gives its own earlier answer to the same call bit for bit. Fails naming the first call that did not."""
        c = self.ready(candidate)
        kernel = self._kernel(c)
        _, _, sets = self.weight_sets(c)
        states: dict[str, Any] = {str(contract.WeightChange.OWN): None}
        states |= {ws.name: ws.state for ws in sets[: plan.REPEATED_WEIGHTS]}
        shapes = plan.repeated_shapes(self.bp, c.ranges, self.cases(c.profile))
        calls = [contract.Call(Blueprint.shape_label(s), self._inputs(s), w) for s in shapes for w in states]
        schedule = contract.alternate(calls, plan.REPEATED_ROUNDS)
        served: dict[str, Any] = {}
        references: dict[tuple[str, tuple[Any, ...]], Expected] = {}
        # Each reference's call (weights and inputs), for the calibrated yardstick of a call failing the RMSE rule.
        calls_of: dict[int, tuple[Mapping[str, torch.Tensor], tuple[Any, ...]]] = {}
        own = self.kind.built().state_dict()

        def compiled(weights: str, args: tuple[Any, ...]) -> Any:
            if weights not in served:
                served[weights] = self.kind.serving(kernel, states[weights])
            path, got = self.kind.serve(served[weights], args, 0)
            if path != COMPILED:
                raise Fail(f"repeated: call {c.repeated} (weights {weights}): Kasmina ran {path} for accepted inputs")
            c.repeated += 1
            return {part: value for part, value in got.items() if part != "buffer"}

        def eager(weights: str, args: tuple[Any, ...]) -> Expected:
            key = (weights, tuple(tuple(a.shape) for a in args))
            if key not in references:
                state = states[weights] if states[weights] is not None else own
                references[key] = self.kind.expected_with(self.kind.seed(state), args, 0)
                calls_of[id(references[key])] = (state, args)
            return references[key]

        def agree(got: Any, expected: Any) -> str:
            verdicts = self.kind.judge_parts(got, expected)
            if id(expected) in calls_of:
                state, args = calls_of[id(expected)]
                verdicts = self._calibrated(c, args, expected, 0, verdicts, state)
            return first_failure(verdicts)

        c.repeated = 0
        with one_thread():
            result = contract.repeated_calls(compiled, eager, schedule, agree=agree)
        if not result.passed:
            raise Fail(f"{self.artifact} {c.id}: {result.clause().reason}")
        return {
            "calls": result.calls,
            "shapes": [call.label for call in calls[:: len(states)]],
            "weights": list(states),
        }

    # -- 3. guards ---------------------------------------------------------------------------------

    def refused_cases(self, candidate: str) -> list[RefusedCase]:
        """Inputs the candidate's guards must refuse (see :func:`esper.certification.cases.refused_cases`),
        around the first representative shape inside its profile."""
        c = self.ready(candidate)
        assert c.entry is not None and c.entry.guards is not None
        base_sizes = self.labels()[plan.labels_in(self.bp, c.ranges)[0]]
        return refused_cases(c.entry.guards, base_sizes, self._inputs)

    @check(Check.GUARDS)
    def check_guards(self, candidate: str) -> dict[str, Any]:
        """Every refused case is refused by the guard check and served eagerly, never by compiled code."""
        c = self.ready(candidate)
        kernel = self._kernel(c)
        for case in self.refused_cases(candidate):
            if kernel.check(*case.args) is None:
                raise Fail(f"guards accept an input they must refuse: {case.what}")
            with telemetry.expected(telemetry.OUTSIDE_GUARDS):
                path, compiled_calls = self.kind.run_refused(kernel, case.args)
            if path != EAGER or compiled_calls:
                raise Fail(f"{case.what}: reached the compiled code")
            c.guards_refused += 1
        return {"refused": c.guards_refused}

    # -- 4. latency --------------------------------------------------------------------------------

    @check(Check.LATENCY)
    def compare_latency(self, candidate: str, label: str) -> dict[str, Any]:
        """The candidate against eager at one representative shape, in interleaved rounds on the same inputs
        (:func:`esper.certification.timing.compare`): the paired ratio with its confidence interval and a decision."""
        c = self.ready(candidate)
        cmp = self.measure_latency(candidate, label)
        if cmp.decision == timing.INCONCLUSIVE:
            again = timing.confirm(
                [label],
                lambda _, look: self.measure_latency(candidate, label, look=look),
                timing.decided,
                budget_s=CONFIRM_SECONDS,
                max_passes=CONFIRM_LOOKS,
            )
            cmp = again.settled.get(label) or again.unsettled.get(label) or cmp
        c.comparisons[label] = cmp
        return {"shape": label, **cmp.evidence()}

    def measure_latency(
        self, candidate: str, label: str, *, look: int = 0, seed: int | None = None
    ) -> timing.Comparison:
        """One interleaved comparison of the candidate with eager at representative shape ``label``; ``look``
        > 0 measures it again, deciding at :func:`~.timing.confirmation_confidence` (seeded by ``seed``, by
        default the look)."""
        c = self.candidates[candidate]
        kernel = self._kernel(c)
        if not c.comparisons and look == 0 and c.entry is not None and built_in_this_process(c.entry):
            log.warning(
                "%s %s: timing a package this process compiled (no compile worker did): it can run faster "
                "here than where Kasmina serves it",
                self.bp.name,
                c.id,
            )
        args = self._inputs(self.labels()[label])
        compiled_fn = self.kind.timed(kernel, args)
        eager_fn = self.kind.timed(self.kind.eager(), args)
        confidence = timing.confirmation_confidence(CONFIDENCE, look)
        with torch.set_grad_enabled(self.kind.grad_enabled):
            cmp = timing.compare(
                compiled_fn,
                eager_fn,
                margin=MARGIN,
                max_rounds=MAX_ROUNDS,
                confidence=confidence,
                seed=look if seed is None else seed,
            )
            if kernel.last_path != COMPILED:
                raise Fail(f"compiled timing ran {kernel.last_path}: {kernel.reason}")
        return cmp

    @check(Check.REGIONS)
    def compare_regions(self, candidate: str) -> dict[str, Any]:
        """The candidate against eager over its profile's grid (:func:`esper.certification.regions.grid`), each
        point in interleaved rounds as at a representative shape (those are reused from
        :meth:`compare_latency`), then where neighbouring points decided differently their midpoints
        (:func:`~esper.certification.regions.refine`), when the budget affords them all. Points are measured
        cheapest first; those beyond :data:`GRID_SECONDS` (each point counted at its estimated cost or the time
        it took, whichever is more) are left unmeasured, and run eager. Its figures: the grid and, per point,
        the decision and ratio."""
        c = self.ready(candidate)
        kernel = self._kernel(c)
        labels = self.labels()
        reps = {regions.label({d: s[d] for d in c.ranges}): name for name, s in labels.items() if name in c.comparisons}
        missing = [name for name in plan.labels_in(self.bp, c.ranges) if name not in c.comparisons]
        if missing:
            raise Skip(f"{c.id} was not timed at {', '.join(missing)} (test_latency failed or did not run)")
        g = regions.grid(c.ranges, [labels[name] for name in reps.values()])
        measured: dict[str, timing.Comparison] = {point: c.comparisons[name] for point, name in reps.items()}
        per_call = self._per_call_seconds(c, reps)

        def cost(sizes: Mapping[str, int]) -> float:
            return per_call(sizes) * 2 * (GRID_CALLS * GRID_MIN_ROUNDS + 1)

        spent = 0.0
        for sizes in sorted(g.points, key=lambda p: math.prod(p.values())):
            point = regions.label(sizes)
            if point in measured or spent + cost(sizes) > GRID_SECONDS:
                continue  # the costliest points beyond the budget stay unmeasured: eager there
            started = time.perf_counter()
            measured[point] = self._compare(c, kernel, sizes, point)
            spent += max(cost(sizes), time.perf_counter() - started)
        refined = regions.refine(g, {k: v.decision for k, v in measured.items()})
        added = [p for p in refined.points if regions.label(p) not in measured]
        # A midpoint left unmeasured would make part of a decided cell eager: refine only what the budget affords.
        if added and spent + sum(map(cost, added)) <= GRID_SECONDS:
            for sizes in added:
                measured[regions.label(sizes)] = self._compare(c, kernel, sizes, regions.label(sizes))
            g = refined
        c.grid, c.grid_comparisons = g, measured
        table = c.route_table()
        assert table is not None
        return {
            "dims": list(g.dims),
            "values": [list(vs) for vs in g.values],
            "measured": len(measured),
            "compiled_cells": table.compiled_cells(),
            "cells": len(table.cells),
            "points": {k: {"decision": v.decision, "ratio": v.ratio} for k, v in measured.items()},
        }

    def _per_call_seconds(self, c: Candidate, reps: Mapping[str, str]) -> Any:
        """An estimate of one compiled-plus-eager call pair at a grid point: the nearest representative shape's
        pair (by the product of sizes), scaled by the ratio of the products."""
        known = [(math.prod(self.labels()[name][d] for d in c.ranges), c.comparisons[name]) for name in reps.values()]

        def estimate(sizes: Mapping[str, int]) -> float:
            size = math.prod(sizes.values())
            if not known:
                return 0.0
            base, cmp = min(known, key=lambda k: abs(math.log(k[0] / size)))
            return (cmp.candidate_p50 + cmp.eager_p50) / 2 * size / base

        return estimate

    def _compare(self, c: Candidate, kernel: Any, sizes: Mapping[str, int], point: str) -> timing.Comparison:
        """One grid point: the candidate against eager in interleaved rounds (the grid's lighter settings)."""
        args = self._inputs(sizes)
        compiled_fn = self.kind.timed(kernel, args)
        eager_fn = self.kind.timed(self.kind.eager(), args)
        with torch.set_grad_enabled(self.kind.grad_enabled):
            cmp = timing.compare(
                compiled_fn,
                eager_fn,
                margin=MARGIN,
                calls=GRID_CALLS,
                min_rounds=GRID_MIN_ROUNDS,
                rounds=GRID_ROUNDS,
                max_rounds=GRID_MAX_ROUNDS,
            )
            if kernel.last_path != COMPILED:
                raise Fail(f"compiled timing at {point} ran {kernel.last_path}: {kernel.reason}")
        return cmp

    # -- 5. select ---------------------------------------------------------------------------------

    def passed(self, c: Candidate) -> bool:
        """Whether ``c`` was checked in this session and passed every candidate check."""
        return (
            c.entry is not None
            and not self.skip_reason(c)
            and c.failed is None
            and all(self._passed(name, c.id) for name in CANDIDATE_CHECKS)
        )

    def _passed(self, name: Check, candidate: str | None) -> bool:
        result = self.outcomes.get((name, candidate))
        return result is not None and result.passed

    @check(Check.SELECT, per_candidate=False)
    def select(self) -> dict[str, Any]:
        """Per profile, the route :func:`choose` picks from the candidates that passed every check."""
        if all(self.skip_reason(c) for c in self.candidates.values()):
            raise Skip("every candidate is decided already or a fallback")
        self.decisions = {}
        for pname, ranges in self.profiles().items():
            labels = plan.labels_in(self.bp, ranges)
            contenders = [
                c
                for c in self.candidates.values()
                if c.profile == pname and self.passed(c) and all(label in c.comparisons for label in labels)
            ]
            if not contenders and is_specialization(pname):
                continue  # not compiled (its profile keeps the dim dynamic) or failed a check: nothing to route
            if not contenders:
                self.decisions[pname] = Decision(pname, None, None, self.no_contender(pname))
                continue
            scored = {c.id: dict(c.comparisons) for c in contenders}
            tables = {c.id: t for c in contenders if (t := c.route_table()) is not None}
            if tables:
                grids = {c.id: dict(c.grid_comparisons) for c in contenders}
                self.decisions[pname] = choose_regions(
                    pname,
                    labels,
                    scored,
                    tables,
                    grids,
                    self.bp.budget,
                    self.budget_profile,
                    p95=self.kind.p95_budget,
                    shared=self.kind.shares_cells,
                )
            else:
                self.decisions[pname] = choose(
                    pname, labels, scored, self.bp.budget, self.budget_profile, p95=self.kind.p95_budget
                )
        return {
            p: {"winner": d.winner, "ratio": d.ratio, "note": d.note, "regional": d.table is not None}
            for p, d in self.decisions.items()
        }

    def no_contender(self, profile: str) -> str:
        """Why ``profile`` has no candidate to route to: each candidate's fallback reason, skip or failed check
        (the user sees this as the eager route's reason)."""
        why = []
        for c in self.candidates.values():
            if c.profile != profile:
                continue
            reason = self.skip_reason(c) if c.entry is None or c.entry.status == EntryStatus.FALLBACK else None
            if reason is None:
                failed = [str(name) for (name, cid), o in self.outcomes.items() if cid == c.id and o.failed]
                reason = f"failed {', '.join(failed)}" if failed else "not measured at every representative shape"
            why.append(f"{c.variant}: {reason}")
        return f"{NO_CONTENDER} ({'; '.join(why)})" if why else NO_CONTENDER

    # -- 6. budgets --------------------------------------------------------------------------------

    @check(Check.BUDGETS, per_candidate=False)
    def check_budgets(self) -> dict[str, Any]:
        """Every profile has a route within the blueprint's budget on this budget profile (selection prefers
        one); fails, with every route's figures, where none is."""
        if not self.decisions:
            raise Skip("no selection was made in this session")
        violations = [v for d in self.decisions.values() for v in d.over_budget]
        if violations:
            raise Fail(f"no route meets the budget ({self.budget_profile.name} profile): " + "; ".join(violations))
        return {"budget_profile": self.budget_profile.name}

    # -- 7. publish --------------------------------------------------------------------------------

    @check(Check.PUBLISH, per_candidate=False)
    def publish(self) -> dict[str, Any]:
        """Write every decision: winners certified, losers rejected by selection, eager routes certified."""
        if not self.decisions:
            raise Skip("no selection was made in this session")
        for name in (Check.SELECT, Check.BUDGETS):
            o = self.outcomes.get((name, None))
            if o is None or not o.passed:
                raise Fail(f"not certified: {name} {'did not run' if o is None else o.outcome}")
        published: list[Entry] = []
        with Urza(self.urza_path) as urza:
            for decision in self.decisions.values():
                contenders = [c for c in self.candidates.values() if c.profile == decision.profile and self.passed(c)]
                routed = decision.routed()
                group = [c.entry.id for c in contenders if c.id in routed and c.entry is not None]
                for c in contenders:
                    assert c.entry is not None and c.entry.id is not None
                    if c.id in routed:
                        shared = len(routed) > 1
                        c.entry = urza.update(
                            c.entry.id,
                            status=EntryStatus.CERTIFIED,
                            failure_reason=None,
                            failed_check=None,
                            **self.evidence(
                                c,
                                decision,
                                table=routed[c.id],
                                own=c.route_table() if shared else None,
                                group=group if shared else (),
                            ),
                        )
                        published.append(c.entry)
                    else:
                        c.entry = urza.update(
                            c.entry.id,
                            status=EntryStatus.REJECTED,
                            failed_check=SELECTION,
                            failure_reason=f"not routed: {decision.note}",
                            **self.evidence(c, decision, table=c.route_table()),
                        )
                if decision.winner is None and contenders:
                    route = self.kind.store_eager_route(
                        urza,
                        profile=decision.profile,
                        guards=contenders[0].entry.guards,  # type: ignore[union-attr]
                        evidence=self.evidence(None, decision),
                        reason=decision.note,
                    )
                    published.append(route)
                elif decision.winner is None:
                    published += self._held_eager_route(urza, decision)
        self.published = published
        return {"entries": [e.id for e in published]}

    def _held_eager_route(self, urza: Urza, decision: Decision) -> list[Entry]:
        """Where a profile's candidates fell back because export could not keep a dim dynamic (their
        specializations serve its exact sizes), a certified eager route over the profile's declared guards: every
        other size of its range runs eager by this evidence, not as a fallback."""
        held = [
            c.entry
            for c in self.candidates.values()
            if c.profile == decision.profile and c.entry is not None and c.entry.meta.get(SPECIALIZE)
        ]
        if not held or held[0].guards is None:
            return []
        dims = ", ".join(held[0].meta[SPECIALIZE])
        note = f"{dims} cannot stay dynamic ({held[0].failure_reason}); eager outside its exact-size specializations"
        return [
            self.kind.store_eager_route(
                urza,
                profile=decision.profile,
                guards=held[0].guards,
                evidence=self.evidence(None, replace(decision, note=note)),
                reason=note,
            )
        ]

    def eager_latency(self, profile: str) -> dict[str, dict[str, float]]:
        """Eager's p50/p95 (ms) per representative shape of ``profile``: the median over the profile's
        candidates' interleaved comparisons."""
        labels = plan.labels_in(self.bp, self.profiles()[profile])
        scored = {c.id: c.comparisons for c in self.candidates.values() if c.profile == profile and c.comparisons}
        if not scored:
            return {}
        labels = [label for label in labels if any(label in by_label for by_label in scored.values())]
        return {
            label: {"p50_ms": f.eager_p50, "p95_ms": f.eager_p95} for label, f in eager_figures(scored, labels).items()
        }

    def parity_evidence(self, c: Candidate) -> dict[str, Any]:
        """:meth:`certified_parity` as stored."""
        return self.certified_parity(c).to_json()

    def certified_parity(self, c: Candidate) -> CertifiedParity:
        """The candidate's parity figures: cases judged, coverage, and per part (output, gradient, buffer)
        the worst RMSE against float64, compiled's and eager's, and their ratio."""
        tol = self.bp.tolerance
        parts = {part: summarize(vs).evidence() for part, vs in c.verdicts.items()}
        ratios = [p["rmse_ratio"] for p in parts.values() if p["rmse_ratio"] is not None]
        worst = max(parts.values(), key=lambda p: p["rmse_ratio"] or 0.0, default={})
        return CertifiedParity(
            cases=c.parity.cases,
            drawn=c.drawn,
            max_abs=c.parity.max_abs,
            rmse_ratio=max(ratios) if ratios else None,
            rmse_compiled=worst.get("rmse_compiled"),
            rmse_eager=worst.get("rmse_eager"),
            parts=parts,
            coverage={
                **self.coverage(c.profile).evidence(),
                "design": self.shape_coverage(c.profile).evidence(),
            },
            nondeterministic=c.nondeterministic,
            rule={
                "reference": "float64",
                # The module's own casts to lower precision run in float64 too (esper.numerics.parity.Float64Casts); a
                # part's "degenerate_reference" says where the reference still matched eager bit for bit.
                "reference_casts": "widened to float64",
                "rmse": "RMSE(compiled, fp64) <= m * RMSE(eager, fp64) + floor (m 2 for float32 >= 1000 elements, "
                "up to 10 for tiny tensors)",
                "floor_ulps": FLOOR_ULPS,
                "pointwise_slack": POINTWISE_SLACK,
            },
            tolerance={"atol": tol.atol, "rtol": tol.rtol},
            guards_refused=c.guards_refused,
            weights=c.weights,
            conditioning={part: tally.record() for part, tally in c.conditioning.items()},
            contract=c.contract.record() if c.contract.cases else None,
        )

    def evidence(
        self,
        c: Candidate | None,
        decision: Decision | None = None,
        *,
        table: RouteTable | None = None,
        own: RouteTable | None = None,
        group: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Parity, performance and meta columns carrying this session's evidence for ``c`` (an eager route
        when ``None``), merged over what the entry already holds. ``table``: the entry's route by region
        (stored in ``meta``; without one, a table an earlier session stored is dropped: compiled everywhere);
        ``own`` and ``group``, where the profile's cells are shared: the cells ``c`` won on its own, and the ids
        of the entries sharing them (what an earlier session stored of either is dropped otherwise)."""
        entry = c.entry if c is not None else None
        latency: dict[str, ShapeTiming] = {}
        if c is not None:
            for label, cmp in c.comparisons.items():
                latency[label] = ShapeTiming(
                    compiled=_timing(_side(cmp, COMPILED)),
                    eager=_timing(_side(cmp, EAGER)),
                    ratio=cmp.ratio,
                    comparison={**cmp.evidence(), "ratios": list(cmp.ratios)},
                )
        elif decision is not None:
            latency = {
                label: ShapeTiming(eager=_timing(figs)) for label, figs in self.eager_latency(decision.profile).items()
            }
        p95_limits, max_ratio = budgets.limits(self.bp.budget, self.budget_profile)
        limits: dict[str, Any] = {"max_ratio": max_ratio, "margin": MARGIN}
        if self.kind.p95_budget:
            limits["p95_ms"] = p95_limits
        certification = CertificationRecord(
            at=datetime.now(UTC).isoformat(timespec="seconds"),
            artifact=str(self.artifact),
            budget_profile=self.budget_profile.name,
            limits=limits,
            context=machine_context(),
            decision=None if decision is None else DecisionRecord(decision.winner, decision.ratio, decision.note),
            timed_apart=not built_in_this_process(entry) if c is not None and entry and c.comparisons else None,
        )
        parity = Parity.from_json(entry.parity if entry else {})
        if c is not None and c.parity.cases:
            parity = replace(parity, certify=self.certified_parity(c))
        performance = Performance.from_json(entry.performance if entry else {})
        if latency:
            performance = replace(performance, certify=latency)
        routing = (ROUTE_TABLE, OWN_ROUTE_TABLE, ROUTE_GROUP)  # this session's decision replaces them
        meta = {k: v for k, v in (entry.meta if entry else {}).items() if k not in routing}
        if table is not None:
            meta[ROUTE_TABLE] = table.to_json()
        if own is not None:
            meta[OWN_ROUTE_TABLE] = own.to_json()
        if group:
            meta[ROUTE_GROUP] = list(group)
        return {
            "parity": parity.to_json(),
            "performance": performance.to_json(),
            "meta": {**meta, "certification": certification.to_json()},
        }

    def begin(self, check: Check) -> None:
        """Before each check: how this process shares the machine with the compile workers, if any (see
        :class:`~esper.certification.compile_ahead.CompileAhead`): a check that times has it quiet, one that
        compiles waits for a worker holding nothing, any other runs beside the workers' compiles."""
        if self.ahead is None:
            return
        if check.times:
            self.ahead.quiet()
        elif check is not Check.COMPILE:
            self.ahead.share()

    def record(self, result: CheckResult) -> None:
        """Note a check's result (every check records its own); a failed candidate check rejects that
        candidate's entry at once, with the check and the reason. A check with several results (one per case
        or shape) keeps its worst."""
        key = (result.check, result.candidate)
        previous = self.outcomes.get(key)
        if previous is None or result.outcome.rank >= previous.outcome.rank:
            self.outcomes[key] = result
        if not result.failed or result.check is Check.PUBLISH:
            return
        if result.candidate is None:
            # A blueprint-wide check (select, budgets) failed: no candidate of this session may be routed.
            hit = [c for c in self.candidates.values() if not self.skip_reason(c)]
        else:
            hit = [self.candidates[result.candidate]] if result.candidate in self.candidates else []
        for c in hit:
            if c.entry is None or c.entry.engine != EntryEngine.AOTI or c.failed is not None:
                continue
            c.failed = str(result.check)
            with Urza(self.urza_path) as urza:
                c.entry = urza.update(
                    c.entry.id,  # type: ignore[arg-type]
                    status=EntryStatus.REJECTED,
                    failed_check=str(result.check),
                    failure_reason=result.reason[:4000],
                    **self.evidence(c),
                )


@dataclass(frozen=True)
class BlueprintCertification:
    """Every artifact kind's :class:`Certification` of one blueprint: ``certification["training"]``."""

    runs: Mapping[ArtifactKind, Certification]

    @classmethod
    def create(
        cls,
        bp: Blueprint,
        urza_path: Path,
        budget_profile: budgets.BudgetProfile,
        *,
        device: str = "cpu",
        recheck: bool = False,
    ) -> BlueprintCertification:
        """One :class:`Certification` per artifact kind."""
        return cls(
            {
                kind: Certification(bp, kind, urza_path, budget_profile, device=device, recheck=recheck)
                for kind in ArtifactKind
            }
        )

    def __getitem__(self, artifact: str) -> Certification:
        return self.runs[ArtifactKind(artifact)]

    def __iter__(self) -> Iterator[Certification]:
        return iter(self.runs.values())

    @property
    def bp(self) -> Blueprint:
        return next(iter(self)).bp

    def record(self, artifact: str, result: CheckResult) -> None:
        """Note a check's result on the certification of ``artifact``."""
        self[artifact].record(result)

    def outcomes(self) -> dict[tuple[ArtifactKind, Check, str | None], CheckResult]:
        """Every recorded result by ``(kind, check, candidate)``."""
        return {(run.artifact, name, cid): r for run in self for (name, cid), r in run.outcomes.items()}

    def certify(self) -> list[CheckResult]:
        """Every check of every kind, in the order a generated test module runs them (each check over every
        kind and candidate before the next check); a candidate's parity draws run only after its planned
        cases pass. The results are recorded as they come: failures reject their candidates in Urza."""
        results: list[CheckResult] = []
        for run in self:
            results += [run.compile(cid) for cid in plan.candidate_ids(self.bp, run.artifact)]
        for run in self:
            for cid in plan.candidate_ids(self.bp, run.artifact):
                results.append(run.check_parity(cid))
                if results[-1].passed:
                    results.append(run.check_drawn_cases(cid))
                results.append(run.check_contract(cid))
        for run in self:
            results += [run.check_weights(cid) for cid in plan.candidate_ids(self.bp, run.artifact)]
        for run in self:
            results += [run.check_repeated(cid) for cid in plan.candidate_ids(self.bp, run.artifact)]
        for run in self:
            results += [run.check_guards(cid) for cid in plan.candidate_ids(self.bp, run.artifact)]
        for run in self:
            results += [run.compare_latency(cid, label) for cid, label in plan.latency_cases(self.bp, run.artifact)]
        for run in self:
            results += [run.compare_regions(cid) for cid in plan.candidate_ids(self.bp, run.artifact)]
        for step in (Certification.select, Certification.check_budgets, Certification.publish):
            results += [step(run) for run in self]
        return results


def first_failure(verdicts: Mapping[str, ParityVerdict]) -> str:
    """The first failing output of ``verdicts`` with its figures, or the first structural failure ("": none)."""
    failed = [o for v in verdicts.values() for o in v.outputs if not o.passed]
    if failed:
        o = failed[0]
        figures = (
            f" (RMSE against float64: compiled {o.rmse_compiled:.3g}, eager {o.rmse_eager:.3g}; "
            f"max |compiled - eager| {o.max_abs:.3g})"
            if o.rmse_eager or o.rmse_compiled
            else ""
        )
        return f"{o.reason}{figures}"
    broken = [v for v in verdicts.values() if not v.passed]  # a structural failure, no output to blame
    return broken[0].reason if broken else ""


def _timing(figures: Mapping[str, float]) -> Timing:
    return Timing.from_json(figures) or Timing()


def _side(cmp: timing.Comparison, path: str) -> dict[str, float]:
    """One side's p50/p95 (ms) of an interleaved comparison."""
    if path == EAGER:
        return {"p50_ms": cmp.eager_p50 * 1e3, "p95_ms": cmp.eager_p95 * 1e3, "rounds": cmp.rounds}
    return {"p50_ms": cmp.candidate_p50 * 1e3, "p95_ms": cmp.candidate_p95 * 1e3, "rounds": cmp.rounds}
