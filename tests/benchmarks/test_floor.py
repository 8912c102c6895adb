"""The floor's paired measurement: blocks alternate their order, and a difference is taken within a block."""

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.floor import adjacent, measure_blueprint, paired, quiet, smallest_shape


def test_adjacent_blocks_reverse_their_order_so_a_drift_cancels() -> None:
    order: list[str] = []
    clock = itertools.count()

    def path(name: str) -> Callable[[], float]:
        # A machine that slows down steadily: each call takes longer than the one before it, whatever it is.
        def run() -> float:
            order.append(name)
            return float(next(clock))

        return run

    figures = adjacent({"raw": path("raw"), "kernel": path("kernel")}, 4)
    assert order == ["raw", "kernel", "kernel", "raw", "raw", "kernel", "kernel", "raw"]
    # The same two paths: a steady drift gives +1 in one block and -1 in the next, a median of 0. Always in the
    # same order (the defect this catches), the drift would read as a 1-unit overhead.
    assert paired(figures, "kernel", "raw")["median"] == 0.0
    assert figures["raw"]["samples"] == [0.0, 3.0, 4.0, 7.0]


def test_paired_gives_the_median_and_quartiles_of_the_differences() -> None:
    figures = {"a": {"samples": [2.0, 4.0, 6.0, 8.0, 10.0]}, "b": {"samples": [1.0, 1.0, 1.0, 1.0, 1.0]}}
    d = paired(figures, "a", "b")
    assert (d["median"], d["min"], d["max"]) == (5.0, 1.0, 9.0)
    assert d["q1"] < d["median"] < d["q3"]


def test_the_overhead_of_quiet_blocks_is_the_machines_own() -> None:
    """A host that runs everything twice as slow in some blocks (a neighbour on the core): the reference Python
    tells those blocks, and the difference over the quiet ones is the overhead at the machine's own speed, where
    the median over every block reads the neighbour's share into it. Clean twin: a host that is always quiet
    gives the same figure either way."""
    slow = [b % 3 != 0 for b in range(30)]  # two blocks in three slowed
    factor = [2.0 if s else 1.0 for s in slow]
    figures = {
        "raw": {"samples": [10.0 * f for f in factor]},
        "kernel": {"samples": [11.0 * f for f in factor]},
        "reference": {"samples": [0.8 * f * (1 + 0.01 * (b % 5)) for b, f in enumerate(factor)]},
    }
    calm = quiet(figures, "reference")
    assert calm == [not s for s in slow]
    assert paired(figures, "kernel", "raw", keep=calm)["median"] == 1.0
    assert paired(figures, "kernel", "raw")["median"] == 2.0  # every block: the slowed machine's units
    steady = {k: {"samples": [v["samples"][b] for b in range(30) if not slow[b]]} for k, v in figures.items()}
    assert all(quiet(steady, "reference"))
    assert paired(steady, "kernel", "raw", keep=quiet(steady, "reference"))["median"] == 1.0
    assert paired(steady, "kernel", "raw")["median"] == 1.0


def test_the_reference_opens_every_block_so_quiet_blocks_come_from_both_orders() -> None:
    """Plain Python runs slower right after a runner's block than right after its own: a host where the
    reference takes 1.5 units after any other path and 1 after itself. Taking turns at the end and the start of
    the order (the defect), the reference calls only the blocks of one order quiet, and the overhead judged over
    them is that order's position effect (here the kernel reads 1 unit slower than the runner when it follows
    it, 3 otherwise: 2 over both orders, 1 over the forward ones alone). Opening every block, the
    reference is always just after a runner's block, and the quiet blocks are of both orders."""
    last: list[str] = ["raw"]

    def path(name: str) -> Callable[[], float]:
        def run() -> float:
            before = last[0]
            last[0] = name
            if name == "reference":
                return 1.0 if before == "reference" else 1.5
            if name == "kernel":
                return 11.0 if before == "raw" else 13.0
            return 10.0

        return run

    names = ["reference", "raw", "kernel"]
    for first, orders in ((None, {0}), ("reference", {0, 1})):
        last[0] = "raw"
        figures = adjacent({n: path(n) for n in names}, 20, first=first)
        calm = quiet(figures, "reference")
        assert {b % 2 for b, c in enumerate(calm) if c} == orders
        judged = paired(figures, "kernel", "raw", keep=calm)["median"]
        assert judged == (1.0 if first is None else 2.0)


@pytest.mark.compiles
def test_a_shape_whose_cell_runs_eager_is_not_timed_as_the_compiled_floor(urza_copy: Path) -> None:
    """A route accepts the smallest shape but its cell there runs eager by evidence: the kernel serves the
    module, so its time against that route's raw runner is no overhead of ours (it read as a negative one)."""
    from esper.catalog import load_catalog
    from esper.kasmina import Kasmina

    from ..conftest import TINY
    from ..kasmina.test_regions import table, write_table

    bp = load_catalog([TINY]).get("tiny_mlp")
    assert smallest_shape(bp) == {"batch": 4}
    write_table(urza_copy, "tiny_mlp", table({"batch": (1, 4, 16, 32)}, {(1,), (16,)}))
    eager_there = measure_blueprint(Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp"), bp, rounds=1, number=2)
    assert "routes eager by region" in eager_there.get("skipped", ""), eager_there
    # The twin: compiled in that cell, the floor is measured.
    write_table(urza_copy, "tiny_mlp", table({"batch": (1, 4, 16, 32)}, {(4,)}))
    compiled = measure_blueprint(Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp"), bp, rounds=1, number=2)
    assert "skipped" not in compiled and compiled["paths"]["raw"]["us"] > 0, compiled
