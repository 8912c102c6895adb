"""The floor's paired measurement: blocks alternate their order, and a difference is taken within a block."""

import itertools
from collections.abc import Callable

from benchmarks.floor import adjacent, paired


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
