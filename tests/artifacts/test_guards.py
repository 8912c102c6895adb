"""The guard schema: JSON round trip, version refusal, and a check that accepts exactly what it allows."""

from __future__ import annotations

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
