"""A package object built before from the same recipe is copied, never built again, and nothing else is
(esper.tezzeret.object_store and esper.tezzeret.aoti.objects_reused). A real package compiled again is in
test_package_build.py."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from esper.tezzeret.aoti import object_recipe, objects_reused
from esper.tezzeret.object_store import ObjectStore, Recipe, source_code

CODE = b"#include <cstdio>\nint f() { return 1; }\n// a comment inside the code stays\nint g() { return 2; }\n"


class Compiler:
    """A stand-in ``g++``: writes an object named after its source's code and counts its runs."""

    def __init__(self, fail: bool = False) -> None:
        self.runs = 0
        self.fail = fail

    def build(self, recipe: Recipe, target: Path) -> None:
        self.runs += 1
        if self.fail:
            raise RuntimeError("g++: internal compiler error")
        target.write_bytes(b"OBJ:" + b"".join(source_code(s) for s in recipe.sources) + recipe.command.encode())


def recipe_for(tmp_path: Path, code: bytes = CODE, **changes: str) -> Recipe:
    source = tmp_path / "m.wrapper.cpp"
    source.write_bytes(code)
    recipe = Recipe("g++ m.wrapper.cpp -O3 -c -o m.wrapper.o", (source,), "gcc version 13.2.0", "torch 2.13.0 abc")
    return replace(recipe, **changes)


def build(store: ObjectStore, recipe: Recipe, target: Path, compiler: Compiler) -> bool:
    return store.build(target, recipe, lambda: compiler.build(recipe, target))


def test_the_same_recipe_is_built_once_and_copied_after(tmp_path: Path) -> None:
    store, compiler = ObjectStore(tmp_path / "store"), Compiler()
    target = tmp_path / "m.wrapper.o"
    recipe = recipe_for(tmp_path)
    assert build(store, recipe, target, compiler) is False
    built = target.read_bytes()
    target.unlink()  # AOTInductor deletes its objects once the package is linked
    assert build(store, recipe, target, compiler) is True
    assert compiler.runs == 1
    assert target.read_bytes() == built


@pytest.mark.parametrize(
    "change",
    [
        {"command": "g++ m.wrapper.cpp -O1 -c -o m.wrapper.o"},
        {"compiler": "gcc version 14.1.0"},
        {"headers": "torch 2.13.0 def"},
    ],
    ids=["command", "compiler", "headers"],
)
def test_another_command_compiler_or_torch_builds_again(tmp_path: Path, change: dict[str, str]) -> None:
    store, compiler = ObjectStore(tmp_path / "store"), Compiler()
    target = tmp_path / "m.wrapper.o"
    build(store, recipe_for(tmp_path), target, compiler)
    assert build(store, recipe_for(tmp_path, **change), target, compiler) is False
    assert compiler.runs == 2


def test_other_code_builds_again_but_comments_appended_after_it_do_not(tmp_path: Path) -> None:
    """AOTInductor appends the compile and link commands to a source as comments once it is built."""
    store, compiler = ObjectStore(tmp_path / "store"), Compiler()
    target = tmp_path / "m.wrapper.o"
    build(store, recipe_for(tmp_path), target, compiler)
    appended = CODE + b"\n// Compile cmd\n// g++ m.wrapper.cpp -c\n// Link cmd\n// g++ m.wrapper.o -shared\n\n"
    assert build(store, recipe_for(tmp_path, appended), target, compiler) is True
    assert compiler.runs == 1
    for other in (CODE.replace(b"return 2", b"return 3"), CODE.replace(b"// a comment inside the code stays\n", b"")):
        assert build(store, recipe_for(tmp_path, other), target, compiler) is False
    assert compiler.runs == 3


def test_a_failed_build_raises_as_it_did_and_keeps_nothing(tmp_path: Path) -> None:
    store, target, recipe = ObjectStore(tmp_path / "store"), tmp_path / "m.wrapper.o", recipe_for(tmp_path)
    with pytest.raises(RuntimeError, match="internal compiler error"):
        build(store, recipe, target, Compiler(fail=True))
    compiler = Compiler()
    assert build(store, recipe, target, compiler) is False
    assert compiler.runs == 1


def test_a_store_it_cannot_write_or_read_costs_a_build_never_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "store"
    blocked.write_text("a file where the store's folder should be")
    store, compiler, target = ObjectStore(blocked), Compiler(), tmp_path / "m.wrapper.o"
    for _ in range(2):
        assert build(store, recipe_for(tmp_path), target, compiler) is False
    assert compiler.runs == 2 and target.read_bytes().startswith(b"OBJ:")
    # A stored object that cannot be copied is built instead.
    store, compiler = ObjectStore(tmp_path / "store2"), Compiler()
    build(store, recipe_for(tmp_path), target, compiler)

    def unreadable(source: Path, dest: str) -> None:
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(shutil, "copyfile", unreadable)
    assert build(store, recipe_for(tmp_path), target, compiler) is False
    assert compiler.runs == 2


def test_the_store_stays_under_its_limit_dropping_the_least_recently_used(tmp_path: Path) -> None:
    recipes = []
    for i in range(4):
        (tmp_path / str(i)).mkdir()
        recipes.append(recipe_for(tmp_path / str(i), CODE + b"int h%d;\n" % i))
    store, compiler, target = ObjectStore(tmp_path / "store"), Compiler(), tmp_path / "m.o"
    for i in range(3):
        build(store, recipes[i], target, compiler)
        os.utime(store.path(recipes[i].key()), ns=(i * 10**9, i * 10**9))
    size = target.stat().st_size
    store.limit_bytes = int(3.5 * size)
    assert build(store, recipes[0], target, compiler) is True  # the oldest, used again: now the newest
    build(store, recipes[3], target, compiler)  # four objects: over the limit
    kept = {i for i, recipe in enumerate(recipes) if store.path(recipe.key()).exists()}
    assert kept == {0, 3}


@pytest.mark.parametrize("target, sources", [("m.so", ["m.wrapper.o"]), ("m.weights.o", ["m.weights.S"])])
def test_links_and_patched_constants_have_no_recipe(tmp_path: Path, target: str, sources: list[str]) -> None:
    class Builder:
        _sources_args = " ".join(str(tmp_path / s) for s in sources)
        _compiler = "g++"

        def get_target_file_path(self) -> str:
            return str(tmp_path / target)

        def get_command_line(self) -> str:
            return f"g++ {self._sources_args} -o {target}"

    assert object_recipe(Builder()) is None


def test_a_cpp_object_has_a_recipe_unless_inductors_caches_are_disabled(tmp_path: Path) -> None:
    import torch

    class Builder:
        _sources_args = str(tmp_path / "m.wrapper.cpp")
        _compiler = "g++"

        def get_target_file_path(self) -> str:
            return str(tmp_path / "m.wrapper.o")

        def get_command_line(self) -> str:
            return f"g++ -c {self._sources_args} -o m.wrapper.o"

    recipe = object_recipe(Builder())
    assert recipe is not None
    assert recipe.command == Builder().get_command_line() and recipe.sources == (tmp_path / "m.wrapper.cpp",)
    assert "2.13.0" in recipe.headers and recipe.compiler
    with torch.compiler.config.patch(force_disable_caches=True):
        assert object_recipe(Builder()) is None


def test_objects_are_reused_only_inside_a_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside :func:`objects_reused`, a builder's build is the original, whatever blocks ran before."""

    class Builder:
        runs = 0
        _compiler = ""

        def __init__(self) -> None:
            self._sources_args = str(tmp_path / "m.wrapper.cpp")
            (tmp_path / "m.wrapper.cpp").write_bytes(CODE)

        def get_target_file_path(self) -> str:
            return str(tmp_path / "m.wrapper.o")

        def get_command_line(self) -> str:
            return "g++ -c m.wrapper.cpp -o m.wrapper.o"

        def build(self) -> None:
            type(self).runs += 1
            Path(self.get_target_file_path()).write_bytes(b"OBJ")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with objects_reused(Builder):
        Builder().build()
        Builder().build()
    assert Builder.runs == 1
    Builder().build()
    assert Builder.runs == 2
