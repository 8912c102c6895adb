"""One blueprint's certification: the checks a generated test module calls, and the decision it publishes.

A blueprint is compiled into *candidates*: one per shape profile (bucket) and compile variant. Each candidate
is checked (parity, guards) and measured (pytest-benchmark); then, per profile, the fastest candidate that
passed wins if it beats eager by :data:`MARGIN`, else the profile is certified to run eager. A failed check
marks that candidate ``rejected`` at once, with the check's name and message and the figures measured so far;
:meth:`BlueprintCertification.publish` writes the winners (``certified``), the losers (``rejected`` by
``selection``, with their figures) and any eager routes, each in one transaction.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from esper import budgets
from esper.bench import measure, percentile
from esper.blueprint import Blueprint
from esper.catalog import Catalog
from esper.context import machine_context
from esper.inputs import Regime, make_inputs
from esper.kasmina import COMPILED, EAGER, Kasmina, Kernel
from esper.parity import ParityStats, assert_parity, max_errors
from esper.profiles import contains
from esper.urza import Entry, Urza

log = logging.getLogger("esper.certify")

CHECKS = ("compile", "parity", "guards", "latency", "select", "budgets", "publish")
CANDIDATE_CHECKS = ("compile", "parity", "guards", "latency")
# A compiled route must beat eager by this much (geomean p50 over the profile's shapes), or eager it is.
MARGIN = 0.05
SELECTION = "selection"


@dataclass
class Outcome:
    """What happened to one test of a generated module (``candidate`` is ``None`` for blueprint-wide checks)."""

    check: str
    outcome: str  # "passed" | "failed" | "skipped"
    message: str = ""
    candidate: str | None = None


@dataclass
class Candidate:
    """One shape profile compiled under one variant, and what this session learned about it."""

    profile: str
    variant: str
    ranges: dict[str, tuple[int, int]]
    entry: Entry | None = None
    reused: bool = False
    compile_seconds: float | None = None
    kernel: Kernel | None = None
    parity: ParityStats = field(default_factory=ParityStats)
    guards_refused: int = 0
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: str | None = None

    @property
    def id(self) -> str:
        return f"{self.profile}/{self.variant}"


@dataclass(frozen=True)
class Decision:
    """A profile's route: the winning candidate, or eager (``winner is None``), and why."""

    profile: str
    winner: str | None
    ratio: float | None
    note: str


def candidate_ids(bp: Blueprint) -> list[str]:
    return [f"{p}/{v}" for p in bp.profiles() for v in bp.variants]


def latency_cases(bp: Blueprint) -> list[tuple[str, str]]:
    """``(path, shape label)`` pairs to benchmark: eager at every representative shape, and each candidate at
    the representative shapes inside its profile."""
    labels = [(Blueprint.shape_label(r), r) for r in bp.representative]
    cases = [("eager", label) for label, _ in labels]
    for pname, ranges in bp.profiles().items():
        for v in bp.variants:
            cases += [(f"{pname}/{v}", label) for label, r in labels if contains(ranges, r)]
    return cases


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass
class BlueprintCertification:
    """State and checks for one blueprint in one pytest session."""

    bp: Blueprint
    urza_path: Path
    profile: budgets.BudgetProfile
    device: str = "cpu"
    recheck: bool = False
    candidates: dict[str, Candidate] = field(default_factory=dict)
    eager_latency: dict[str, dict[str, float]] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    outcomes: dict[tuple[str, str | None], Outcome] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)  # candidates whose checks ran in this session
    _eager: torch.nn.Module | None = None
    _training: Any = None

    @property
    def training(self) -> Any:
        """The certification of this blueprint's training artifact (see esper.certification.training)."""
        if self._training is None:
            from esper.certification.training import TrainingCertification

            self._training = TrainingCertification(
                self.bp, self.urza_path, self.profile, device=self.device, recheck=self.recheck
            )
        return self._training

    def __post_init__(self) -> None:
        for pname, ranges in self.bp.profiles().items():
            for v in self.bp.variants:
                c = Candidate(pname, v, ranges)
                self.candidates[c.id] = c

    # -- 1. compile --------------------------------------------------------------------------------

    def compile(self, candidate: str) -> Entry:
        """Compile one candidate with Tezzeret, or reuse the entry with the same content hash and key."""
        from esper.tezzeret.compiler import Tezzeret
        from esper.variants import VARIANTS

        c = self.candidates[candidate]
        with Urza(self.urza_path) as urza:
            outcome = Tezzeret(urza, device=self.device).compile(
                self.bp, variant=VARIANTS[c.variant], profile=c.profile
            )
        c.entry, c.reused, c.compile_seconds = outcome.entry, outcome.reused, outcome.seconds
        return c.entry

    def skip_reason(self, c: Candidate) -> str | None:
        """Why ``c`` is not checked in this session: a fallback, or a profile decided already.

        A profile is skipped only when every one of its candidates was decided by an earlier run with the
        same content hash: a new or changed candidate makes the whole profile compete again.
        """
        if c.entry is None:
            return f"{c.id} was not compiled in this session (test_compile failed or did not run)"
        if c.entry.status == "fallback":
            return f"eager fallback (entry #{c.entry.id}): {c.entry.failure_reason}"
        peers = [p for p in self.candidates.values() if p.profile == c.profile and p.entry is not None]
        decided = all(
            p.entry.status in ("certified", "fallback") or p.entry.failed_check == SELECTION  # type: ignore[union-attr]
            for p in peers
        )
        if decided and not self.recheck:
            return (
                f"profile {c.profile} already decided (entry #{c.entry.id} {c.entry.status}; same content hash "
                "and compatibility key); --certify-recheck runs the checks again"
            )
        return None

    def ready(self, candidate: str) -> Candidate:
        """The candidate under test; skips the calling test when there is nothing to check."""
        c = self.candidates[candidate]
        why = self.skip_reason(c)
        if why:
            pytest.skip(why)
        self.checked.add(candidate)
        return c

    def ranges(self, candidate: str) -> dict[str, tuple[int, int]]:
        return self.candidates[candidate].ranges

    def _kernel(self, c: Candidate) -> Kernel:
        """The entry loaded exactly as Kasmina loads it (checksum, C++ loader, pre-warm, guards)."""
        assert c.entry is not None and c.entry.id is not None
        if c.kernel is None:
            kasmina = Kasmina(self.urza_path, catalog=Catalog({self.bp.name: self.bp}), device=self.device)
            c.kernel = kasmina.load_entry(self.bp.name, c.entry.id)
        if c.kernel.route != COMPILED:
            pytest.fail(f"Kasmina cannot load entry #{c.entry.id}: {c.kernel.reason}")
        return c.kernel

    def eager(self) -> torch.nn.Module:
        """The reference: the blueprint's own module, built independently of any kernel."""
        if self._eager is None:
            self._eager = self.bp.build().to(self.device).eval()
        return self._eager

    def _inputs(self, sizes: Mapping[str, int], regime: Regime | None = None) -> tuple[torch.Tensor, ...]:
        return make_inputs(self.bp, sizes, regime or Regime(), self.device)

    # -- 2. parity ---------------------------------------------------------------------------------

    def check_parity(self, candidate: str, sizes: Mapping[str, int], regime: Regime) -> None:
        """Compiled (through Kasmina) against eager at one shape and value regime, within tolerance."""
        c = self.ready(candidate)
        kernel = self._kernel(c)
        args = self._inputs(sizes, regime)
        refused = kernel.check(*args)
        if refused is not None:
            pytest.fail(f"guards refuse a shape inside the profile's range {dict(sizes)}: {refused}")
        with torch.no_grad():
            got = kernel(*args)
            if kernel.last_path != COMPILED:
                pytest.fail(f"Kasmina ran {kernel.last_path} for accepted inputs {dict(sizes)}")
            want = self.eager()(*args)
        c.parity.add(*max_errors(got, want))
        tol = self.bp.tolerance
        assert_parity(got, want, atol=tol.atol, rtol=tol.rtol, context=f"{candidate} at {dict(sizes)}, {regime!r}")

    # -- 3. guards ---------------------------------------------------------------------------------

    def refused_cases(self, candidate: str) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
        """Inputs the candidate's guards must refuse: each dynamic dim just outside its (profile) range, a
        wrong dtype, a wrong rank, and each fixed dim off by one."""
        c = self.ready(candidate)
        assert c.entry is not None and c.entry.guards is not None
        guards = c.entry.guards
        base_sizes = next(dict(r) for r in self.bp.representative if contains(c.ranges, r))
        cases: list[tuple[str, tuple[torch.Tensor, ...]]] = []
        for name, (lo, hi) in guards.dim_ranges().items():
            for size, what in ((lo - 1, "below"), (hi + 1, "above")):
                if size >= 0:
                    cases.append((f"{name}={size} ({what} range)", self._inputs({**base_sizes, name: size})))
        base = self._inputs(base_sizes)
        for k, g in enumerate(guards.inputs):
            wrong = torch.float64 if base[k].dtype != torch.float64 else torch.float32
            cases.append((f"{g.name} as {wrong}", _replace(base, k, base[k].to(wrong))))
            cases.append((f"{g.name} with an extra dim", _replace(base, k, base[k].unsqueeze(0))))
            for d, dim in enumerate(g.dims):
                if not dim.dynamic:
                    shape = list(base[k].shape)
                    shape[d] += 1
                    bad = torch.zeros(shape, dtype=base[k].dtype)
                    cases.append((f"{g.name} dim {d} = {shape[d]}", _replace(base, k, bad)))
        return cases

    def check_guards(self, candidate: str) -> None:
        """Every refused case is refused by the guard check and served eagerly, never by compiled code."""
        c = self.ready(candidate)
        kernel = self._kernel(c)
        for what, args in self.refused_cases(candidate):
            if kernel.check(*args) is None:
                pytest.fail(f"guards accept an input they must refuse: {what}")
            compiled_before = kernel.calls[COMPILED]
            # Eager may rightly reject these inputs; what matters is the path the call took.
            with torch.no_grad(), contextlib.suppress(Exception):
                kernel(*args)
            if kernel.last_path != EAGER or kernel.calls[COMPILED] != compiled_before:
                pytest.fail(f"{what}: reached the compiled code")
            c.guards_refused += 1

    # -- 4. latency --------------------------------------------------------------------------------

    def labels(self) -> dict[str, dict[str, int]]:
        return {Blueprint.shape_label(r): dict(r) for r in self.bp.representative}

    def benchmark(self, bench: Any, path: str, label: str) -> None:
        """Measure ``path`` (``"eager"`` or a candidate id) at one representative shape with pytest-benchmark."""
        args = self._inputs(self.labels()[label])
        if path == EAGER:
            if all(self.skip_reason(c) for c in self.candidates.values()):
                pytest.skip("every candidate is decided already or a fallback: nothing to compare eager with")
            fn: Callable[[], Any] = lambda: self.eager()(*args)  # noqa: E731
            entry_id = None
        else:
            c = self.ready(path)
            kernel = self._kernel(c)
            fn = lambda: kernel(*args)  # noqa: E731
            entry_id = c.entry.id if c.entry else None
        bench.group = f"{self.bp.name}[{label}]"
        bench.extra_info.update(blueprint=self.bp.name, path=path, shape=label, entry=entry_id)
        with torch.no_grad():
            bench(fn)
            if path != EAGER and kernel.last_path != COMPILED:
                pytest.fail(f"compiled benchmark ran {kernel.last_path}: {kernel.reason}")
            stats = getattr(getattr(bench, "stats", None), "stats", None)
            if stats is None or not getattr(stats, "data", None):
                # pytest-benchmark is disabled (--benchmark-disable, or under xdist): measure directly so
                # selection and budgets still have figures.
                figures = measure(fn).to_dict()
            else:
                data_ms = [t * 1e3 for t in stats.data]
                figures = {"p50_ms": stats.median * 1e3, "p95_ms": percentile(data_ms, 0.95), "n": len(data_ms)}
        if path == EAGER:
            self.eager_latency[label] = figures
        else:
            self.candidates[path].latency[label] = figures

    # -- 5. select ---------------------------------------------------------------------------------

    def _passed(self, c: Candidate) -> bool:
        return (
            c.entry is not None
            and not self.skip_reason(c)
            and c.failed is None
            and all(
                self.outcomes.get((check, c.id), Outcome(check, "not run")).outcome == "passed"
                for check in CANDIDATE_CHECKS
            )
        )

    def select(self) -> dict[str, Decision]:
        """Per profile: the fastest candidate that passed every check, if it beats eager by ``MARGIN``."""
        if all(self.skip_reason(c) for c in self.candidates.values()):
            pytest.skip("every candidate is decided already or a fallback")
        self.decisions = {}
        for pname, ranges in self.bp.profiles().items():
            labels = [label for label, r in self.labels().items() if contains(ranges, r)]
            missing = [label for label in labels if label not in self.eager_latency]
            if missing:
                pytest.fail(f"profile {pname}: eager latency not measured at {missing}")
            eager = geomean([self.eager_latency[label]["p50_ms"] for label in labels])
            scored = []
            for c in self.candidates.values():
                if c.profile == pname and self._passed(c) and all(label in c.latency for label in labels):
                    scored.append((geomean([c.latency[label]["p50_ms"] for label in labels]) / eager, c.id))
            if not scored:
                self.decisions[pname] = Decision(pname, None, None, "no candidate passed its checks")
                continue
            ratio, best = min(scored)
            if ratio <= 1 - MARGIN:
                self.decisions[pname] = Decision(pname, best, ratio, f"{best} at {ratio:.2f}x eager")
            else:
                note = f"eager: the best variant, {best}, runs at {ratio:.2f}x eager (needs <= {1 - MARGIN:.2f}x)"
                self.decisions[pname] = Decision(pname, None, ratio, note)
        return self.decisions

    # -- 6. budgets --------------------------------------------------------------------------------

    def route_figures(self, decision: Decision) -> dict[str, budgets.Figures]:
        """Figures of the route a decision picked, at each representative shape of its profile."""
        ranges = self.bp.profiles()[decision.profile]
        out = {}
        for label, r in self.labels().items():
            if not contains(ranges, r):
                continue
            e = self.eager_latency[label]
            c = self.candidates[decision.winner].latency[label] if decision.winner else e
            out[label] = budgets.Figures(c["p50_ms"], c["p95_ms"], e["p50_ms"], e["p95_ms"])
        return out

    def check_budgets(self) -> None:
        """The routes' measured figures against the blueprint's budget on this budget profile."""
        if not self.decisions:
            pytest.skip("no selection was made in this session")
        violations = []
        for decision in self.decisions.values():
            if decision.note == "no candidate passed its checks":
                continue
            route = decision.winner or "eager"
            violations += [
                f"{route}: {v}" for v in budgets.check(self.bp.budget, self.profile, self.route_figures(decision))
            ]
        if violations:
            pytest.fail(f"over budget ({self.profile.name} profile): " + "; ".join(map(str, violations)))

    # -- 7. publish --------------------------------------------------------------------------------

    def publish(self) -> list[Entry]:
        """Write every decision: winners certified, losers rejected by selection, eager routes certified."""
        if not self.decisions:
            pytest.skip("no selection was made in this session")
        for check in ("select", "budgets"):
            o = self.outcomes.get((check, None))
            if o is None or o.outcome != "passed":
                pytest.fail(f"not certified: {check} {'did not run' if o is None else o.outcome}")
        from esper.tezzeret.compiler import Tezzeret

        published: list[Entry] = []
        with Urza(self.urza_path) as urza:
            for decision in self.decisions.values():
                contenders = [c for c in self.candidates.values() if c.profile == decision.profile and self._passed(c)]
                for c in contenders:
                    assert c.entry is not None and c.entry.id is not None
                    if c.id == decision.winner:
                        c.entry = urza.update(
                            c.entry.id,
                            status="certified",
                            failure_reason=None,
                            failed_check=None,
                            **self.evidence(c, decision),
                        )
                        published.append(c.entry)
                    else:
                        why = f"not routed: {decision.note}"
                        c.entry = urza.update(
                            c.entry.id,
                            status="rejected",
                            failed_check=SELECTION,
                            failure_reason=why,
                            **self.evidence(c, decision),
                        )
                if decision.winner is None and contenders:
                    guards = contenders[0].entry.guards  # type: ignore[union-attr]
                    assert guards is not None
                    route = Tezzeret(urza, device=self.device).store_eager_route(
                        self.bp, decision.profile, guards, self.evidence(None, decision)
                    )
                    published.append(route)
        return published

    def evidence(self, c: Candidate | None, decision: Decision | None = None) -> dict[str, Any]:
        """Parity, performance and meta columns carrying this session's evidence for ``c`` (an eager route
        when ``None``), merged over what the entry already holds."""
        entry = c.entry if c is not None else None
        p95_limits, max_ratio = budgets.limits(self.bp.budget, self.profile)
        labels = list(c.latency) if c is not None else list(self.route_figures(decision).keys()) if decision else []
        latency: dict[str, Any] = {}
        for label in labels:
            row: dict[str, Any] = {}
            if label in self.eager_latency:
                row[EAGER] = self.eager_latency[label]
            if c is not None and label in c.latency:
                row[COMPILED] = c.latency[label]
                if EAGER in row:
                    row["ratio"] = row[COMPILED]["p50_ms"] / row[EAGER]["p50_ms"]
            latency[label] = row
        certification = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "budget_profile": self.profile.name,
            "limits": {"p95_ms": p95_limits, "max_ratio": max_ratio, "margin": MARGIN},
            "context": machine_context(),
        }
        if decision is not None:
            certification["decision"] = {"winner": decision.winner, "ratio": decision.ratio, "note": decision.note}
        parity = dict(entry.parity) if entry else {}
        if c is not None and c.parity.cases:
            parity["certify"] = {
                "cases": c.parity.cases,
                "max_abs": c.parity.max_abs,
                "max_rel": c.parity.max_rel,
                "tolerance": {"atol": self.bp.tolerance.atol, "rtol": self.bp.tolerance.rtol},
                "guards_refused": c.guards_refused,
            }
        performance = dict(entry.performance) if entry else {}
        if latency:
            performance["certify"] = latency
        return {
            "parity": parity,
            "performance": performance,
            "meta": {**(entry.meta if entry else {}), "certification": certification},
        }

    def record(self, outcome: Outcome) -> None:
        """Note a test's outcome; a failed candidate check rejects that candidate's entry at once, with the
        check and the reason. A check with several tests keeps its worst outcome."""
        if outcome.check.startswith("train_") or outcome.check == "grad_parity":
            self.training.record(outcome)  # training checks decide the training artifact only
            return
        rank = {"passed": 0, "skipped": 1, "failed": 2}
        key = (outcome.check, outcome.candidate)
        previous = self.outcomes.get(key)
        if previous is None or rank[outcome.outcome] >= rank[previous.outcome]:
            self.outcomes[key] = outcome
        if outcome.outcome != "failed" or outcome.check == "publish":
            return
        if outcome.candidate is None:
            # A blueprint-wide check (select, budgets) failed: no candidate of this session may be routed.
            hit = [c for c in self.candidates.values() if not self.skip_reason(c)]
        else:
            hit = [self.candidates[outcome.candidate]] if outcome.candidate in self.candidates else []
        for c in hit:
            if c.entry is None or c.failed is not None:
                continue
            c.failed = outcome.check
            with Urza(self.urza_path) as urza:
                c.entry = urza.update(
                    c.entry.id,  # type: ignore[arg-type]
                    status="rejected",
                    failed_check=outcome.check,
                    failure_reason=outcome.message[:4000],
                    **self.evidence(c),
                )


def _replace(args: tuple[torch.Tensor, ...], k: int, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (*args[:k], value, *args[k + 1 :])
