"""One blueprint's certification: the checks a generated test module calls, in order, and the publish step.

Each check is a method; a failure raises (pytest turns it into a failed test) and the session marks the Urza
entry ``rejected`` with the check's name and message. :meth:`BlueprintCertification.publish` certifies the
entry, with all the evidence, in one transaction, and only when every check of the module passed.
"""

from __future__ import annotations

import contextlib
import logging
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
from esper.guards import GuardSchema
from esper.inputs import Regime, make_inputs
from esper.kasmina import COMPILED, EAGER, Kasmina, Kernel
from esper.parity import ParityStats, assert_parity, max_errors
from esper.urza import Entry, Urza

log = logging.getLogger("esper.certify")

CHECKS = ("compile", "parity", "guards", "latency", "budgets", "publish")


@dataclass
class Outcome:
    """What happened to one test of a generated module."""

    check: str
    outcome: str  # "passed" | "failed" | "skipped"
    message: str = ""


@dataclass
class BlueprintCertification:
    """State and checks for one blueprint in one pytest session."""

    bp: Blueprint
    urza_path: Path
    profile: budgets.BudgetProfile
    device: str = "cpu"
    recheck: bool = False
    entry: Entry | None = None
    reused: bool = False
    compile_seconds: float | None = None
    skip_reason: str | None = None
    kernel: Kernel | None = None
    parity: ParityStats = field(default_factory=ParityStats)
    guards_refused: int = 0
    latency: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    status: str = "not run"
    _eager: torch.nn.Module | None = None

    # -- 1. compile --------------------------------------------------------------------------------

    def compile(self) -> Entry:
        """Compile with Tezzeret, or reuse the entry with the same content hash and compatibility key."""
        from esper.tezzeret.compiler import Tezzeret

        with Urza(self.urza_path) as urza:
            outcome = Tezzeret(urza, device=self.device).compile(self.bp)
        self.entry, self.reused, self.compile_seconds = outcome.entry, outcome.reused, outcome.seconds
        self.status = self.entry.status
        if self.entry.status == "fallback":
            self.skip_reason = f"eager fallback (entry #{self.entry.id}): {self.entry.failure_reason}"
        elif self.entry.status == "certified" and not self.recheck:
            self.skip_reason = (
                f"already certified as entry #{self.entry.id} (same content hash and compatibility key); "
                "--certify-recheck runs the checks again"
            )
        return self.entry

    def ready(self) -> Entry:
        """The entry under test; skips the calling test when there is nothing to check."""
        if self.entry is None:
            pytest.skip("not compiled in this session (test_compile failed or did not run)")
        if self.skip_reason:
            pytest.skip(self.skip_reason)
        return self.entry

    @property
    def guards(self) -> GuardSchema:
        entry = self.ready()
        assert entry.guards is not None
        return entry.guards

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        return self.guards.dim_ranges()

    def _kernel(self) -> Kernel:
        """The entry loaded exactly as Kasmina loads it (checksum, C++ loader, pre-warm, guards)."""
        entry = self.ready()
        if self.kernel is None:
            kasmina = Kasmina(self.urza_path, catalog=Catalog({self.bp.name: self.bp}), device=self.device)
            self.kernel = kasmina.load_entry(self.bp.name, entry.id)  # type: ignore[arg-type]
        if self.kernel.route != COMPILED:
            pytest.fail(f"Kasmina cannot load entry #{entry.id}: {self.kernel.reason}")
        return self.kernel

    def eager(self) -> torch.nn.Module:
        """The reference: the blueprint's own module, built independently of the kernel."""
        if self._eager is None:
            self._eager = self.bp.build().to(self.device).eval()
        return self._eager

    def _inputs(self, sizes: Mapping[str, int], regime: Regime = Regime()) -> tuple[torch.Tensor, ...]:  # noqa: B008
        return make_inputs(self.bp, sizes, regime, self.device)

    # -- 2. parity ---------------------------------------------------------------------------------

    def check_parity(self, sizes: Mapping[str, int], regime: Regime) -> None:
        """Compiled (through Kasmina) against eager at one shape and value regime, within tolerance."""
        kernel = self._kernel()
        args = self._inputs(sizes, regime)
        refused = kernel.check(*args)
        if refused is not None:
            pytest.fail(f"guards refuse a shape inside the declared range {dict(sizes)}: {refused}")
        with torch.no_grad():
            got = kernel(*args)
            if kernel.last_path != COMPILED:
                pytest.fail(f"Kasmina ran {kernel.last_path} for accepted inputs {dict(sizes)}")
            want = self.eager()(*args)
        self.parity.add(*max_errors(got, want))
        tol = self.bp.tolerance
        assert_parity(got, want, atol=tol.atol, rtol=tol.rtol, context=f"{self.bp.name} at {dict(sizes)}, {regime!r}")

    # -- 3. guards ---------------------------------------------------------------------------------

    def refused_cases(self) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
        """Inputs the guards must refuse: each dynamic dim just outside its range, a wrong dtype, a wrong
        rank, and each fixed dim off by one."""
        guards = self.guards
        base_sizes = dict(self.bp.representative[0])
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
                    cases.append(
                        (f"{g.name} dim {d} = {shape[d]}", _replace(base, k, torch.zeros(shape, dtype=base[k].dtype)))
                    )
        return cases

    def check_guards(self) -> None:
        """Every refused case is refused by the guard check and served eagerly, never by compiled code."""
        kernel = self._kernel()
        for what, args in self.refused_cases():
            if kernel.check(*args) is None:
                pytest.fail(f"guards accept an input they must refuse: {what}")
            compiled_before = kernel.calls[COMPILED]
            # Eager may rightly reject these inputs; what matters is the path the call took.
            with torch.no_grad(), contextlib.suppress(Exception):
                kernel(*args)
            if kernel.last_path != EAGER or kernel.calls[COMPILED] != compiled_before:
                pytest.fail(f"{what}: reached the compiled code")
            self.guards_refused += 1

    # -- 4. latency --------------------------------------------------------------------------------

    def labels(self) -> dict[str, dict[str, int]]:
        return {Blueprint.shape_label(r): dict(r) for r in self.bp.representative}

    def benchmark(self, bench: Any, path: str, label: str) -> None:
        """Measure ``path`` (``compiled`` or ``eager``) at one representative shape with pytest-benchmark."""
        kernel = self._kernel()
        args = self._inputs(self.labels()[label])
        fn: Callable[[], Any] = (lambda: kernel(*args)) if path == COMPILED else (lambda: self.eager()(*args))
        bench.group = f"{self.bp.name}[{label}]"
        bench.extra_info.update(blueprint=self.bp.name, path=path, shape=label, entry=self.entry.id)  # type: ignore[union-attr]
        with torch.no_grad():
            bench(fn)
            if path == COMPILED and kernel.last_path != COMPILED:
                pytest.fail(f"compiled benchmark ran {kernel.last_path}: {kernel.reason}")
            stats = getattr(getattr(bench, "stats", None), "stats", None)
            if stats is None or not getattr(stats, "data", None):
                # pytest-benchmark is disabled (--benchmark-disable, or under xdist): measure directly so
                # budgets still have figures.
                figures = measure(fn).to_dict()
            else:
                data_ms = [t * 1e3 for t in stats.data]
                figures = {"p50_ms": stats.median * 1e3, "p95_ms": percentile(data_ms, 0.95), "n": len(data_ms)}
        self.latency.setdefault(label, {})[path] = figures

    # -- 5. budgets --------------------------------------------------------------------------------

    def figures(self) -> dict[str, budgets.Figures]:
        """Figures at every representative shape; fails if a shape lacks either path's measurement."""
        measured = self._measured()
        for label in self.labels():
            if label not in measured:
                missing = [p for p in (COMPILED, EAGER) if p not in self.latency.get(label, {})]
                pytest.fail(f"latency at {label} was not measured for {missing} (deselected or failed)")
        return measured

    def check_budgets(self) -> None:
        """Measured figures against the blueprint's budget on this budget profile."""
        self.ready()
        violations = budgets.check(self.bp.budget, self.profile, self.figures())
        if violations:
            pytest.fail(f"over budget ({self.profile.name} profile): " + "; ".join(map(str, violations)))

    # -- 6. publish --------------------------------------------------------------------------------

    def publish(self) -> Entry:
        """Certify the entry with its evidence, if every other check of this module passed."""
        entry = self.ready()
        failed = {c: o for c, o in self.outcomes.items() if o.outcome == "failed"}
        if failed:
            pytest.fail("not certified; failed: " + "; ".join(f"{c}: {o.message}" for c, o in failed.items()))
        missing = [c for c in CHECKS[:-1] if self.outcomes.get(c, Outcome(c, "not run")).outcome != "passed"]
        if missing:
            pytest.fail(f"not certified: checks {missing} did not pass in this session (deselected or skipped)")
        with Urza(self.urza_path) as urza:
            self.entry = urza.update(
                entry.id,  # type: ignore[arg-type]
                status="certified",
                failure_reason=None,
                failed_check=None,
                **self.evidence(entry, self.figures()),
            )
        self.status = "certified"
        return self.entry

    def evidence(self, entry: Entry, figures: Mapping[str, budgets.Figures]) -> dict[str, Any]:
        """The entry's parity, performance and meta columns with this session's evidence added."""
        p95_limits, max_ratio = budgets.limits(self.bp.budget, self.profile)
        latency = {label: {**self.latency[label], "ratio": f.ratio} for label, f in figures.items()}
        parity = {
            "cases": self.parity.cases,
            "max_abs": self.parity.max_abs,
            "max_rel": self.parity.max_rel,
            "tolerance": {"atol": self.bp.tolerance.atol, "rtol": self.bp.tolerance.rtol},
            "guards_refused": self.guards_refused,
        }
        certification = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "budget_profile": self.profile.name,
            "limits": {"p95_ms": p95_limits, "max_ratio": max_ratio},
            "context": machine_context(),
        }
        return {
            "parity": {**entry.parity, "certify": parity} if self.parity.cases else entry.parity,
            "performance": {**entry.performance, "certify": latency} if latency else entry.performance,
            "meta": {**entry.meta, "certification": certification},
        }

    def _measured(self) -> dict[str, budgets.Figures]:
        """Figures for the shapes where both paths were measured (what a rejected entry keeps)."""
        out = {}
        for label, got in self.latency.items():
            if COMPILED in got and EAGER in got:
                c, e = got[COMPILED], got[EAGER]
                out[label] = budgets.Figures(c["p50_ms"], c["p95_ms"], e["p50_ms"], e["p95_ms"])
        return out

    def record(self, outcome: Outcome) -> None:
        """Note a test's outcome; a failed check rejects the entry at once, with the check and the reason.

        A check with several tests (parametrized shapes, hypothesis) keeps its worst outcome.
        """
        rank = {"passed": 0, "skipped": 1, "failed": 2}
        previous = self.outcomes.get(outcome.check)
        if previous is None or rank[outcome.outcome] >= rank[previous.outcome]:
            self.outcomes[outcome.check] = outcome
        if outcome.outcome != "failed" or self.entry is None or self.status == "rejected":
            return
        with Urza(self.urza_path) as urza:
            self.entry = urza.update(
                self.entry.id,  # type: ignore[arg-type]
                status="rejected",
                failed_check=outcome.check,
                failure_reason=outcome.message[:4000],
                **self.evidence(self.entry, self._measured()),
            )
        self.status = "rejected"


def _replace(args: tuple[torch.Tensor, ...], k: int, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (*args[:k], value, *args[k + 1 :])
