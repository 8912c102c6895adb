"""First use: a bucketed blueprint loads its first compiled route at load and every other one on the first
call its guards accept; a deferred route verifies its artifact then (before any native code loads), and an
artifact damaged after load makes that call run eager with one WARNING, never an exception."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.artifacts.runtime import CompiledPackage
from esper.kasmina import COMPILED, EAGER, Kasmina, telemetry
from esper.kasmina.kernel import DeferredPackage
from esper.urza import Entry, Urza
from esper.urza import store as store_module
from esper.urza.store import forget_verified
from tests.support import TINY

pytestmark = pytest.mark.compiles


def guards(lo: int, hi: int) -> GuardSchema:
    return GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=lo, max=hi), DimGuard(size=8))),))


@pytest.fixture(autouse=True)
def fresh_digest_cache() -> Iterator[None]:
    forget_verified()
    yield
    forget_verified()


def two_routes(urza_path: Path) -> tuple[Entry, Entry]:
    """Two certified compiled profiles of tiny_mlp (batch 1-4, 5-32) over the one compiled package."""
    with Urza(urza_path) as urza:
        (base,) = urza.entries("tiny_mlp")
        profiles = ["batch=1-4", "batch=5-32"]
        meta = {**base.meta, "profiles": profiles, "representative": [{"batch": 4}]}
        urza.update(base.id, status="rejected")  # type: ignore[arg-type]
        small = urza.publish(base.with_(profile=profiles[0], guards=guards(1, 4), meta=meta, status="certified"))
        big = urza.publish(
            base.with_(
                profile=profiles[1],
                guards=guards(5, 32),
                status="certified",
                meta={**meta, "representative": [{"batch": 8}]},
            )
        )
    return small, big


def artifact(urza_path: Path, entry: Entry) -> Path:
    with Urza(urza_path, readonly=True) as urza:
        return urza.store.path_for(entry.checksum)


def corrupt(path: Path) -> None:
    path.chmod(0o644)
    with open(path, "r+b") as f:  # in place: same inode and size
        f.seek(path.stat().st_size // 2)
        f.write(b"\x00" * 64)


def test_a_single_route_blueprint_loads_its_package_at_load(urza_copy: Path) -> None:
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    (route,) = kernel.routes
    assert isinstance(route.package, CompiledPackage) and not route.deferred


def test_the_second_route_loads_on_the_first_call_it_accepts(urza_copy: Path) -> None:
    small, big = two_routes(urza_copy)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    first, second = kernel.routes
    assert (first.entry.id, second.entry.id) == (small.id, big.id)
    assert isinstance(first.package, CompiledPackage)
    assert isinstance(second.package, DeferredPackage) and second.deferred
    assert kernel.route == COMPILED
    eager = kernel.build_eager()
    with torch.no_grad():
        x = torch.randn(3, 8)
        torch.testing.assert_close(kernel(x), eager(x))  # the first route: no load
        assert kernel.last_path == COMPILED and kernel.routes[1].deferred
        x = torch.randn(9, 8)
        torch.testing.assert_close(kernel(x), eager(x))
    assert kernel.last_path == COMPILED
    assert isinstance(kernel.routes[1].package, CompiledPackage)  # the deferred wrapper is gone
    assert kernel.routes[1].package is not kernel.routes[0].package


def test_a_deferred_route_verifies_before_it_loads(urza_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order at first use is the load path's: the digest check, then the C++ loader."""
    two_routes(urza_copy)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    steps: list[str] = []
    real_verify = store_module.ArtifactStore.verify
    real_init = CompiledPackage.__init__

    def verify(self, checksum, size=None, **kw):  # type: ignore[no-untyped-def]
        steps.append("verify")
        return real_verify(self, checksum, size, **kw)

    def init(self, *a, **kw):  # type: ignore[no-untyped-def]
        steps.append("load")
        real_init(self, *a, **kw)

    monkeypatch.setattr(store_module.ArtifactStore, "verify", verify)
    monkeypatch.setattr(CompiledPackage, "__init__", init)
    with torch.no_grad():
        kernel(torch.randn(9, 8))
        kernel(torch.randn(10, 8))
    assert steps == ["verify", "load"]


@pytest.mark.parametrize("remembered", [False, True], ids=["hashed-at-load", "digest-remembered-at-load"])
def test_an_artifact_damaged_after_load_runs_that_route_eager_with_one_warning(
    urza_copy: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, remembered: bool
) -> None:
    """The seeded defect: the second route's artifact is corrupted after load. Its first call (and every one
    after) runs eager, one WARNING with reason ``integrity``; the first route stays compiled."""
    if remembered:  # the load's hash is remembered: the damage must still be seen (the file's identity moved)
        monkeypatch.setattr(store_module, "RACY_SECONDS", 0.0)
    _, big = two_routes(urza_copy)
    caplog.set_level(logging.INFO, "esper.kasmina")
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    corrupt(artifact(urza_copy, big))
    eager = kernel.build_eager()
    with torch.no_grad():
        for batch in (9, 17, 9):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(kernel(x), eager(x))
            assert kernel.last_path == EAGER
        kernel(torch.randn(2, 8))
        assert kernel.last_path == COMPILED  # the first route was loaded before the damage
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].esper["reason"] == telemetry.INTEGRITY  # type: ignore[attr-defined]
    assert f"entry #{big.id}" in warnings[0].getMessage() and "checksum mismatch" in warnings[0].getMessage()
    assert kernel.routes[1].package is None and kernel.route == COMPILED


def test_a_second_kernel_does_not_hash_a_remembered_artifact_again(
    urza_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RACY_SECONDS", 0.0)
    kasmina = Kasmina(urza_copy, blueprint_paths=[TINY])
    kasmina.load("tiny_mlp")
    hashed: list[Path] = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda p: hashed.append(p) or real(p))
    kernel = kasmina.load("tiny_mlp")
    assert kernel.route == COMPILED and hashed == []


def test_binding_a_seed_loads_the_deferred_routes_first(urza_copy: Path) -> None:
    two_routes(urza_copy)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load_seeds("tiny_mlp")
    assert kernel.routes[1].deferred
    swappable = set(kernel.routes[0].entry.meta["constants"])  # Inductor may fold the others into the code
    state = {k: v + 1 if k in swappable else v for k, v in kernel.build_eager().state_dict().items()}
    seed = kernel.bind(state)
    assert not any(r.deferred for r in kernel.routes)
    module = kernel.build_eager()
    module.load_state_dict(state)
    with torch.no_grad():
        x = torch.randn(9, 8)
        torch.testing.assert_close(seed(x), module(x))
    assert seed.last_path == COMPILED


def test_hooks_on_a_kernel_still_run(urza_copy: Path) -> None:
    """Kernel.__call__ skips nn.Module's call machinery only while no hook is registered."""
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    seen: list[tuple[int, ...]] = []
    handle = kernel.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    global_handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(("pre", m is kernel)) if m is kernel else None  # type: ignore[func-returns-value]
    )
    try:
        with torch.no_grad():
            kernel(torch.randn(3, 8))
    finally:
        handle.remove()
        global_handle.remove()
    with torch.no_grad():
        kernel(torch.randn(3, 8))
    assert seen == [("pre", True), (3, 8)]


def test_non_contiguous_and_tuple_inputs_reach_the_runner_contiguous(urza_copy: Path) -> None:
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    eager = kernel.build_eager()
    x = torch.randn(8, 6).t()  # (6, 8), not contiguous
    assert not x.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), eager(x))
        assert kernel.last_path == COMPILED
        package = kernel.routes[0].package
        assert isinstance(package, CompiledPackage)
        torch.testing.assert_close(package((x.contiguous(),)), eager(x))  # the runner takes a tuple
