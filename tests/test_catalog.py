"""Blueprint files: an invalid name never reaches a path, and any exception a file
raises on import (SystemExit included) is reported by file name while the rest of the catalog loads."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from esper.blueprint import BlueprintError
from esper.catalog import load_catalog, module_file_name, validate_module
from tests.support import good, write

EVIL = good("lin").replace('name="lin"', 'name="../../etc/evil"')


def test_an_invalid_name_is_quoted_in_the_message_but_never_kept(tmp_path: Path) -> None:
    write(tmp_path, "a_good.py", good("alpha"))
    evil = write(tmp_path, "evil.py", EVIL)
    catalog = load_catalog([tmp_path], strict=False)
    assert list(catalog.blueprints) == ["alpha"]
    (error,) = catalog.errors
    assert error.blueprint is None  # what callers build file names from
    assert error.source == str(evil.resolve()) and error.field == "name"
    assert "'../../etc/evil' must match" in str(error)
    # What a caller builds a generated file's name from instead:
    name = module_file_name(error.source)
    assert re.fullmatch(r"evil_[0-9a-f]{8}", name)


@pytest.mark.parametrize(
    "source", ["../../etc/evil.py", "/x/..py", "/x/ .py", "/x/Ünïcode name!.py", "/x/.hidden.py", None, ""]
)
def test_module_file_name_is_always_a_safe_stem(source: str | None) -> None:
    name = module_file_name(source)
    assert re.fullmatch(r"[a-z0-9_]{1,40}_[0-9a-f]{8}", name), name
    assert module_file_name("/a/same.py") != module_file_name("/b/same.py")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("import sys\nsys.exit(3)\n", "raised on import: SystemExit: 3"),
        ("raise SystemExit('bye')\n", "raised on import: SystemExit: bye"),
        ("import os\nraise OSError(2, 'gone')\n", "raised on import: FileNotFoundError"),
        ("raise GeneratorExit()\n", "raised on import: GeneratorExit"),
        ("class E(Exception):\n    def __str__(self):\n        raise ValueError\nraise E()\n", "E: <unprintable>"),
        ("def f(:\n", "raised on import: SyntaxError"),
    ],
)
def test_any_exception_on_import_is_reported_by_file_and_the_rest_loads(
    tmp_path: Path, body: str, fragment: str
) -> None:
    write(tmp_path, "a_good.py", good("alpha"))
    bad = write(tmp_path, "b_bad.py", body)
    write(tmp_path, "c_good.py", good("gamma"))
    catalog = load_catalog([tmp_path], strict=False)
    assert sorted(catalog.blueprints) == ["alpha", "gamma"]
    (error,) = catalog.errors
    assert error.source == str(bad.resolve()) and fragment in str(error)
    with pytest.raises(BlueprintError, match=r"b_bad\.py"):
        load_catalog([tmp_path])


def test_keyboard_interrupt_still_stops_the_run(tmp_path: Path) -> None:
    write(tmp_path, "a.py", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_catalog([tmp_path], strict=False)


def test_a_builder_calling_sys_exit_is_that_blueprint_s_failure(tmp_path: Path) -> None:
    write(tmp_path, "lin.py", good().replace("with seeded(0):", "import sys; sys.exit(4)\n    with seeded(0):"))
    (bp,) = load_catalog([tmp_path]).blueprints.values()
    with pytest.raises(BlueprintError, match=r"field 'build'.*SystemExit: 4"):
        validate_module(bp)


def test_a_module_calling_sys_exit_on_call_is_that_blueprint_s_failure(tmp_path: Path) -> None:
    text = good() + textwrap.dedent(
        """
        class Quits(torch.nn.Module):
            def forward(self, x):
                raise SystemExit(5)

        def build_quits():
            return Quits()

        QUITS = Blueprint(name="quits", version=1, build=build_quits,
            inputs=(Input("x", "float32", (Dim("batch", 1, 16), 8)),), representative=({"batch": 4},))
        """
    )
    write(tmp_path, "lin.py", text)
    bp = load_catalog([tmp_path]).get("quits")
    with pytest.raises(BlueprintError, match=r"field 'inputs'.*SystemExit: 5"):
        validate_module(bp)
