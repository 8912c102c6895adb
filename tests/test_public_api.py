"""The public API: ``from esper import ...`` gives every name of ``esper.__all__``, each the object its defining
module holds, while ``import esper`` itself stays light (each name is imported on first use)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import esper

INIT = Path(esper.__file__)
COMPILER = ("torch._dynamo", "torch._inductor")


def imported_after(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split()


def type_checking_imports() -> dict[str, str]:
    """What type checkers and IDEs see: each name the ``if TYPE_CHECKING:`` block of esper/__init__.py imports,
    with the module it imports it from."""
    tree = ast.parse(INIT.read_text())
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    return {a.asname or a.name: n.module or "" for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}


def test_importing_esper_imports_neither_torch_nor_the_compiler() -> None:
    modules = imported_after("import esper")
    assert "esper" in modules
    assert [m for m in modules if m == "torch" or m.startswith(("torch.", "esper."))] == []


def test_the_runtime_names_do_not_import_the_compiler() -> None:
    modules = imported_after("from esper import COMPILED, Kasmina, Route, Unusable, Urza")
    assert "esper.kasmina.loader" in modules and "torch" in modules
    assert [m for m in modules if m.startswith(COMPILER) or m.startswith("esper.tezzeret")] == []


def test_every_public_name_resolves_to_what_type_checkers_see() -> None:
    declared = type_checking_imports()
    assert sorted(declared) == sorted(n for n in esper.__all__ if n != "__version__")
    for name, module in declared.items():
        assert getattr(esper, name) is getattr(importlib.import_module(module), name), name
    assert set(esper.__all__) <= set(dir(esper))


def test_from_esper_import_star_gives_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from esper import *", namespace)
    assert set(esper.__all__) <= set(namespace)
    assert namespace["Kasmina"] is importlib.import_module("esper.kasmina.loader").Kasmina


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="'esper' has no attribute 'Kasmnia'"):
        esper.Kasmnia  # noqa: B018
    assert not hasattr(esper, "compile")
