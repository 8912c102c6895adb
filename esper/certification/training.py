"""Certification of a blueprint's training artifact: the training checks of the generated module.

Tezzeret compiles the artifact (forward and backward packages, weights as inputs); Kasmina loads it exactly
as a training run would; then the module checks, in order: gradient parity with eager autograd (output,
every parameter's gradient, the input's gradient and every buffer training mutates; output and gradients at
the blueprint's tolerance widened by eager's own float32 error, see :func:`esper.gradients.tolerance`) on
hypothesis-drawn shapes that always include the dims' edges; that the guards send inputs outside them to eager; and the
training step's latency, compiled and eager, with pytest-benchmark. ``publish`` then decides by measurement,
as for inference: the compiled artifact is certified if its step beats eager by ``MARGIN`` (and keeps within
the budget's ratio cap); otherwise it is rejected by selection and a certified eager training route is
stored. A failed check rejects the artifact at once. A blueprint whose training Tezzeret routed eager
(randomness such as dropout, or a failed export) skips every training check with that recorded reason.

``ESPER_CERTIFY_TRAINING=0`` turns the training checks off (they skip, saying so).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

from esper import budgets
from esper.bench import measure, percentile
from esper.blueprint import Blueprint
from esper.catalog import Catalog
from esper.certification.run import MARGIN, Outcome, geomean
from esper.context import machine_context
from esper.gradients import exact_gradients, gradients, step, tolerance, upstream
from esper.inputs import Regime, make_inputs
from esper.kasmina import Kasmina
from esper.kasmina.training import COMPILED, EAGER, TrainingKernel, load_training
from esper.parity import ParityStats, assert_parity, max_errors
from esper.urza import Entry, Urza

ENV = "ESPER_CERTIFY_TRAINING"
CHECKS = ("train_compile", "grad_parity", "train_guards", "train_latency", "train_publish")
SELECTION = "selection"


def enabled() -> bool:
    """Whether training checks run (``ESPER_CERTIFY_TRAINING`` unset, or not 0/no/false/off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "no", "false", "off")


@dataclass
class TrainingCertification:
    """State and checks of one blueprint's training artifact in one pytest session."""

    bp: Blueprint
    urza_path: Path
    profile: budgets.BudgetProfile
    device: str = "cpu"
    recheck: bool = False
    entry: Entry | None = None
    reused: bool = False
    compile_seconds: float | None = None
    skip_reason: str | None = None
    kernel: TrainingKernel | None = None
    parity: ParityStats = field(default_factory=ParityStats)
    guards_refused: int = 0
    latency: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    failed: str | None = None
    _eager: torch.nn.Module | None = None

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        return {n: (d.min, d.max) for n, d in self.bp.dims.items()}

    # -- compile -----------------------------------------------------------------------------------

    def compile(self) -> Entry:
        """Compile the training artifact with Tezzeret, or reuse the entry with the same content hash."""
        if not enabled():
            self.skip_reason = f"training certification is off ({ENV}=0)"
            pytest.skip(self.skip_reason)
        from esper.tezzeret.training import compile_training

        with Urza(self.urza_path) as urza:
            outcome = compile_training(urza, self.bp, device=self.device)
        self.entry, self.reused, self.compile_seconds = outcome.entry, outcome.reused, outcome.seconds
        e = self.entry
        if e.kind == "eager":
            self.skip_reason = f"eager training route (entry #{e.id}): {e.failure_reason}"
        elif (e.status == "certified" or e.failed_check == SELECTION) and not self.recheck:
            self.skip_reason = (
                f"training artifact already decided as entry #{e.id} ({e.status}; same content hash and "
                "compatibility key); --certify-recheck runs the checks again"
            )
        return e

    def ready(self) -> Entry:
        """The artifact under test; skips the calling test when there is nothing to check."""
        if self.skip_reason:
            pytest.skip(self.skip_reason)
        if self.entry is None:
            pytest.skip("the training artifact was not compiled in this session (test_train_compile did not pass)")
        return self.entry

    def _kernel(self) -> TrainingKernel:
        """The artifact loaded exactly as Kasmina loads it for a training run."""
        entry = self.ready()
        if self.kernel is None:
            kasmina = Kasmina(self.urza_path, catalog=Catalog({self.bp.name: self.bp}), device=self.device)
            self.kernel = load_training(kasmina, self.bp.name, entry_id=entry.id)
        if self.kernel.route != COMPILED:
            pytest.fail(f"Kasmina cannot load training entry #{entry.id}: {self.kernel.reason}")
        return self.kernel

    def eager(self) -> torch.nn.Module:
        """The timing reference: the blueprint's own module in training mode."""
        if self._eager is None:
            self._eager = self.bp.build().to(self.device).train()
        return self._eager

    def _inputs(self, sizes: Mapping[str, int], regime: Regime | None = None) -> tuple[torch.Tensor, ...]:
        return make_inputs(self.bp, sizes, regime or Regime(), self.device)

    # -- gradient parity ---------------------------------------------------------------------------

    def check_grad_parity(self, sizes: Mapping[str, int], regime: Regime) -> None:
        """One training step, compiled (a fresh seed through Kasmina) against eager autograd on a fresh
        module: the output, the input's and every parameter's gradient, and every buffer, within tolerance."""
        kernel = self._kernel()
        if regime.zeros == "all":
            # An all-zero input puts e.g. a zero-bias BatchNorm's output exactly on ReLU's kink, where the
            # gradient is implementation-defined: compare gradients at differentiable points only.
            regime = replace(regime, zeros="some")
        args = self._inputs(sizes, regime)
        refused = kernel.check(*args)
        if refused is not None:
            pytest.fail(f"training guards refuse a shape inside the declared range {dict(sizes)}: {refused}")
        seed = kernel.bind(self.bp.build().to(self.device))
        reference = self.bp.build().to(self.device).train()
        got_out, got = gradients(seed, args, seed=regime.seed, weights=seed.seed)
        if seed.last_path != COMPILED:
            pytest.fail(f"Kasmina trained {seed.last_path} for accepted inputs {dict(sizes)}")
        exact_out, exact = exact_gradients(reference, args, seed=regime.seed)
        want_out, want = gradients(reference, args, seed=regime.seed)
        tol = self.bp.tolerance
        where = f"{self.bp.name} training at {dict(sizes)}, {regime!r}"
        pairs = [("output", got_out, want_out, exact_out)]
        pairs += [(f"gradient of {n}", got[n], want[n], exact[n]) for n in want]
        got_buffers = dict(seed.seed.named_buffers())
        pairs += [(f"buffer {n}", got_buffers[n], b, None) for n, b in reference.named_buffers()]
        for what, g, w, x in pairs:
            self.parity.add(*max_errors(g, w))
            atol, rtol = tolerance(tol.atol, tol.rtol, w, x) if x is not None else (tol.atol, tol.rtol)
            assert_parity(g, w, atol=atol, rtol=rtol, context=f"{where}, {what}")

    # -- guards ------------------------------------------------------------------------------------

    def refused_cases(self) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
        """Inputs the training guards must refuse: each dynamic dim just outside its range, a wrong dtype,
        a wrong rank, and each fixed dim off by one."""
        entry = self.ready()
        assert entry.guards is not None
        base_sizes = dict(self.bp.representative[0])
        cases: list[tuple[str, tuple[torch.Tensor, ...]]] = []
        for name, (lo, hi) in entry.guards.dim_ranges().items():
            for size, what in ((lo - 1, "below"), (hi + 1, "above")):
                if size >= 1:
                    cases.append((f"{name}={size} ({what} range)", self._inputs({**base_sizes, name: size})))
        base = self._inputs(base_sizes)
        for k, g in enumerate(entry.guards.inputs):
            wrong = torch.float64 if base[k].dtype != torch.float64 else torch.float32
            cases.append((f"{g.name} as {wrong}", (*base[:k], base[k].to(wrong), *base[k + 1 :])))
            cases.append((f"{g.name} with an extra dim", (*base[:k], base[k].unsqueeze(0), *base[k + 1 :])))
            for d, dim in enumerate(g.dims):
                if not dim.dynamic:
                    shape = list(base[k].shape)
                    shape[d] += 1
                    bad = torch.zeros(shape, dtype=base[k].dtype, device=base[k].device)
                    cases.append((f"{g.name} dim {d} = {shape[d]}", (*base[:k], bad, *base[k + 1 :])))
        return cases

    def check_guards(self) -> None:
        """Every refused case is refused by the training guards and trained eagerly, never compiled."""
        kernel = self._kernel()
        for what, args in self.refused_cases():
            if kernel.check(*args) is None:
                pytest.fail(f"training guards accept an input they must refuse: {what}")
            seed = kernel.bind(self.bp.build().to(self.device))
            # Eager may rightly reject these inputs; what matters is the path the call took.
            with contextlib.suppress(Exception):
                seed(*args)
            if seed.last_path != EAGER or seed.calls[COMPILED]:
                pytest.fail(f"{what}: reached the compiled training code")
            self.guards_refused += 1

    # -- latency -----------------------------------------------------------------------------------

    def labels(self) -> dict[str, dict[str, int]]:
        return {Blueprint.shape_label(r): dict(r) for r in self.bp.representative}

    def benchmark(self, bench: Any, path: str, label: str) -> None:
        """Measure one training step (forward and backward), ``"compiled"`` or ``"eager"``, at one shape."""
        entry = self.ready()
        module: torch.nn.Module = self._kernel() if path == COMPILED else self.eager()
        args = [a.requires_grad_(a.is_floating_point()) for a in self._inputs(self.labels()[label])]
        with torch.no_grad():
            flat = [t for t in pytree.tree_leaves(self.eager()(*args)) if isinstance(t, torch.Tensor)]
        grads = upstream(flat)
        fn: Callable[[], Any] = lambda: step(module, args, grads)  # noqa: E731
        bench.group = f"{self.bp.name}[train {label}]"
        bench.extra_info.update(blueprint=self.bp.name, path=f"train/{path}", shape=label, entry=entry.id)
        bench(fn)
        if path == COMPILED and self._kernel().last_path != COMPILED:
            pytest.fail(f"compiled training benchmark ran {self._kernel().last_path}: {self._kernel().reason}")
        stats = getattr(getattr(bench, "stats", None), "stats", None)
        if stats is None or not getattr(stats, "data", None):
            figures = measure(fn).to_dict()  # pytest-benchmark disabled: measure directly
        else:
            data_ms = [t * 1e3 for t in stats.data]
            figures = {"p50_ms": stats.median * 1e3, "p95_ms": percentile(data_ms, 0.95), "n": len(data_ms)}
        self.latency.setdefault(label, {})[path] = figures

    # -- publish -----------------------------------------------------------------------------------

    def ratio(self) -> float:
        """Compiled training step over eager, geometric mean of p50 over the representative shapes."""
        missing = [
            f"{label} ({path})"
            for label in self.labels()
            for path in (COMPILED, EAGER)
            if path not in self.latency.get(label, {})
        ]
        if missing:
            pytest.fail(f"training step latency not measured at {missing}")
        compiled = geomean([self.latency[label][COMPILED]["p50_ms"] for label in self.labels()])
        eager = geomean([self.latency[label][EAGER]["p50_ms"] for label in self.labels()])
        return compiled / eager

    def publish(self) -> Entry:
        """Decide by measurement: certify the artifact if its step beats eager by ``MARGIN`` within the
        budget's ratio cap, else reject it by selection and store a certified eager training route."""
        entry = self.ready()
        failed = {c: o for c, o in self.outcomes.items() if o.outcome == "failed"}
        if failed:
            pytest.fail("not certified; failed: " + "; ".join(f"{c}: {o.message}" for c, o in failed.items()))
        missing = [c for c in CHECKS[:-1] if self.outcomes.get(c, Outcome(c, "not run")).outcome != "passed"]
        if missing:
            pytest.fail(f"not certified: training checks {missing} did not pass in this session")
        ratio = self.ratio()
        _, max_ratio = budgets.limits(self.bp.budget, self.profile)
        if ratio > max_ratio:
            pytest.fail(f"over budget ({self.profile.name}): training step at {ratio:.2f}x eager > {max_ratio:.2f}")
        from esper.tezzeret.training import store_eager_training_route

        assert entry.id is not None
        with Urza(self.urza_path) as urza:
            if ratio <= 1 - MARGIN:
                note = f"compiled training step at {ratio:.2f}x eager"
                self.entry = urza.update(
                    entry.id, status="certified", failure_reason=None, failed_check=None, **self.evidence(ratio, note)
                )
                return self.entry
            note = f"eager: the compiled training step runs at {ratio:.2f}x eager (needs <= {1 - MARGIN:.2f}x)"
            self.entry = urza.update(
                entry.id,
                status="rejected",
                failed_check=SELECTION,
                failure_reason=f"not routed: {note}",
                **self.evidence(ratio, note),
            )
            evidence = self.evidence(ratio, note)
            return store_eager_training_route(
                urza, self.bp, note, device=self.device, status="certified", evidence=evidence
            )

    def evidence(self, ratio: float | None = None, note: str | None = None) -> dict[str, Any]:
        """Parity, performance and meta columns with this session's evidence, merged over the entry's."""
        entry = self.entry
        assert entry is not None
        _, max_ratio = budgets.limits(self.bp.budget, self.profile)
        latency: dict[str, Any] = {}
        for label, row in self.latency.items():
            latency[label] = dict(row)
            if COMPILED in row and EAGER in row:
                latency[label]["ratio"] = row[COMPILED]["p50_ms"] / row[EAGER]["p50_ms"]
        certification: dict[str, Any] = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "budget_profile": self.profile.name,
            "limits": {"max_ratio": max_ratio, "margin": MARGIN},
            "context": machine_context(),
        }
        if ratio is not None:
            certification["decision"] = {"ratio": ratio, "note": note}
        parity = dict(entry.parity)
        if self.parity.cases:
            parity["certify"] = {
                "cases": self.parity.cases,
                "max_abs": self.parity.max_abs,
                "max_rel": self.parity.max_rel,
                "tolerance": {"atol": self.bp.tolerance.atol, "rtol": self.bp.tolerance.rtol},
                "guards_refused": self.guards_refused,
            }
        performance = dict(entry.performance)
        if latency:
            performance["certify"] = latency
        return {"parity": parity, "performance": performance, "meta": {**entry.meta, "certification": certification}}

    def record(self, outcome: Outcome) -> None:
        """Note a training test's outcome (a check with several tests keeps its worst); a failed check rejects
        the artifact at once, with the check's name and message."""
        rank = {"passed": 0, "skipped": 1, "failed": 2}
        previous = self.outcomes.get(outcome.check)
        if previous is None or rank[outcome.outcome] >= rank[previous.outcome]:
            self.outcomes[outcome.check] = outcome
        entry = self.entry
        if outcome.outcome != "failed" or entry is None or entry.kind != "aoti" or self.failed is not None:
            return
        if entry.status == "certified" and outcome.check == "train_publish":
            return
        self.failed = outcome.check
        with Urza(self.urza_path) as urza:
            self.entry = urza.update(
                entry.id,  # type: ignore[arg-type]
                status="rejected",
                failed_check=outcome.check,
                failure_reason=outcome.message[:4000],
                **self.evidence(),
            )
