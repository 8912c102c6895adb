"""The guard schema: JSON round trip, version refusal, and a check that accepts exactly what it allows."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard, SchemaVersionError, compile_check

SCHEMA = GuardSchema(
    inputs=(
        InputGuard(
            "x", "float32", (DimGuard(name="batch", min=1, max=8), DimGuard(name="seq", min=2, max=6), DimGuard(size=4))
        ),
        InputGuard("mask", "bool", (DimGuard(name="batch", min=1, max=8), DimGuard(name="seq", min=2, max=6))),
    )
)
CHECK = compile_check(SCHEMA)


def allowed(x_shape: tuple[int, ...], m_shape: tuple[int, ...]) -> bool:
    """The schema's meaning, written independently of compile_check."""
    return (
        len(x_shape) == 3
        and len(m_shape) == 2
        and 1 <= x_shape[0] <= 8
        and 2 <= x_shape[1] <= 6
        and x_shape[2] == 4
        and m_shape == x_shape[:2]
    )


def test_json_round_trip() -> None:
    assert GuardSchema.from_json(SCHEMA.to_json()) == SCHEMA


def test_newer_version_is_refused() -> None:
    data = SCHEMA.to_dict() | {"version": 99}
    with pytest.raises(SchemaVersionError, match="version 99 is newer"):
        GuardSchema.from_dict(data)


def test_describe() -> None:
    assert SCHEMA.describe() == "x: float32[batch(1..8), seq(2..6), 4]; mask: bool[batch(1..8), seq(2..6)] on cpu"


@given(
    x_shape=st.lists(st.integers(0, 10), min_size=1, max_size=4).map(tuple),
    m_shape=st.lists(st.integers(0, 10), min_size=1, max_size=3).map(tuple),
)
def test_check_accepts_exactly_the_allowed_shapes(x_shape: tuple[int, ...], m_shape: tuple[int, ...]) -> None:
    x = torch.empty(x_shape)
    m = torch.empty(m_shape, dtype=torch.bool)
    assert (CHECK((x, m)) is None) == allowed(x_shape, m_shape)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((torch.empty(2, 3, 4),), "expected 2 inputs, got 1"),
        ((torch.empty(2, 3, 4, dtype=torch.float64), torch.empty(2, 3, dtype=torch.bool)), "dtype torch.float64"),
        ((torch.empty(2, 3, 5), torch.empty(2, 3, dtype=torch.bool)), "dim 2 is 5, guard requires 4"),
        ((torch.empty(9, 3, 4), torch.empty(9, 3, dtype=torch.bool)), "outside guard range [1, 8]"),
        ((torch.empty(2, 3, 4), torch.empty(2, 4, dtype=torch.bool)), "seq is 3 elsewhere"),
        ((torch.empty(2, 3, 4), [[True]]), "is a list, not a Tensor"),
        ((torch.empty(2, 3, 4, device="meta"), torch.empty(2, 3, dtype=torch.bool)), "guard requires cpu"),
    ],
)
def test_refusals_say_why(args: tuple[object, ...], fragment: str) -> None:
    why = CHECK(args)
    assert why is not None and fragment in why


def bucket(lo: int, hi: int, dtype: str = "float32", width: int = 4) -> GuardSchema:
    """SCHEMA with ``batch`` in ``[lo, hi]`` (a shape profile's narrower range)."""
    return GuardSchema(
        inputs=(
            InputGuard(
                "x",
                dtype,
                (DimGuard(name="batch", min=lo, max=hi), DimGuard(name="seq", min=2, max=6), DimGuard(size=width)),
            ),
            InputGuard("mask", "bool", (DimGuard(name="batch", min=lo, max=hi), DimGuard(name="seq", min=2, max=6))),
        )
    )


BUCKETS = [bucket(1, 2), bucket(3, 5), bucket(6, 8)]


@given(
    x_shape=st.lists(st.integers(0, 10), min_size=2, max_size=4).map(tuple),
    m_shape=st.lists(st.integers(0, 10), min_size=1, max_size=3).map(tuple),
)
def test_the_dispatcher_picks_the_bucket_each_predicate_would(
    x_shape: tuple[int, ...], m_shape: tuple[int, ...]
) -> None:
    from esper.artifacts.guards import compile_dispatch, compile_predicate

    route_of = compile_dispatch(BUCKETS)
    assert route_of is not None
    args = (torch.zeros(x_shape), torch.zeros(m_shape, dtype=torch.bool))
    expected = next((i for i, s in enumerate(BUCKETS) if compile_predicate(s)(args)), -1)
    assert route_of(args) == expected
    if allowed(x_shape, m_shape):  # inside the union of the buckets: the bucket whose range holds the batch
        assert route_of(args) == next(
            i for i, (lo, hi) in enumerate([(1, 2), (3, 5), (6, 8)]) if lo <= x_shape[0] <= hi
        )


def test_the_dispatcher_checks_every_shared_property_once() -> None:
    from esper.artifacts.guards import compile_dispatch

    route_of = compile_dispatch(BUCKETS)
    assert route_of is not None
    good = (torch.zeros(4, 3, 4), torch.zeros(4, 3, dtype=torch.bool))
    assert route_of(good) == 1
    assert route_of((good[0].double(), good[1])) == -1  # dtype
    assert route_of((torch.zeros(4, 3, 5), good[1])) == -1  # a fixed size
    assert route_of((good[0], torch.zeros(5, 3, dtype=torch.bool))) == -1  # a shared dim that disagrees
    assert route_of((good[0].to_sparse(), good[1])) == -1  # layout
    assert route_of((good[0],)) == -1  # count
    assert route_of((torch.zeros(9, 3, 4), torch.zeros(9, 3, dtype=torch.bool))) == -1  # beyond every bucket


def test_schemas_that_differ_beyond_their_ranges_get_no_dispatcher() -> None:
    from esper.artifacts.guards import compile_dispatch, same_but_ranges

    assert same_but_ranges(BUCKETS[0], BUCKETS[2])
    for other in (bucket(3, 5, dtype="float64"), bucket(3, 5, width=8), SCHEMA.__class__(inputs=SCHEMA.inputs[:1])):
        assert not same_but_ranges(BUCKETS[0], other)
        assert compile_dispatch([BUCKETS[0], other]) is None
    assert compile_dispatch([]) is None


def test_a_forged_range_in_any_bucket_never_reaches_exec() -> None:
    from esper.artifacts.guards import compile_dispatch
    from esper.artifacts.validate import EntryFormatError

    forged = bucket(3, 5)
    object.__setattr__(forged.inputs[0].dims[0], "max", "__import__('os').getpid()")
    with pytest.raises(EntryFormatError, match="predicate generator refused"):
        compile_dispatch([BUCKETS[0], forged])


def wide(hi: int, lo: int = 1) -> GuardSchema:
    """One input, batch ``lo..hi`` by seq 2..6 by 4 (``hi`` past DIRECT_SIZES makes the dispatcher bisect)."""
    return GuardSchema(
        inputs=(
            InputGuard(
                "x",
                "float32",
                (DimGuard(name="batch", min=lo, max=hi), DimGuard(name="seq", min=2, max=6), DimGuard(size=4)),
            ),
        )
    )


def in_cell(cuts: tuple[tuple[int, ...], ...], compiled: tuple[bool, ...], sizes: tuple[int, ...]) -> bool:
    """The oracle: count the cuts at or below each size, then index the cells row-major (last dim fastest)."""
    index = 0
    for dim_cuts, size in zip(cuts, sizes, strict=True):
        index = index * (len(dim_cuts) + 1) + sum(1 for c in dim_cuts if c <= size)
    return compiled[index]


@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
@pytest.mark.parametrize("hi", [8, 40_000])
def test_the_dispatcher_places_each_accepted_call_in_its_region(hi: int, fast: bool) -> None:
    """A regional schema answers its index inside its compiled cells and ``len(schemas) + index`` outside them;
    a schema without regions answers its index; refusals stay ``-1``. Both the tuple-indexed and the bisecting
    lookups agree with the oracle at every size, and so does the fast way in (plus ``2 * len(schemas)`` in a
    compiled cell: these inputs are plain)."""
    from esper.artifacts.guards import Regions, compile_dispatch

    one = Regions(("batch",), ((3, 6),), (True, False, True))
    two = Regions(("batch", "seq"), ((4,), (3, 5)), (False, True, False, True, False, True))
    for regions in ([one], [two], [None, two]):
        schemas = [wide(hi)] if len(regions) == 1 else [wide(2), wide(hi, lo=3)]
        route_of = compile_dispatch(schemas, regions=regions, fast=fast)
        assert route_of is not None
        region = regions[-1]
        assert region is not None
        index = len(schemas) - 1
        verified = 2 * len(schemas) if fast else 0
        for batch in [*range(1, 9), hi - 1, hi]:
            for seq in range(2, 7):
                got = route_of((torch.zeros(batch, seq, 4),))
                if len(schemas) == 2 and batch <= 2:
                    assert got == verified  # the first schema, without regions, takes it whole
                    continue
                sizes = (batch,) if len(region.dims) == 1 else (batch, seq)
                want = index + verified if in_cell(region.cuts, region.compiled, sizes) else len(schemas) + index
                assert got == want, (regions, batch, seq)
        assert route_of((torch.zeros(hi + 1, 3, 4),)) == -1
        assert route_of((torch.zeros(3, 3, 5),)) == -1


@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
def test_schemas_that_share_a_profile_answer_the_one_whose_cell_is_compiled(fast: bool) -> None:
    """Routes of one profile that share its cells have the same guards: a call goes to the first schema whose
    cell is compiled; where every accepting schema's cell is eager, to the first of them plus ``len(schemas)``.
    A schema without regions after them takes what their eager cells leave. The old rule (the first accepting
    schema decides, eager cell or not) fails this oracle at every cell the second schema serves."""
    from esper.artifacts.guards import Regions, compile_dispatch

    first = Regions(("batch", "seq"), ((4,), (3, 5)), (True, False, False, False, False, True))
    second = Regions(("batch",), ((3, 6),), (False, True, False))
    cases = {"two": [first, second], "two and a plain one": [first, second, None]}
    for name, regions in cases.items():
        schemas = [wide(8)] * len(regions)
        route_of = compile_dispatch(schemas, regions=regions, fast=fast)
        assert route_of is not None
        count = len(schemas)
        for contiguous in (True, False):
            verified = 2 * count if fast and contiguous else 0
            for batch in range(1, 9):
                for seq in range(2, 7):
                    x = torch.zeros(batch, seq, 4) if contiguous else torch.zeros(batch, 4, seq).transpose(1, 2)
                    at = [
                        in_cell(region.cuts, region.compiled, (batch, seq) if len(region.dims) == 2 else (batch,))
                        if region is not None
                        else True
                        for region in regions
                    ]
                    want = next((i + verified for i, ok in enumerate(at) if ok), count)
                    assert route_of((x,)) == want, (name, contiguous, batch, seq)
        assert route_of((torch.zeros(9, 3, 4),)) == -1


def test_compiled_cells_check_everything_compiled_code_needs_and_eager_cells_only_the_sizes() -> None:
    """In a compiled cell a float64, a negative-bit view, a functorch-wrapped or a meta tensor is refused (the
    compiled code would compute something else); in an eager cell it is eager by evidence (eager runs it as
    eager would, so the tests compiled code needs are not paid for). A nested tensor is refused everywhere,
    before its shape is read."""
    from torch.func import vmap

    from esper.artifacts.guards import Regions, compile_dispatch

    route_of = compile_dispatch([wide(8)], regions=[Regions(("batch",), ((3,),), (True, False))])
    assert route_of is not None
    compiled, eager = torch.zeros(2, 3, 4), torch.zeros(5, 3, 4)  # batch 2: compiled cell; batch 5: eager cell
    assert route_of((compiled,)) == 0 and route_of((eager,)) == 1  # the clean twins
    for bad in (torch.float64, "neg", "meta"):
        for x, want in ((compiled, -1), (eager, 1)):
            y = x.double() if bad is torch.float64 else x.to("meta") if bad == "meta" else x.conj()._neg_view()
            assert route_of((y,)) == want, (bad, x.shape)
    seen: list[int] = []
    vmap(lambda row: seen.append(route_of((row,))) or row)(torch.zeros(7, 2, 3, 4))  # a wrapped batch-2 tensor
    vmap(lambda row: seen.append(route_of((row,))) or row)(torch.zeros(7, 5, 3, 4))  # a wrapped batch-5 tensor
    assert seen == [-1, 1]
    # A strided nested tensor is a plain Tensor by type. torch warns that nested tensors are a prototype once
    # a process, whichever test makes the first: not a thing to assert here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*prototype", category=UserWarning)
        nested = torch.nested.nested_tensor([torch.zeros(3, 4), torch.zeros(3, 4)])
    assert route_of((nested,)) == -1


def test_regions_that_could_reach_exec_are_refused() -> None:
    """Only integers and identifiers make a region: a forged cut, a cell count that does not match the cuts, a
    dim the guards do not read, or more regions than schemas are errors, never source."""
    from esper.artifacts.guards import Regions, compile_dispatch
    from esper.artifacts.validate import EntryFormatError

    with pytest.raises(EntryFormatError, match="ascending validated integers"):
        Regions(("batch",), (("__import__('os').getpid()",),), (True, False))  # type: ignore[arg-type]
    with pytest.raises(EntryFormatError, match="cell flags"):
        Regions(("batch",), ((3,),), (True,))
    with pytest.raises(EntryFormatError):
        Regions(("ba tch",), ((3,),), (True, False))
    forged = Regions(("batch",), ((3,),), (True, False))
    object.__setattr__(forged, "cuts", (("1) or __import__('os').getpid() or (1",),))
    with pytest.raises(EntryFormatError):
        compile_dispatch([wide(8)], regions=[forged])
    clean = Regions(("batch",), ((3,),), (True, False))
    assert compile_dispatch([wide(8)], regions=[clean]) is not None  # the clean twin compiles
    with pytest.raises(EntryFormatError, match="do not read"):
        compile_dispatch([wide(8)], regions=[Regions(("width",), ((3,),), (True, False))])
    with pytest.raises(ValueError, match="more regions"):
        compile_dispatch([wide(8)], regions=[clean, clean])
