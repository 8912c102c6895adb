"""Seeded miscompiles (tests/fixtures/miscompiles/): each defect must be caught by the new checks, which the
old ones missed, and each clean twin must pass.

The defects live behind ``torch.compiler.is_exporting()``: export traces them into the package, eager never
runs them. Compiling every fixture would take minutes, so these tests stand in for the compiled package by
running the module with ``is_exporting`` patched to True; one ``compiles`` test proves that a real
export + AOTInductor package does carry the size-class defect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import seed as sampling_seed
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

from esper.blueprint import Blueprint
from esper.catalog import load_file
from esper.numerics.coverage import Case, edge_sizes, plan
from esper.numerics.gradients import gradients, tolerance
from esper.numerics.inputs import Regime, make_inputs
from esper.numerics.parity import ParityVerdict, float64_copy, judge, to_float64
from tests import support

FIXTURES = support.FIXTURES / "miscompiles"


# The old sampling's draws, fixed by a seed rather than by derandomize (whose stream follows the test function's
# source text, so any edit to it drew other sizes): a seed whose 20 draws miss every defect's class, as the old
# CI profile's did.
OLD_SAMPLING_SEED = 0


def old_rule(got: Any, want: Any, *, atol: float, rtol: float) -> None:
    """The rule these defects slipped through: ``assert_close`` against eager alone, at a fixed tolerance."""
    got_l, want_l = ([t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)] for x in (got, want))
    if len(got_l) != len(want_l):
        raise AssertionError(f"compiled returned {len(got_l)} tensors, eager {len(want_l)}")
    for g, w in zip(got_l, want_l, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=True)


def blueprint(name: str) -> Blueprint:
    for path in FIXTURES.glob("*.py"):
        for bp in load_file(path):
            if bp.name == name:
                return bp
    raise KeyError(name)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Thousands of tiny eager calls: one intra-op thread is faster than waking two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def as_compiled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run forward as the exported (compiled) program would: ``torch.compiler.is_exporting()`` is True."""
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_exporting", lambda: True)
        yield


class Subject:
    """A fixture blueprint's module, its float64 copy, and its outputs compiled-as-exported and eager."""

    def __init__(self, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bp = blueprint(name)
        self.module = self.bp.build()
        self.double = float64_copy(self.module)
        self.monkeypatch = monkeypatch
        self.old_sizes: list[dict[str, int]] = []  # what the old check tried

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        return {n: (d.min, d.max) for n, d in self.bp.dims.items()}

    @torch.no_grad()
    def outputs(self, args: tuple[torch.Tensor, ...]) -> tuple[Any, Any]:
        with as_compiled(self.monkeypatch):
            compiled = self.module(*args)
        return compiled, self.module(*args)

    def judge(self, args: tuple[torch.Tensor, ...]) -> ParityVerdict:
        compiled, eager = self.outputs(args)
        with torch.no_grad():
            exact = self.double(*to_float64(args))
        tol = self.bp.tolerance
        return judge(compiled, eager, exact, atol=tol.atol, rtol=tol.rtol)

    def new_check(self) -> list[tuple[Case, ParityVerdict]]:
        """The new parity check: every case of :func:`esper.numerics.coverage.plan`; returns the failures."""
        failures = []
        for case in plan(self.ranges, self.bp.representative):
            v = self.judge(make_inputs(self.bp, case.sizes, case.values))
            if not v.passed:
                failures.append((case, v))
        return failures

    def old_check(self) -> list[tuple[dict[str, int], Regime]]:
        """The old parity check as the CI profile ran it: 20 hypothesis draws (seeded) of sizes and
        regimes plus every edge shape under the three edge regimes, ``assert_close`` at the declared
        tolerance. Returns the failing cases (collected, not raised, so hypothesis does not shrink)."""
        failures: list[tuple[dict[str, int], Regime]] = []
        ranges = self.ranges
        regimes = st.builds(
            Regime,
            scale=st.sampled_from([1.0, 1e-3, 1e3]),
            zeros=st.sampled_from(["none", "some", "all"]),
            seed=st.integers(0, 2**31 - 1),
        )

        @sampling_seed(OLD_SAMPLING_SEED)
        @given(sizes=st.fixed_dictionaries({n: st.integers(lo, hi) for n, (lo, hi) in ranges.items()}), regime=regimes)
        @settings(
            max_examples=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        def case(sizes: dict[str, int], regime: Regime) -> None:
            compiled, eager = self.outputs(make_inputs(self.bp, sizes, regime))
            tol = self.bp.tolerance
            self.old_sizes.append(sizes)
            try:
                old_rule(compiled, eager, atol=tol.atol, rtol=tol.rtol)
            except AssertionError:
                failures.append((sizes, regime))

        edge_regimes = (Regime(), Regime(scale=1e3, zeros="some", seed=1), Regime(zeros="all", seed=2))
        for edge in reversed(edge_sizes(ranges)):
            for regime in reversed(edge_regimes):
                case = example(sizes=edge, regime=regime)(case)
        case()
        return failures

    def step(self, args: tuple[torch.Tensor, ...]) -> tuple[Any, dict[str, torch.Tensor], Any, dict[str, Any]]:
        """One training step compiled-as-traced and eager: (output, gradients) of each."""
        with as_compiled(self.monkeypatch):
            out_c, grads_c = gradients(self.module, args, seed=0)
        out_e, grads_e = gradients(self.module, args, seed=0)
        return out_c, grads_c, out_e, grads_e

    def new_grad_check(self) -> list[tuple[Case, str]]:
        """Gradient parity with the new rules over every case of :func:`esper.numerics.coverage.plan`: the output
        and every gradient judged against the float64 step. Returns the failures with their reasons."""
        failures = []
        tol = self.bp.tolerance
        for case in plan(self.ranges, self.bp.representative):
            args = make_inputs(self.bp, case.sizes, case.values)
            out_c, grads_c, out_e, grads_e = self.step(args)
            out_x, grads_x = gradients(self.double, to_float64(args), seed=0)  # exact_gradients, one copy
            for v in (
                judge(out_c.detach(), out_e.detach(), out_x.detach(), atol=tol.atol, rtol=tol.rtol),
                judge(grads_c, grads_e, grads_x, atol=tol.atol, rtol=tol.rtol, label="gradient"),
            ):
                if not v.passed:
                    failures.append((case, v.reason))
        return failures

    def old_grad_check(self, sizes: list[dict[str, int]]) -> list[dict[str, int]]:
        """The old gradient parity at ``sizes``: ``assert_close`` at the declared tolerance widened by
        eager's own float64 error (:func:`esper.numerics.gradients.tolerance`). Returns the failing sizes."""
        failures = []
        tol = self.bp.tolerance
        for size in sizes:
            args = make_inputs(self.bp, size, Regime())
            _, grads_c, _, grads_e = self.step(args)
            _, grads_x = gradients(self.double, to_float64(args), seed=0)
            atol, rtol = tolerance(tol.atol, tol.rtol, grads_e, grads_x)
            try:
                old_rule(grads_c, grads_e, atol=atol, rtol=rtol)
            except AssertionError:
                failures.append(size)
        return failures


def test_size_class_defect_missed_by_old_sampling_caught_by_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Subject("miscompile_size_class", monkeypatch)
    in_class = {11, 27, 43, 59}  # batch % 16 == 11
    assert not any(e["batch"] in in_class for e in edge_sizes(s.ranges))  # no edge is in the class
    assert s.old_check() == [], "the old sampling now draws a size of the class: pick a rarer one"
    failures = s.new_check()
    assert {c.sizes["batch"] for c, _ in failures} == in_class
    assert all(v.reason.startswith("output: ") for _, v in failures)


def test_value_class_defect_missed_by_old_regimes_caught_by_mixed_magnitudes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = Subject("miscompile_value_class", monkeypatch)
    assert s.old_check() == []
    failures = s.new_check()
    assert failures
    # Mixed magnitudes, and the non-finite regime's inf beside a small value, are what the defect keys on.
    caught = {c.values.regime for c, _ in failures}
    assert "mixed" in caught and caught <= {"mixed", "nonfinite"}


def test_precision_defect_inside_the_tolerance_rejected_against_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Subject("miscompile_precision", monkeypatch)
    assert s.old_check() == []  # assert_close at the declared tolerance accepts every case
    failures = s.new_check()
    # Every case with finite inputs is rejected (with NaN and inf among them, a case whose every output row is
    # non-finite leaves no finite value to judge)...
    finite = [c for c in plan(s.ranges, s.bp.representative) if c.values.regime != "nonfinite"]
    assert len([c for c, _ in failures if c.values.regime != "nonfinite"]) == len(finite)
    assert all("RMSE against float64" in v.reason and v.ratio > 100 for _, v in failures)  # ...by the RMSE rule


@pytest.mark.parametrize(
    "name", ["miscompile_size_class_clean", "miscompile_value_class_clean", "miscompile_precision_clean"]
)
def test_clean_twins_pass_old_and_new_checks(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Subject(name, monkeypatch)
    assert s.old_check() == []
    assert s.new_check() == []


@pytest.mark.compiles
# Importing Inductor runs torch/utils/mkldnn.py, which uses torch's own deprecated torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_real_package_carries_the_size_class_defect(tmp_path: Path) -> None:
    """One real export + AOTInductor compile: the package is wrong exactly where the simulation says."""
    from esper.artifacts.runtime import CompiledPackage
    from esper.tezzeret.export import export_blueprint

    bp = blueprint("miscompile_size_class")
    module = bp.build()
    ep = export_blueprint(bp, module)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "size_class.pt2"))
    package = CompiledPackage(path)
    double = float64_copy(module)
    for batch, wrong in ((11, True), (12, False), (59, True), (61, False)):
        x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            eager, exact = module(x), double(x.double())
        v = judge(package([x]), eager, exact, atol=1e-5, rtol=1e-5)
        assert v.passed is not wrong, (batch, v.reason)


def test_gradient_only_defect_caught_by_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrong only in the input gradient, only at batch % 16 == 11: the old sizes (edges plus the CI draws)
    miss it; every size catches it, in the input gradient and nowhere else."""
    s = Subject("miscompile_grad_size_class", monkeypatch)
    s.old_check()  # the forward is right: records the sizes the old sampling tries
    old_sizes = [dict(t) for t in {tuple(z.items()) for z in s.old_sizes}]
    assert s.old_grad_check(old_sizes) == []
    failures = s.new_grad_check()
    assert {c.sizes["batch"] for c, _ in failures} == {11, 27, 43, 59}
    assert {r.split(":")[0] for _, r in failures} == {"gradient['input 0']"}


def test_gradient_clean_twin_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Subject("miscompile_grad_size_class_clean", monkeypatch).new_grad_check() == []


@pytest.mark.parametrize(
    ("name", "carried"), [("miscompile_grad_size_class", True), ("miscompile_grad_size_class_clean", False)]
)
def test_the_training_tracer_carries_the_gradient_defect(name: str, carried: bool) -> None:
    """Tezzeret's joint tracing (symbolic batch, no ``is_exporting``) puts the size-class branch into the
    backward graph and leaves the forward clean: the defect reaches a real training artifact."""
    from esper.tezzeret.joint import trace_joint

    graphs = trace_joint(blueprint(name).build().train(), [torch.randn(4, 8)], [[0]])

    def mentions_residue(gm: torch.fx.GraphModule) -> bool:
        return any(n.target == torch.ops.aten.eq.Scalar and n.args[1] == 11 for n in gm.graph.nodes)

    assert mentions_residue(graphs.backward) is carried
    assert not mentions_residue(graphs.forward)


def buffer_failures(s: Subject, cases: list[tuple[dict[str, int], Any]]) -> list[tuple[dict[str, int], str]]:
    """The running-statistics update of one training step, compiled-as-traced against eager: judged against
    the float64 step's (new rule) for each ``(sizes, value case)``; returns the failures with their reasons."""
    import copy

    from esper.numerics.gradients import exact_step, floating_buffers

    tol = s.bp.tolerance
    failures = []
    for sizes, values in cases:
        args = make_inputs(s.bp, sizes, values)
        compiled, eager = copy.deepcopy(s.module).train(), copy.deepcopy(s.module).train()
        with as_compiled(s.monkeypatch):
            gradients(compiled, args, seed=0)
        gradients(eager, args, seed=0)
        _, _, exact = exact_step(copy.deepcopy(s.module).train(), args, seed=0)
        v = judge(
            floating_buffers(compiled), floating_buffers(eager), exact, atol=tol.atol, rtol=tol.rtol, label="buffer"
        )
        if not v.passed:
            failures.append((sizes, v.reason))
    return failures


def test_buffer_only_defect_caught_by_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrong only in the running-mean update, only at batch % 16 == 11: the old sizes miss it, every size
    catches it, in the buffer and nowhere else (the forward is right)."""
    from esper.numerics.coverage import ValueCase

    s = Subject("miscompile_buffer_size_class", monkeypatch)
    s.old_check()  # eval-mode forward: right everywhere; records the sizes the old sampling tries
    old_sizes = [dict(t) for t in {tuple(z.items()) for z in s.old_sizes}]
    assert buffer_failures(s, [(z, ValueCase("unit", 0)) for z in old_sizes]) == []
    failures = buffer_failures(s, [(dict(c.sizes), c.values) for c in plan(s.ranges, s.bp.representative)])
    assert {z["batch"] for z, _ in failures} == {11, 27, 43, 59}
    assert {r.split(":")[0] for _, r in failures} == {"buffer['running_mean']"}
    clean = Subject("miscompile_buffer_size_class_clean", monkeypatch)
    assert (
        buffer_failures(clean, [(dict(c.sizes), c.values) for c in plan(clean.ranges, clean.bp.representative)]) == []
    )
