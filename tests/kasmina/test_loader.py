"""Kasmina: loads certified entries without compiling; every reason it cannot ends in eager output plus one
WARNING that names the reason."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from esper.kasmina import COMPILED, EAGER, Kasmina, Kernel
from esper.urza import Urza
from tests.support import TINY, blueprint_module

pytestmark = pytest.mark.compiles


def load(urza_path: Path) -> Kernel:
    return Kasmina(urza_path, blueprint_paths=[TINY]).load("tiny_mlp")


def reference() -> torch.nn.Module:
    return blueprint_module("tiny_mlp")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


def sql(urza_path: Path, statement: str, *params: object) -> None:
    conn = sqlite3.connect(urza_path)
    with conn:
        conn.execute(statement, params)
    conn.close()


def test_fresh_process_loads_compiled_without_the_compiler(compiled_urza: Path) -> None:
    script = textwrap.dedent(f"""
        import json, sys, time
        import torch
        t0 = time.perf_counter()
        from esper.kasmina import Kasmina
        kernel = Kasmina({str(compiled_urza)!r}, blueprint_paths=[{str(TINY)!r}]).load("tiny_mlp")
        x = torch.randn(5, 8)
        with torch.no_grad():
            y = kernel(x)
        first_use = time.perf_counter() - t0
        path = kernel.last_path
        from esper.catalog import load_catalog  # the oracle: the blueprint itself, not Kasmina's eager module
        with torch.no_grad():
            want = load_catalog([{str(TINY)!r}]).get("tiny_mlp").build().eval()(x)
        print(json.dumps({{
            "path": path, "route": kernel.route, "max_err": float((y - want).abs().max()),
            "first_use_ms": first_use * 1e3,
            "compiler_modules": sorted(m for m in sys.modules
                                       if m.split(".")[:2] in (["torch", "_dynamo"], ["torch", "_inductor"])),
        }}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["path"] == COMPILED and result["route"] == COMPILED
    assert result["max_err"] <= 1e-5
    assert result["compiler_modules"] == []


def test_in_process_outputs_match_eager_and_noncontiguous_inputs_work(compiled_urza: Path) -> None:
    kernel = load(compiled_urza)
    ref = reference()
    with torch.no_grad():
        for batch in (1, 7, 32):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(kernel(x), ref(x), atol=1e-5, rtol=1e-5)
            assert kernel.last_path == COMPILED
        for x in (torch.randn(16, 8)[::2], torch.randn(8, 6).t(), torch.randn(6, 16)[:, ::2]):
            assert not x.is_contiguous()
            torch.testing.assert_close(kernel(x), ref(x), atol=1e-5, rtol=1e-5)
            assert kernel.last_path == COMPILED


def test_outside_guards_runs_eager_with_one_warning(compiled_urza: Path, caplog: pytest.LogCaptureFixture) -> None:
    kernel = load(compiled_urza)
    ref = reference()
    caplog.set_level(logging.WARNING, "esper.kasmina")
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(33, 8)
            torch.testing.assert_close(kernel(x), ref(x))
            assert kernel.last_path == EAGER
    (record,) = warnings_of(caplog)
    assert "'tiny_mlp'" in record.getMessage() and "outside-guards" in record.getMessage()
    assert record.esper["reason"] == "outside-guards"  # type: ignore[attr-defined]
    assert kernel.calls == {EAGER: 3}


def test_wrong_feature_size_never_reaches_compiled_code(compiled_urza: Path) -> None:
    kernel = load(compiled_urza)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        kernel(torch.randn(4, 9))  # the eager module rejects it; the compiled code would have read garbage
    assert kernel.calls == {EAGER: 1}
    assert kernel.check(torch.randn(4, 9)) == "input 'x' dim 1 is 9, guard requires 8"


def test_inputs_needing_grad_run_eager(compiled_urza: Path, caplog: pytest.LogCaptureFixture) -> None:
    kernel = load(compiled_urza)
    x = torch.randn(4, 8, requires_grad=True)
    kernel(x).sum().backward()
    assert kernel.last_path == EAGER and x.grad is not None
    (record,) = warnings_of(caplog)
    assert record.esper["reason"] == "needs-grad"  # type: ignore[attr-defined]


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_a_first_call_inside_a_functorch_transform_builds_the_eager_module_outside_it(
    compiled_urza: Path, transform: str
) -> None:
    # The first eager call builds the eager module; under vmap the builder's random initialisation would be
    # refused ("vmap: called random operation"), under grad its weights would be the transform's tensors.
    kernel = load(compiled_urza)
    oracle = blueprint_module("tiny_mlp", TINY)
    x = torch.randn(3, 4, 8)
    if transform == "vmap":
        got = torch.func.vmap(kernel)(x)
        want = torch.func.vmap(oracle)(x)
    else:
        got = torch.func.grad(lambda t: kernel(t).sum())(x[0])
        want = torch.func.grad(lambda t: oracle(t).sum())(x[0])
    assert kernel.last_path == EAGER
    torch.testing.assert_close(got, want)


def _uncertify(p: Path) -> None:
    sql(p, "UPDATE entries SET status = 'compiled'")


def _incompatible(p: Path) -> None:
    sql(p, "UPDATE entries SET isa = 'SSE2', torch_version = '1.0.0'")


def _tamper(p: Path) -> None:
    with Urza(p, readonly=True) as urza:
        (entry,) = urza.entries("tiny_mlp")
        artifact = urza.store.path_for(entry.checksum)
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    with Urza(p, readonly=True) as urza:
        (entry,) = urza.entries("tiny_mlp")
        artifact = urza.store.path_for(entry.checksum)
    artifact.write_bytes(artifact.read_bytes()[:100])


def _unloadable(p: Path) -> None:
    garbage = p.parent / "garbage.pt2"
    garbage.write_bytes(b"PK\x03\x04 this is not a package" * 10)
    with Urza(p) as urza:
        checksum, size = urza.store.add(garbage)
        (entry,) = urza.entries("tiny_mlp")
        urza.update(entry.id, checksum=checksum, artifact_size=size)  # type: ignore[arg-type]


def _escape(p: Path) -> None:
    sql(p, "UPDATE entries SET checksum = '../../../../etc/passwd'")


def _garbage_db(p: Path) -> None:
    p.write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        Path(str(p) + suffix).unlink(missing_ok=True)


def _newer_schema(p: Path) -> None:
    sql(p, "PRAGMA user_version = 99")


@pytest.mark.parametrize(
    ("damage", "reason", "fragment"),
    [
        (_uncertify, "no-certified-entry", "no certified entry (newest is #1, compiled)"),
        (_incompatible, "incompatible", "torch_version '1.0.0'"),
        (_tamper, "integrity", "checksum mismatch"),
        (_truncate, "integrity", "truncated"),
        (_escape, "format", "checksum '../../../../etc/passwd'"),  # rows are validated before any path
        (_unloadable, "load-failed", "ExtractionError: not a zip"),
        (_garbage_db, "urza-unavailable", "not a usable Urza database"),
        (_newer_schema, "urza-unavailable", "newer than this Esper"),
    ],
)
def test_each_fallback_reason_gives_eager_output_and_one_warning(
    urza_copy: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None], reason: str, fragment: str
) -> None:
    damage(urza_copy)
    before = urza_copy.read_bytes()
    caplog.set_level(logging.INFO, "esper.kasmina")
    kernel = load(urza_copy)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), reference()(x))
    assert kernel.route == EAGER and kernel.last_path == EAGER
    (record,) = warnings_of(caplog)
    message = record.getMessage()
    assert "'tiny_mlp'" in message and reason in message and fragment in message
    assert urza_copy.read_bytes() == before  # a reader never writes


def test_unknown_blueprint_without_entries_is_a_clear_error(compiled_urza: Path) -> None:
    from esper.catalog import UnknownBlueprintError

    kernel = Kasmina(compiled_urza, blueprint_paths=[TINY]).load("nope")
    assert kernel.route == EAGER
    with pytest.raises(UnknownBlueprintError, match="unknown blueprint 'nope'"):
        kernel(torch.randn(2, 8))
