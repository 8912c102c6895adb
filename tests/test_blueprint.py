"""The blueprint contract and the catalog loader: malformed declarations fail early, naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.blueprint import Blueprint, BlueprintError, Budget, Dim, Input, Tolerance
from esper.catalog import UnknownBlueprintError, load_catalog, load_file, validate_module
from tests.support import good, write


def declare(**overrides: object) -> Blueprint:
    fields: dict[str, object] = {
        "name": "b",
        "version": 1,
        "build": lambda: None,
        "inputs": (Input("x", "float32", (Dim("batch", 1, 8), 4)),),
        "representative": ({"batch": 2},),
    }
    fields.update(overrides)
    return Blueprint(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"build": None}, "build", "not callable"),
        ({"name": "Bad Name"}, "name", "must match"),
        ({"version": 0}, "version", ">= 1"),
        ({"inputs": ()}, "inputs", "non-empty"),
        ({"representative": ({"batch": 9},)}, "representative", "outside"),
        ({"representative": ({},)}, "representative", "dynamic dims are ['batch']"),
        ({"budget": Budget(p95_ms={"batch=3": 1.0})}, "budget", "representative labels"),
        (
            {"inputs": (Input("x", "float32", (Dim("n", 1, 4),)), Input("y", "float32", (Dim("n", 1, 5),)))},
            "inputs",
            "two ranges",
        ),
    ],
)
def test_declaration_errors_name_the_field(overrides: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(BlueprintError) as info:
        declare(**overrides)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert f"field {field!r}" in str(info.value)


def test_dim_min_greater_than_max() -> None:
    with pytest.raises(BlueprintError, match=r"min=9 > max=3"):
        Dim("batch", 9, 3)


@pytest.mark.parametrize("bad", [Tolerance, Input])
def test_other_field_validators(bad: type) -> None:
    with pytest.raises(BlueprintError):
        bad(atol=-1.0) if bad is Tolerance else bad("x", "complex32", (1,))


def test_shapes_and_labels() -> None:
    bp = declare(
        inputs=(Input("x", "float32", (Dim("batch", 1, 8), Dim("seq", 2, 9), 4)),),
        representative=({"batch": 2, "seq": 3},),
    )
    assert bp.shapes({"batch": 5, "seq": 7}) == {"x": (5, 7, 4)}
    assert Blueprint.shape_label({"batch": 5, "seq": 7}) == "batch=5,seq=7"
    assert list(bp.dims) == ["batch", "seq"]


def test_load_file_sets_source(tmp_path: Path) -> None:
    path = write(tmp_path, "lin.py", good())
    (bp,) = load_file(path)
    assert bp.name == "lin" and bp.source == str(path.resolve())


def test_file_that_raises_names_the_file_and_the_rest_still_load(tmp_path: Path) -> None:
    write(tmp_path, "a_good.py", good("alpha"))
    bad = write(tmp_path, "b_bad.py", "raise RuntimeError('boom')\n")
    write(tmp_path, "_helper.py", "raise RuntimeError('never imported')\n")
    with pytest.raises(BlueprintError, match=r"b_bad.py.*raised on import: RuntimeError: boom"):
        load_catalog([tmp_path])
    catalog = load_catalog([tmp_path], strict=False)
    assert list(catalog.blueprints) == ["alpha"]
    assert [e.source for e in catalog.errors] == [str(bad.resolve())]


def test_bad_declaration_in_a_file_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.py", good().replace('Dim("batch", 1, 16)', 'Dim("batch", 16, 1)'))
    with pytest.raises(BlueprintError) as info:
        load_catalog([tmp_path])
    assert str(path.resolve()) in str(info.value) and "field 'inputs'" in str(info.value)


def test_duplicate_name_names_both_files(tmp_path: Path) -> None:
    first = write(tmp_path / "one", "first.py", good("same"))
    second = write(tmp_path / "two", "second.py", good("same"))
    with pytest.raises(BlueprintError) as info:
        load_catalog([tmp_path / "one", tmp_path / "two"])
    message = str(info.value)
    assert str(second.resolve()) in message and str(first.resolve()) in message and "field 'name'" in message


def test_unknown_blueprint(tmp_path: Path) -> None:
    write(tmp_path, "lin.py", good())
    with pytest.raises(UnknownBlueprintError, match="unknown blueprint 'nope' \\(known: lin\\)"):
        load_catalog([tmp_path]).get("nope")


def test_dim_not_matching_module_fails_before_compiling(tmp_path: Path) -> None:
    write(tmp_path, "lin.py", good(features=7))
    (bp,) = load_catalog([tmp_path]).blueprints.values()
    with pytest.raises(BlueprintError, match=r"lin.py.*field 'inputs'.*module rejects declared shapes"):
        validate_module(bp)


def test_nondeterministic_builder_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "lin.py", good().replace("with seeded(0):\n        return", "if True:\n        return"))
    (bp,) = load_catalog([tmp_path]).blueprints.values()
    with pytest.raises(BlueprintError, match=r"field 'build'.*not deterministic"):
        validate_module(bp)


def test_project_catalog_is_valid() -> None:
    catalog = load_catalog([Path(__file__).parents[1] / "blueprints"])
    assert len(catalog.blueprints) >= 8
    for bp in catalog.blueprints.values():
        validate_module(bp)
