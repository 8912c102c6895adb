"""Data is data: every stored value is parsed into validated, typed values, and
nothing read from a row reaches ``exec``, ``getattr`` or a path. Each hostile value raises one exception
class, :class:`EntryFormatError`, naming the column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.artifacts import guards
from esper.artifacts.compat import CompatKey
from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard, SchemaVersionError, compile_check
from esper.urza.schema import Entry, EntryFormatError, EntryMeta

GOOD = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=4), DimGuard(size=8))),))


def attack(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}') + 8"


def test_code_in_a_guard_size_never_runs(tmp_path: Path) -> None:
    """A dim size holding Python used to be pasted into the predicate's source and exec'd."""
    marker = tmp_path / "x"
    data = GOOD.to_dict()
    data["inputs"][0]["dims"][1] = {"size": attack(marker)}
    with pytest.raises(EntryFormatError, match=r"'guards'.*not an integer"):
        GuardSchema.from_json(json.dumps(data))
    with pytest.raises(EntryFormatError):
        Entry.from_row(row(guards=json.dumps(data)))
    # Even a schema forced past validation never reaches exec: the generator checks every literal again.
    forged = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(size=8),)),))
    object.__setattr__(forged.inputs[0].dims[0], "size", attack(marker))
    with pytest.raises(EntryFormatError, match="predicate generator refused"):
        guards.compile_predicate(forged)
    with pytest.raises(EntryFormatError, match="predicate generator refused"):
        compile_check(forged)
    object.__setattr__(forged.inputs[0], "dtype", "float32 or __import__('os')")
    object.__setattr__(forged.inputs[0].dims[0], "size", 8)
    with pytest.raises(EntryFormatError, match="predicate generator refused dtype"):
        guards.compile_predicate(forged)
    assert not marker.exists()


def test_the_predicate_source_holds_only_integers_and_fixed_names() -> None:
    source = guards._predicate_source(GOOD)
    assert "float32" not in source and "batch" not in source and "'x'" not in source
    assert "if 1 <= s0[0] <= 4:" in source and "if s0[1] != 8:" in source


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["inputs"][0]["dims"].__setitem__(0, {"bogus": 1}), "unknown keys"),
        (lambda d: d["inputs"][0]["dims"].__setitem__(1, {"size": -1}), "outside"),
        (lambda d: d["inputs"][0]["dims"].__setitem__(1, {"size": True}), "not an integer"),
        (lambda d: d["inputs"][0]["dims"].__setitem__(1, {"size": 8.0}), "not an integer"),
        (lambda d: d["inputs"][0]["dims"].__setitem__(1, {"size": 2**60}), "outside"),
        (lambda d: d["inputs"][0]["dims"].__setitem__(0, {"name": "batch", "min": 5, "max": 2}), "min=5 > max=2"),
        (lambda d: d["inputs"][0]["dims"].__setitem__(0, {"name": "b-1", "min": 1, "max": 2}), "does not match"),
        (lambda d: d["inputs"][0]["dims"].__setitem__(0, {"name": "b", "size": 3}), "both fixed"),
        (lambda d: d["inputs"][0]["dims"].__setitem__(0, {"size": 3, "min": 1}), "no name"),
        (lambda d: d["inputs"][0].__setitem__("dtype", "os"), "is not one of"),
        (lambda d: d["inputs"][0].__setitem__("dtype", "qint8"), "is not one of"),
        (lambda d: d["inputs"][0].__setitem__("name", "x; import os"), "does not match"),
        (lambda d: d["inputs"][0].pop("dims"), "needs 'name', 'dtype' and 'dims'"),
        (lambda d: d["inputs"].append(dict(d["inputs"][0])), "input names repeat"),
        (
            lambda d: d["inputs"].append(
                {"name": "y", "dtype": "float32", "dims": [{"name": "batch", "min": 1, "max": 9}]}
            ),
            "two ranges",
        ),
        (lambda d: d.__setitem__("device", "cuda:0"), "device"),
        (lambda d: d.__setitem__("device", "meta"), "device"),
        (lambda d: d.__setitem__("version", "1"), "not an integer"),
        (lambda d: d.__setitem__("inputs", "x"), "not a list"),
        (lambda d: d.__setitem__("range_constraints", {"s0": 5}), "not a string"),
        (lambda d: d.__setitem__("extra", 1), "unknown keys"),
        (lambda d: d.pop("device"), "needs 'inputs' and 'device'"),
    ],
)
def test_hostile_guard_values_are_refused(mutate: Any, fragment: str) -> None:
    data = GOOD.to_dict()
    mutate(data)
    with pytest.raises(EntryFormatError, match="'guards'") as e:
        GuardSchema.from_dict(data)
    assert fragment in str(e.value)


def test_guard_text_that_is_not_json_or_too_deep_is_refused() -> None:
    for text in ["{", "[" * 100000, "null", "[1, 2]"]:
        with pytest.raises(EntryFormatError):
            GuardSchema.from_json(text)
    with pytest.raises(SchemaVersionError):
        GuardSchema.from_dict(GOOD.to_dict() | {"version": 2})


def row(**changes: Any) -> dict[str, Any]:
    entry = Entry(
        blueprint="b",
        blueprint_version=1,
        content_hash="c" * 64,
        compat=CompatKey("2.13.0", "linux-x86_64", "AVX2", "cpu"),
        engine="aoti",
        status="certified",
        checksum="a" * 64,
        artifact_size=123,
        guards=GOOD,
        meta={"representative": [{"batch": 2}], "profiles": ["default"]},
        id=1,
    )
    out = entry.to_row() | {"id": 1}
    out.update(changes)
    return out


def test_a_valid_row_round_trips() -> None:
    entry = Entry.from_row(row())
    assert entry.guards == GOOD and Entry.from_row(entry.to_row() | {"id": 1}) == entry


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("status", "bogus"),
        ("kind", "native"),
        ("artifact", "weights"),
        ("blueprint", "../../etc/evil"),
        ("blueprint_version", "1"),
        ("blueprint_version", 0),
        ("artifact_size", -1),
        ("checksum", "../../../etc/passwd"),
        ("content_hash", "C" * 64),
        ("profile", "../x"),
        ("variant", "Free zing"),
        ("device_type", "mps"),
        ("meta", "[1,2]"),
        ("meta", "not json"),
        ("parity", "3"),
        ("guards", '{"inputs": 5, "device": "cpu"}'),
        ("guards", 5),
        ("signature", 5),
        ("id", -3),
    ],
)
def test_hostile_columns_are_refused_naming_the_column(column: str, value: Any) -> None:
    with pytest.raises(EntryFormatError) as e:
        Entry.from_row(row(**{column: value}))
    assert e.value.column in (column, "row")


def meta_of(**meta: Any) -> EntryMeta:
    return EntryMeta.from_entry(Entry.from_row(row(meta=json.dumps(meta))))


def test_meta_kasmina_reads_is_parsed() -> None:
    m = meta_of(
        representative=[{"batch": 2}, {"batch": 4}],
        profiles=["default"],
        constants={"layers.0.weight": {"shape": [8, 8], "dtype": "float32"}},
        folded_constants=["layers.0.bias"],
        swappable=False,
        training={"route": "eager", "reason": "random ops"},
        source_digest="d" * 64,
        compile_seconds=1.5,  # evidence: kept in entry.meta, not part of the view
    )
    assert m.representative_sizes() == [{"batch": 2}, {"batch": 4}]
    assert m.constant_names() == ["layers.0.weight"] and m.constants[0].shape == (8, 8)  # type: ignore[index]
    assert m.folded_constants == ("layers.0.bias",) and m.swappable is False
    assert (m.training_route, m.training_reason, m.source_digest) == ("eager", "random ops", "d" * 64)
    assert meta_of() == EntryMeta(profiles=("default",))


@pytest.mark.parametrize(
    ("meta", "column"),
    [
        ({"representative": [{"batch": -1}]}, "meta.representative"),  # pre-warm RuntimeError
        ({"representative": [{"batch": 5}]}, "meta.representative"),  # outside the guard
        ({"representative": [{}]}, "meta.representative"),  # KeyError
        ({"representative": [{"batch": 2, "seq": 3}]}, "meta.representative"),
        ({"representative": [{"batch": "2"}]}, "meta.representative"),
        ({"representative": 5}, "meta.representative"),
        ({"profiles": 5}, "meta.profiles"),  # TypeError
        ({"profiles": ["nope"]}, "meta.profiles"),  # eager with the wrong reason, no WARNING
        ({"profiles": ["batch=1-4", "../x"]}, "meta.profiles"),
        ({"constants": {"w": {"shape": [8], "dtype": "complex64"}}}, "meta.constants"),
        ({"constants": {"w": {"shape": [-8], "dtype": "float32"}}}, "meta.constants"),
        ({"constants": {"__class__.x y": {"shape": [8], "dtype": "float32"}}}, "meta.constants"),
        ({"constants": [1]}, "meta.constants"),
        ({"folded_constants": [1]}, "meta.folded_constants"),
        ({"swappable": "yes"}, "meta.swappable"),
        ({"training": {"route": "native"}}, "meta.training"),
        ({"training": "eager"}, "meta.training"),
        ({"source_digest": "abc"}, "meta.source_digest"),
    ],
)
def test_hostile_meta_is_refused_naming_the_field(meta: dict[str, Any], column: str) -> None:
    with pytest.raises(EntryFormatError) as e:
        meta_of(**meta)
    assert e.value.column == column


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += paths(v, (*prefix, k))
    elif isinstance(data, list):
        for k, v in enumerate(data):
            out += paths(v, (*prefix, k))
    return out


GOOD_DICT = GOOD.to_dict()
GOOD_PATHS = paths(GOOD_DICT)[1:]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(where=st.sampled_from(GOOD_PATHS), value=JSON)
def test_any_mutated_guard_is_valid_or_refused_never_anything_else(where: tuple[Any, ...], value: Any) -> None:
    data = json.loads(json.dumps(GOOD_DICT))
    target = data
    for k in where[:-1]:
        target = target[k]
    target[where[-1]] = value
    try:
        schema = GuardSchema.from_dict(data)
    except (EntryFormatError, SchemaVersionError):
        return
    # Whatever was accepted is a schema the generator can compile and the check can run.
    check = compile_check(schema)
    assert check((torch.zeros(2, 8),)) is None or isinstance(check((torch.zeros(2, 8),)), str)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    where=st.sampled_from(["representative", "profiles", "constants", "folded_constants", "training", "swappable"]),
    value=JSON,
)
def test_any_mutated_meta_field_parses_or_is_refused(where: str, value: Any) -> None:
    try:
        meta_of(**{where: value})
    except EntryFormatError as e:
        assert e.column.startswith("meta")
