"""An autotuning compile's candidates build against one precompiled CPU prefix header
(esper.tezzeret.aoti.candidates_with_precompiled_prefix), and nothing else changes."""

from __future__ import annotations

import ctypes
import threading
import uuid
from pathlib import Path

import pytest

from esper.tezzeret.aoti import CPU_PREFIX_HEADER, candidates_with_precompiled_prefix


def cache_classes() -> tuple[type, type]:
    """Stand-ins for Inductor's plain ``CppCodeCache`` (names no header) and a cache that names its own."""

    class Plain:
        @classmethod
        def _get_uncompiled_header(cls, device: str) -> str | None:
            return None

    class Bindings(Plain):
        @classmethod
        def _get_uncompiled_header(cls, device: str) -> str | None:
            return "own_header.h"

    return Plain, Bindings


def test_inside_a_block_the_plain_cache_names_the_prefix_header_for_the_cpu_only() -> None:
    plain, bindings = cache_classes()
    assert plain._get_uncompiled_header("cpu") is None
    with candidates_with_precompiled_prefix(plain):
        assert plain._get_uncompiled_header("cpu") == CPU_PREFIX_HEADER
        assert bindings._get_uncompiled_header("cpu") == "own_header.h"
        assert plain._get_uncompiled_header("cuda") is None
        assert plain._get_uncompiled_header("cuda:0") is None
    assert plain._get_uncompiled_header("cpu") is None
    assert bindings._get_uncompiled_header("cpu") == "own_header.h"


def test_a_block_reaches_the_threads_that_build_while_it_is_open() -> None:
    """Inductor may build an op's candidates in a thread pool of its own."""
    plain, _ = cache_classes()
    seen: list[str | None] = []

    def build() -> None:
        seen.append(plain._get_uncompiled_header("cpu"))

    with candidates_with_precompiled_prefix(plain):
        worker = threading.Thread(target=build)
        worker.start()
        worker.join()
    worker = threading.Thread(target=build)
    worker.start()
    worker.join()
    assert seen == [CPU_PREFIX_HEADER, None]


def test_nested_blocks_keep_the_header_until_the_last_ends_and_an_error_ends_one() -> None:
    plain, _ = cache_classes()
    with candidates_with_precompiled_prefix(plain):
        with pytest.raises(ValueError), candidates_with_precompiled_prefix(plain):
            raise ValueError("a compile failed")
        assert plain._get_uncompiled_header("cpu") == CPU_PREFIX_HEADER
    assert plain._get_uncompiled_header("cpu") is None


def test_the_choice_is_wrapped_once_however_many_blocks_ran() -> None:
    plain, _ = cache_classes()
    with candidates_with_precompiled_prefix(plain):
        wrapped = plain.__dict__["_get_uncompiled_header"]
    with candidates_with_precompiled_prefix(plain), candidates_with_precompiled_prefix(plain):
        assert plain.__dict__["_get_uncompiled_header"] is wrapped


def log_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Log the command line of every library Inductor builds."""
    from torch._inductor.cpp_builder import CppBuilder

    lines: list[str] = []
    build = CppBuilder.build

    def logged(self: CppBuilder) -> None:
        if str(self.get_target_file_path()).endswith(".so"):
            lines.append(self.get_command_line())
        build(self)

    monkeypatch.setattr(CppBuilder, "build", logged)
    return lines


@pytest.mark.compiles
def test_a_real_candidate_includes_the_precompiled_header_and_runs_as_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def source(tag: str) -> str:
        # A name of its own each run, so that no library of an earlier run is found instead of built.
        return f'#include <{CPU_PREFIX_HEADER}>\nextern "C" long long twice_{tag}(long long x) {{ return 2 * x; }}\n'

    from torch._inductor.codecache import CppCodeCache

    lines = log_builds(monkeypatch)
    tags = [f"t{uuid.uuid4().hex[:12]}" for _ in range(2)]
    # Loaded as Inductor loads an autotuning candidate's library, inside a block and then outside one.
    with candidates_with_precompiled_prefix():
        prefixed = CppCodeCache.load(source(tags[0]), device_type="cpu")
    plain = CppCodeCache.load(source(tags[1]), device_type="cpu")
    # The two libraries' own builds, in order (a fresh cache also builds Inductor's instruction-set probe).
    with_header, without = [line for line in lines if ".main.cpp " in line]
    assert "-include" in with_header.split() and "precompiled_headers" in with_header, with_header
    assert "-include" not in without.split(), without
    for library, tag in zip((prefixed, plain), tags, strict=True):
        twice = getattr(library, f"twice_{tag}")
        twice.restype, twice.argtypes = ctypes.c_longlong, [ctypes.c_longlong]
        assert twice(21) == 42
