"""A package's wrapper object builds beside its kernels' object (esper.tezzeret.aoti.wrapper_beside_kernels), and
nothing that reads it starts before it is built."""

from __future__ import annotations

import subprocess
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.artifacts import variants
from esper.artifacts.runtime import CompiledPackage
from esper.tezzeret.aoti import builds_beside, compile_package, compiles_among_others, wrapper_beside_kernels

# Long enough for a build that waits on another to be a failure, never a slow pass.
PATIENCE_S = 30.0


def builder_class(work: dict[str, Any]) -> type:
    """A stand-in for Inductor's ``CppBuilder``: ``work[suffix]`` runs as the build of a target ending so, and
    every build is logged as (target, thread, "start" or "end")."""
    log: list[tuple[str, int, str]] = []

    class Builder:
        builds = log

        def __init__(self, target: str) -> None:
            self.target = target

        def get_target_file_path(self) -> str:
            return self.target

        def build(self) -> None:
            log.append((self.target, threading.get_ident(), "start"))
            for suffix, step in work.items():
                if self.target.endswith(suffix):
                    step()
            log.append((self.target, threading.get_ident(), "end"))

    return Builder


def events(builder: type) -> list[tuple[str, str]]:
    return [(target, what) for target, _, what in builder.builds]  # type: ignore[attr-defined]


def test_the_wrapper_builds_while_the_kernels_build_and_the_link_waits_for_both() -> None:
    kernels_started = threading.Event()
    seen: dict[str, bool] = {}

    def wrapper() -> None:
        seen["kernels built meanwhile"] = kernels_started.wait(PATIENCE_S)

    builder = builder_class({".wrapper.o": wrapper, ".kernel.o": kernels_started.set})
    with wrapper_beside_kernels(builder):
        builder("m.wrapper.o").build()
        builder("m.kernel.o").build()
        builder("m.so").build()
    assert seen == {"kernels built meanwhile": True}
    order = events(builder)
    assert order.index(("m.wrapper.o", "end")) < order.index(("m.so", "start"))
    threads = {target: thread for target, thread, _ in builder.builds}  # type: ignore[attr-defined]
    assert threads["m.wrapper.o"] != threading.get_ident() == threads["m.kernel.o"] == threads["m.so"]


def test_outside_a_block_every_build_runs_in_turn_in_its_thread() -> None:
    builder = builder_class({})
    with wrapper_beside_kernels(builder):
        pass
    builder("m.wrapper.o").build()
    builder("m.kernel.o").build()
    assert events(builder) == [
        ("m.wrapper.o", "start"),
        ("m.wrapper.o", "end"),
        ("m.kernel.o", "start"),
        ("m.kernel.o", "end"),
    ]
    assert {thread for _, thread, _ in builder.builds} == {threading.get_ident()}  # type: ignore[attr-defined]


def test_a_failed_wrapper_build_is_raised_before_the_link_runs() -> None:
    def fail() -> None:
        raise RuntimeError("g++: internal compiler error")

    builder = builder_class({".wrapper.o": fail})
    with pytest.raises(RuntimeError, match="internal compiler error"), wrapper_beside_kernels(builder):
        builder("m.wrapper.o").build()
        builder("m.kernel.o").build()
        builder("m.so").build()
    assert ("m.so", "start") not in events(builder)
    with pytest.raises(RuntimeError, match="internal compiler error"), wrapper_beside_kernels(builder):
        builder("n.wrapper.o").build()


def test_a_wrapper_build_never_outlives_its_block() -> None:
    """Leaving the block, normally or by an error, waits for the build (a real process, as ``g++`` is)."""

    def compile_something() -> None:
        subprocess.run([sys.executable, "-c", "import sys"], check=True)

    for failing in (False, True):
        builder = builder_class({".wrapper.o": compile_something})
        with pytest.raises(ValueError) if failing else nullcontext(), wrapper_beside_kernels(builder):
            builder("m.wrapper.o").build()
            if failing:
                raise ValueError("the compile failed elsewhere")
        assert events(builder)[-1] == ("m.wrapper.o", "end"), failing


def test_a_package_builds_its_objects_side_by_side_where_a_core_is_free_for_it() -> None:
    """In turn among a certification's compile workers (their plain compiles and the certification's checks
    keep every core busy), side by side in an autotuning compile (it runs alone) and everywhere else."""
    plain, tuned = variants.get("default").settings, variants.get("freezing_autotune_cpp").settings
    assert builds_beside(plain) and builds_beside(tuned)
    try:
        compiles_among_others()
        assert not builds_beside(plain)
        assert builds_beside(tuned)
    finally:
        compiles_among_others(False)
    assert builds_beside(plain)


def compile_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int, name: str = "model"
) -> list[tuple[str, int, str]]:
    """Compile a tiny plain package with :func:`compile_package` (fresh weights each time), logging every build
    that runs ``g++``."""
    from torch._inductor.cpp_builder import CppBuilder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    log: list[tuple[str, int, str]] = []
    build = CppBuilder.build

    def logged(self: CppBuilder) -> None:
        target = Path(self.get_target_file_path()).name
        log.append((target, threading.get_ident(), "start"))
        build(self)
        log.append((target, threading.get_ident(), "end"))

    monkeypatch.setattr(CppBuilder, "build", logged)
    model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU())
    x = torch.randn(4, 8)
    package = compile_package(torch.export.export(model, (x,)), tmp_path / f"{name}{width}.pt2")
    torch.testing.assert_close(CompiledPackage(package)((x,)), model(x))
    return log


@pytest.mark.compiles
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Inductor's own, recorded by Tezzeret where it compiles
def test_a_real_package_builds_its_wrapper_beside_its_kernels_or_in_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = compile_logged(tmp_path, monkeypatch, 8)
    [(wrapper, wrapper_thread)] = {(t, th) for t, th, _ in log if t.endswith(".wrapper.o")}
    [(kernels, kernel_thread)] = {(t, th) for t, th, _ in log if t.endswith(".kernel.o")}
    [library] = [t for t, _, what in log if t.endswith(".so") and what == "start" and "wrapper" in t]
    order = [(t, what) for t, _, what in log]
    assert wrapper_thread != kernel_thread
    assert order.index((wrapper, "start")) < order.index((kernels, "end"))
    assert order.index((kernels, "start")) < order.index((wrapper, "end")) < order.index((library, "start"))
    # Among others (a certification's compile worker), the same kind of compile builds in turn in its thread.
    try:
        compiles_among_others()
        log = compile_logged(tmp_path, monkeypatch, 16)
    finally:
        compiles_among_others(False)
    objects = [(t, what) for t, th, what in log if t.endswith((".wrapper.o", ".kernel.o"))]
    assert [what for _, what in objects] == ["start", "end", "start", "end"]
    assert {th for t, th, _ in log} == {threading.get_ident()}
    # The first graph again with other weights: its wrapper object is the one built before (objects_reused; its
    # kernels' object too, unless Inductor wrote small constants into the kernels' code), and the package computes
    # with the new weights.
    built = {
        t.rsplit(".", 2)[-2] for t, _, what in compile_logged(tmp_path, monkeypatch, 8, "again") if t.endswith(".o")
    }
    assert "wrapper" not in built and "weights" in built


def test_the_build_is_wrapped_once_however_many_blocks_ran() -> None:
    builder = builder_class({})
    original = builder.build  # type: ignore[attr-defined]
    with wrapper_beside_kernels(builder):
        wrapped = builder.build  # type: ignore[attr-defined]
    with wrapper_beside_kernels(builder), wrapper_beside_kernels(builder):
        assert builder.build is wrapped is not original  # type: ignore[attr-defined]
