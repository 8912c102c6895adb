"""Variants, buckets and routing: Kasmina sends each call to the certified entry whose guards accept it;
certification routes eager where no variant beats eager; the report renders from Urza alone."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint, BlueprintError, Dim, Input
from esper.certification.budgets import PROFILES
from esper.certification.results import CheckResult, Outcome
from esper.certification.run import CANDIDATE_CHECKS, Certification
from esper.kasmina import COMPILED, EAGER, Kasmina
from esper.urza import Urza
from tests.support import TINY


def bucketed(buckets: list[tuple[int, int]]) -> Blueprint:
    return Blueprint(
        name="b",
        version=1,
        build=lambda: None,
        inputs=(Input("x", "float32", (Dim("batch", 1, 64), 4)),),
        representative=({"batch": 2}, {"batch": 8}),
        buckets={"batch": buckets},
        variants=("default", "freezing"),  # the two variants these tests model, whatever the default set is
    )


@pytest.mark.parametrize(
    ("buckets", "fragment"),
    [
        ([(1, 4), (4, 64)], "overlap at 4..4"),
        ([(1, 4), (6, 64)], "gap at 5..5"),
        ([(2, 4), (5, 64)], "start at 2"),
        ([(1, 4), (5, 63)], "end at 63"),
        ([(1, 1), (2, 4), (5, 64)], "holds no representative shape"),
    ],
)
def test_buckets_that_overlap_or_leave_a_gap_are_an_error(buckets: list[tuple[int, int]], fragment: str) -> None:
    with pytest.raises(BlueprintError, match="field 'buckets'") as info:
        bucketed(buckets)
    assert fragment in str(info.value)


def test_buckets_make_profiles() -> None:
    assert bucketed([(5, 64), (1, 4)]).profiles() == {"batch=1-4": {"batch": (1, 4)}, "batch=5-64": {"batch": (5, 64)}}


def guards(lo: int, hi: int) -> GuardSchema:
    return GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=lo, max=hi), DimGuard(size=8))),))


@pytest.mark.compiles
def test_routing_picks_the_entry_whose_guards_accept(urza_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Three certified profiles of one blueprint: two compiled (same package, narrower guards), one eager."""
    from esper.artifacts.weights import save_state
    from esper.catalog import load_catalog

    weights = urza_copy.parent / "weights.safetensors"
    save_state(load_catalog([TINY]).get("tiny_mlp").build(), weights, blueprint="tiny_mlp", version=1)
    with Urza(urza_copy) as urza:
        (base,) = urza.entries("tiny_mlp")
        checksum, size = urza.store.add(weights)
        profiles = ["batch=1-4", "batch=5-16", "batch=17-32"]
        meta = {**base.meta, "profiles": profiles, "representative": [{"batch": 4}]}
        urza.update(base.id, status="rejected")  # type: ignore[arg-type]
        small = urza.publish(base.with_(profile=profiles[0], guards=guards(1, 4), meta=meta, status="certified"))
        mid = urza.publish(
            base.with_(
                profile=profiles[1],
                guards=guards(5, 16),
                status="certified",
                meta={**meta, "representative": [{"batch": 8}]},
            )
        )
        big = urza.publish(
            base.with_(
                profile=profiles[2],
                guards=guards(17, 32),
                engine="eager",
                variant="eager",
                status="certified",
                checksum=checksum,
                artifact_size=size,
                meta={
                    **meta,
                    "representative": [{"batch": 20}],
                    "certification": {"decision": {"winner": None, "ratio": 1.3, "note": "compiled loses at 1.3x"}},
                },
            )
        )
    caplog.set_level(logging.INFO, "esper.kasmina")
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    assert [r.entry.id for r in kernel.routes] == [small.id, mid.id, big.id]
    for batch, entry, path in ((3, small, COMPILED), (9, mid, COMPILED), (20, big, EAGER)):
        x = torch.randn(batch, 8)
        route, why = kernel.select((x,))
        assert why is None and route is not None and route.entry.id == entry.id
        with torch.no_grad():
            kernel(x)
        assert kernel.last_path == path
    assert kernel.select((torch.randn(33, 8),))[0] is None
    # The eager profile is a decision with evidence: INFO once, never a WARNING.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # It says why, in certification's own words.
    said = [r.getMessage() for r in caplog.records]
    assert any("certified to run eager" in m and "compiled loses at 1.3x" in m for m in said), said


def test_a_profile_where_no_variant_beats_eager_with_confidence_routes_eager(tmp_path: Path) -> None:
    from esper.artifacts.compat import current
    from esper.certification import timing
    from esper.profiles import is_specialization
    from esper.urza import Entry

    bp = bucketed([(1, 4), (5, 64)])
    cert = Certification(bp, ArtifactKind.INFERENCE, tmp_path / "urza.db", PROFILES["cpu-2core"])
    # (decision, ratio) of each candidate's interleaved comparison with eager at its profile's shape.
    measured = {
        "batch=1-4/default": (timing.LOSES, 1.2),
        "batch=1-4/freezing": (timing.EVEN, 0.97),
        "batch=5-64/default": (timing.WINS, 0.8),
        "batch=5-64/freezing": (timing.WINS, 0.5),
    }
    for cid, c in cert.candidates.items():
        if is_specialization(c.profile):
            continue  # compiled only where export holds a dim: not in this session
        c.entry = Entry(bp.name, 1, "h", current(), "aoti", "compiled", "0" * 64, 1, guards(1, 4), id=1)
        label = "batch=2" if c.profile == "batch=1-4" else "batch=8"
        decision, ratio = measured[cid]
        rounds = tuple(ratio * (1 + 0.01 * (k - 4)) for k in range(9))  # the per-round ratios, as measured
        c.comparisons = {
            label: timing.Comparison(
                decision, ratio, ratio * 0.98, ratio * 1.02, 0.05, 0.96, ratio * 1e-3, 1e-3, ratios=rounds
            )
        }
        for check in CANDIDATE_CHECKS:
            cert.outcomes[(check, cid)] = CheckResult(check, Outcome.PASSED, candidate=cid)
    assert cert.select().passed
    decisions = cert.decisions
    # freezing at 0.97x eager is even with eager, not a win by the 5% margin: eager it is.
    assert decisions["batch=1-4"].winner is None and "even: candidate/eager 0.970" in decisions["batch=1-4"].note
    assert decisions["batch=5-64"].winner == "batch=5-64/freezing"
    assert decisions["batch=5-64"].ratio == pytest.approx(0.5)


def test_routes_that_differ_beyond_their_ranges_are_tried_in_turn() -> None:
    """One generated dispatcher serves routes that differ only in ranges; any other mix tries each route's own
    predicate, in order, with the same answer."""
    from types import SimpleNamespace

    from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
    from esper.kasmina.kernel import Route, route_dispatch

    def route(dtype: str, lo: int, hi: int) -> Route:
        schema = GuardSchema(
            inputs=(InputGuard("x", dtype, (DimGuard(name="batch", min=lo, max=hi), DimGuard(size=8))),)
        )
        return Route.of(SimpleNamespace(guards=schema), None)  # type: ignore[arg-type]

    same = [route("float32", 1, 4), route("float32", 5, 64)]
    mixed = [route("float64", 1, 64), route("float32", 1, 4), route("float32", 5, 64)]
    assert route_dispatch(same).__name__ == "route_of" and route_dispatch(mixed).__name__ == "each"
    for batch, dtype, in_same, in_mixed in (
        (3, torch.float32, 0, 1),
        (9, torch.float32, 1, 2),
        (9, torch.float64, -1, 0),
        (65, torch.float32, -1, -1),
    ):
        args = (torch.zeros(batch, 8, dtype=dtype),)
        assert route_dispatch(same)(args) == in_same
        assert route_dispatch(mixed)(args) == in_mixed
    # Routes sharing one profile's cells (regional, the same guards): either way, the first whose cell is
    # compiled, else the first accepting one's eager code.
    from dataclasses import replace

    from esper.kasmina.regions import lookup
    from esper.urza.evidence import EAGER, RegionCell, RouteTable

    def regional(r: Route, compiled_below: int) -> Route:
        # Two grid sizes whose geometric midpoint is ``compiled_below``: compiled below it, eager from it on.
        cells = (RegionCell({"batch": 1}, COMPILED), RegionCell({"batch": compiled_below**2}, EAGER))
        t = RouteTable(("batch",), ((1, compiled_below**2),), cells)
        return replace(r, package=object(), table=t, compiled_at=lookup(t, r.entry.guards))  # type: ignore[arg-type]

    shared = [route("float64", 1, 64), regional(route("float32", 1, 64), 4), regional(route("float32", 1, 64), 16)]
    assert route_dispatch(shared).__name__ == "each"
    for batch, want in ((2, 1), (9, 2), (20, len(shared) + 1)):
        assert route_dispatch(shared)((torch.zeros(batch, 8),)) == want, batch


def test_an_eager_route_honours_every_hook_of_the_module_it_calls() -> None:
    """A kernel serving eager skips nn.Module.__call__ only where that would only call ``forward``: a hook on
    the eager module, or a process-wide one, still fires, once per call."""
    from types import SimpleNamespace

    from esper.kasmina.kernel import Kernel, Route

    module = torch.nn.Linear(8, 8).eval()
    kernel = Kernel(
        "bp",
        eager_factory=lambda: module,
        routes=[Route.of(SimpleNamespace(guards=guards(1, 64)), None)],  # type: ignore[arg-type]
        reason="certified eager",
    )
    x = torch.randn(4, 8)
    seen: list[str] = []
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), module(x))  # the clean twin: no hook, nothing seen
        assert kernel.last_path == EAGER and seen == []
        handle = kernel.eager_module().register_forward_hook(lambda m, i, o: seen.append("module"))
        kernel(x)
        assert seen == ["module"]
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
        try:
            kernel(torch.randn(100, 8))  # outside the guards too: still eager, still hooked
        finally:
            handle.remove()
        assert seen == ["module", "Linear", "Kernel"]
        assert kernel.calls == {EAGER: 3}
