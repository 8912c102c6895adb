"""Kasmina serves a certified entry's compiled code only in the cells of its route table that certification
measured compiled faster in, and eager elsewhere by evidence (no WARNING); a row without a table serves
compiled wherever its guards accept, as before tables existed."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.catalog import load_catalog
from esper.kasmina import COMPILED, EAGER, Kasmina
from esper.kasmina.regions import lookup
from esper.urza import Urza
from esper.urza.evidence import ROUTE_TABLE, RegionCell, RouteTable

from ..conftest import CATALOG, TINY, TRAINING


def table(dims: dict[str, tuple[int, ...]], compiled: set[tuple[int, ...]]) -> RouteTable:
    """A route table over the product of ``dims``' grid sizes, compiled exactly at the points in ``compiled``."""
    names = tuple(dims)
    points = [()]  # type: list[tuple[int, ...]]
    for values in dims.values():
        points = [(*p, v) for p in points for v in values]
    cells = tuple(
        RegionCell(
            dict(zip(names, p, strict=True)), COMPILED if p in compiled else EAGER, "wins" if p in compiled else "loses"
        )
        for p in points
    )
    return RouteTable(names, tuple(dims.values()), cells, 0.05)


def nearest(values: tuple[int, ...], size: int) -> int:
    """The oracle: the grid size nearest in log space (a tie goes to the larger, as the cut is inclusive)."""
    return min(values, key=lambda v: (abs(math.log(size / v)), -v))


def test_the_generated_lookup_agrees_with_the_table_at_every_size() -> None:
    batch, seq = (1, 3, 9, 32), (2, 16, 128)
    t = table({"batch": batch, "seq": seq}, {(1, 2), (3, 16), (9, 128), (32, 2)})
    # Two inputs sharing the dims: the lookup reads each dim where the guards first see it.
    schema = GuardSchema(
        inputs=(
            InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=32), DimGuard(size=4))),
            InputGuard("m", "float32", (DimGuard(name="batch", min=1, max=32), DimGuard(name="seq", min=2, max=128))),
        )
    )
    compiled_at = lookup(t, schema)
    assert compiled_at is not None
    for b in range(1, 33):
        for s in range(2, 129, 3):
            args = (torch.empty(b, 4), torch.empty(b, s))
            want = (nearest(batch, b), nearest(seq, s)) in {(1, 2), (3, 16), (9, 128), (32, 2)}
            assert compiled_at(args) is want, (b, s)
            assert (t.cell_of({"batch": b, "seq": s}).path == COMPILED) is want
    # A table naming a dim the guards do not have is not used.
    assert lookup(table({"width": (1, 4)}, set()), schema) is None


def write_table(urza_path: Path, name: str, t: RouteTable | None) -> None:
    with Urza(urza_path) as urza:
        entry = next(e for e in urza.entries(name) if e.engine == "aoti")
        meta = {k: v for k, v in entry.meta.items() if k != ROUTE_TABLE}
        urza.update(entry.id, meta={**meta, ROUTE_TABLE: t.to_json()} if t is not None else meta)  # type: ignore[arg-type]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


# tiny_mlp: batch 1..32, width 8. Compiled at batch 1 and 4, eager at 16 and 32 (cuts at 2, 8 and 23).
TINY_TABLE = table({"batch": (1, 4, 16, 32)}, {(1,), (4,)})


@pytest.mark.compiles
def test_a_route_table_sends_its_eager_cells_to_eager_without_a_warning(
    urza_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_table(urza_copy, "tiny_mlp", TINY_TABLE)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    eager = load_catalog([TINY]).get("tiny_mlp").build().eval()
    (route,) = kernel.routes
    assert route.regional and route.table == TINY_TABLE
    assert "regional: compiled in 2 of 4 cells" in repr(kernel)
    caplog.set_level(logging.INFO, "esper.kasmina")
    with torch.no_grad():
        for batch, path in [(1, COMPILED), (4, COMPILED), (7, COMPILED), (8, EAGER), (16, EAGER), (32, EAGER)]:
            x = torch.randn(batch, 8)
            out = kernel(x)
            assert kernel.last_path == path, batch
            torch.testing.assert_close(out, eager(x), atol=1e-5, rtol=1e-5)
        assert warnings_of(caplog) == []
        # A seed bound to the kernel follows the same table.
        seed = kernel.bind(load_catalog([TINY]).get("tiny_mlp").build().eval())
        seed(torch.randn(2, 8))
        assert seed.last_path == COMPILED
        seed(torch.randn(20, 8))
        assert seed.last_path == EAGER
        assert any(r.regional for r in seed.routes)
    assert warnings_of(caplog) == []
    # Certification measures the compiled code itself, wherever the table sends a call.
    kernel.ignore_route_tables()
    with torch.no_grad():
        kernel(torch.randn(16, 8))
    assert kernel.last_path == COMPILED and "regional" not in repr(kernel)


@pytest.mark.compiles
def test_a_row_without_a_table_serves_compiled_everywhere_its_guards_accept(urza_copy: Path) -> None:
    write_table(urza_copy, "tiny_mlp", None)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    (route,) = kernel.routes
    assert not route.regional and "regional" not in repr(kernel)
    with torch.no_grad():
        for batch in (1, 4, 16, 32):
            kernel(torch.randn(batch, 8))
            assert kernel.last_path == COMPILED, batch


@pytest.mark.compiles
def test_a_training_route_table_trains_eager_in_its_eager_cells(
    training_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # tiny_bn trains over batch 2..32: compiled at 2 and 4, eager from 6 on (cut at 6).
    write_table(training_copy, "tiny_bn", table({"batch": (2, 4, 9, 32)}, {(2,), (4,)}))
    kasmina = Kasmina(training_copy, blueprint_paths=[TRAINING, CATALOG])
    kernel = kasmina.load_training("tiny_bn")
    assert kernel.regional and "regional: compiled in 2 of 4 cells" in repr(kernel)
    caplog.set_level(logging.INFO, "esper.kasmina")
    kernel(torch.randn(4, 8)).sum().backward()
    assert kernel.last_path == COMPILED
    kernel(torch.randn(16, 8)).sum().backward()
    assert kernel.last_path == EAGER
    assert warnings_of(caplog) == []
    write_table(training_copy, "tiny_bn", None)  # the twin: no table, compiled at 16 too
    plain = kasmina.load_training("tiny_bn")
    plain(torch.randn(16, 8)).sum().backward()
    assert plain.last_path == COMPILED and not plain.regional


def share_tiny(urza_path: Path, first_cells: set[tuple[int, ...]], second_cells: set[tuple[int, ...]]) -> list[int]:
    """tiny_mlp's certified entry and a copy of it (a second candidate of the same profile, the same code)
    sharing the profile's cells over TINY_TABLE's grid: each compiled in its own cells, each with the cells it won
    on its own (its cells and batch 4) and the group's ids. Returns the ids, in the group's order."""
    from esper.urza.evidence import OWN_ROUTE_TABLE, ROUTE_GROUP

    grid = {"batch": (1, 4, 16, 32)}
    with Urza(urza_path) as urza:
        first = next(e for e in urza.entries("tiny_mlp") if e.engine == "aoti" and e.status == "certified")
        second = urza.publish(first.with_(id=None, variant="freezing"))
        ids = [first.id, second.id]
        for entry, cells in ((first, first_cells), (second, second_cells)):
            assert entry.id is not None
            meta = {
                **entry.meta,
                ROUTE_TABLE: table(grid, cells).to_json(),
                OWN_ROUTE_TABLE: table(grid, cells | {(4,)}).to_json(),
                ROUTE_GROUP: ids,
            }
            urza.update(entry.id, meta=meta)
    return ids  # type: ignore[return-value]


class Counted:
    """A route's package, counting the calls it serves."""

    def __init__(self, package: object, served: list[int], entry_id: int):
        self.package, self.served, self.entry_id = package, served, entry_id

    def __call__(self, args: object) -> object:
        self.served.append(self.entry_id)
        return self.package(args)  # type: ignore[operator]


@pytest.mark.compiles
def test_entries_that_share_a_profiles_cells_each_serve_their_own_and_seeds_route_by_their_own_wins(
    urza_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = share_tiny(urza_copy, {(1,)}, {(4,), (16,)})  # cuts at 2, 8 and 23: batch 1 | 2..7, 8..22 | 23..32 eager
    kasmina = Kasmina(urza_copy, blueprint_paths=[TINY])
    kernel = kasmina.load("tiny_mlp")
    # The entry with more cells is tried first: a call into its cells looks one table up.
    assert [r.entry.id for r in kernel.routes] == ids[::-1] and all(r.regional for r in kernel.routes)
    kernel.resolve_all()
    served: list[int] = []
    kernel.routes = [r.with_package(Counted(r.package, served, r.entry.id)) for r in kernel.routes]
    eager = load_catalog([TINY]).get("tiny_mlp").build().eval()
    caplog.set_level(logging.INFO, "esper.kasmina")
    want = {1: ids[0], 2: ids[1], 7: ids[1], 8: ids[1], 22: ids[1], 23: None, 32: None}
    with torch.no_grad():
        for batch, owner in want.items():
            served.clear()
            x = torch.randn(batch, 8)
            torch.testing.assert_close(kernel(x), eager(x), atol=1e-5, rtol=1e-5)
            assert kernel.last_path == (EAGER if owner is None else COMPILED), batch
            assert served == ([] if owner is None else [owner]), batch
            assert kernel.select((x,))[0].entry.id == (owner or ids[1])  # type: ignore[union-attr]
    # The path every call that is not plain takes (a forward hook: nn.Module's own call) agrees.
    kernel.register_forward_hook(lambda *_: None)
    with torch.no_grad():
        for batch, owner in want.items():
            served.clear()
            kernel(torch.randn(batch, 8))
            assert served == ([] if owner is None else [owner]), batch
    assert warnings_of(caplog) == []
    # Seeds route by the cells each won on its own (both won batch 4: the first in the group's order takes it).
    seeds = kasmina.load_seeds("tiny_mlp")
    assert [r.entry.id for r in seeds.routes] == ids
    assert [seeds.select((torch.randn(b, 8),))[0].entry.id for b in (1, 4, 16)] == [ids[0], ids[0], ids[1]]  # type: ignore[union-attr]
    # A member that folds the weights into its code serves no seed: its own cells run eager for seeds.
    with Urza(urza_copy) as urza:
        urza.update(ids[1], meta={**urza.get(ids[1]).meta, "swappable": False})
    seeds = kasmina.load_seeds("tiny_mlp")
    assert [r.entry.id for r in seeds.routes] == [ids[0]]
    with torch.no_grad():
        seeds(torch.randn(16, 8))
    assert seeds.last_path == EAGER
    # A member no longer certified is left out: the cells routed to it run eager, not on the other member.
    with Urza(urza_copy) as urza:
        urza.update(ids[1], status="rejected")
    alone = kasmina.load("tiny_mlp")
    assert [r.entry.id for r in alone.routes] == [ids[0]]
    with torch.no_grad():
        alone(torch.randn(4, 8))
    assert alone.last_path == EAGER
