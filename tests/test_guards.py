"""The guard schema: JSON round trip, version refusal, and a check that accepts exactly what it allows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from esper.guards import DimGuard, GuardSchema, InputGuard, SchemaVersionError, compile_check

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
