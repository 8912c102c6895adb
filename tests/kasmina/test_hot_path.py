"""The inference kernel's hot path (Kernel.__call__ serving an accepted call inline): every call is still
guarded, and each condition that sends a call elsewhere does so however many accepted calls came before it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.kasmina import COMPILED, EAGER
from esper.kasmina.kernel import DeferredPackage, Kernel, Route
from esper.kasmina.unusable import Unusable


class FakePackage:
    """Stands in for compiled code: the eager module's function, recording what it was given."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.seen: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, args: Sequence[torch.Tensor]) -> Any:
        self.seen.append(tuple(args))
        return self.module(*args) * 1.0  # a fresh tensor, as compiled code returns


def kernel_with(package: Any, module: torch.nn.Module) -> Kernel:
    schema = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=4), DimGuard(size=8))),))
    route = Route.of(SimpleNamespace(guards=schema, meta={}, profile="batch=1-4", variant="default", id=1), package)  # type: ignore[arg-type]
    return Kernel("bp", eager_factory=lambda: module, routes=[route], reason="test")


@pytest.fixture
def module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Tanh().eval()  # any dtype and layout: eager runs whatever the guard refuses


def test_repeated_accepted_calls_do_not_let_a_changed_input_through(
    module: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    """After many accepted calls at one shape, a call whose dtype, device-independent form, contiguity or size
    changed is judged afresh: eager (with a WARNING) where the guard refuses, compiled on a contiguous copy
    where only the layout differs."""
    package = FakePackage(module)
    kernel = kernel_with(package, module)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(5):
            torch.testing.assert_close(kernel(x), module(x))
            assert kernel.last_path == COMPILED
        assert len(package.seen) == 5 and package.seen[-1][0] is x  # the clean twin: the caller's tensor, as is
        with caplog.at_level(logging.WARNING):
            for changed in (x.double(), torch.randn(5, 8), torch.randn(3, 9), x.to_sparse()):
                kernel(changed)
                assert kernel.last_path == EAGER, changed.shape
        assert len(package.seen) == 5
        assert any("outside guard range" in r.getMessage() for r in caplog.records)
        strided = torch.randn(8, 3).t()  # accepted shape, not contiguous
        torch.testing.assert_close(kernel(strided), module(strided))
        assert kernel.last_path == COMPILED and package.seen[-1][0].is_contiguous()
        assert not strided.is_contiguous()  # the caller's tensor is left alone
        kernel(x)
        assert kernel.last_path == COMPILED
    assert kernel.calls == {COMPILED: 7, EAGER: 4}


def test_modes_and_grad_send_an_accepted_call_eager(module: torch.nn.Module) -> None:
    """Grad through the inputs, autocast and a TorchFunctionMode each run eager on the hot path; the same call
    with none of them runs compiled."""
    package = FakePackage(module)
    kernel = kernel_with(package, module)
    x = torch.randn(2, 8)
    leaf = x.clone().requires_grad_()
    kernel(leaf)
    assert kernel.last_path == EAGER and not package.seen
    with torch.no_grad():
        kernel(leaf)
    assert kernel.last_path == COMPILED and len(package.seen) == 1
    kernel(x)  # grad on, but nothing requires it
    assert kernel.last_path == COMPILED
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kernel(x)
    assert kernel.last_path == EAGER
    with torch.no_grad(), torch.device("cpu"):
        kernel(x)
    assert kernel.last_path == EAGER
    with torch.no_grad():
        kernel(x)
    assert kernel.last_path == COMPILED and len(package.seen) == 3


def test_a_hook_on_the_kernel_takes_module_call_and_is_still_served(module: torch.nn.Module) -> None:
    package = FakePackage(module)
    kernel = kernel_with(package, module)
    seen: list[int] = []
    handle = kernel.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    x = torch.randn(4, 8)
    with torch.no_grad():
        kernel(x)
        assert seen == [4] and kernel.last_path == COMPILED
        handle.remove()
        kernel(x)
    assert seen == [4] and len(package.seen) == 2


def test_a_deferred_package_is_loaded_once_then_called_directly(
    module: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    package = FakePackage(module)
    loads: list[int] = []

    def load() -> Any:
        loads.append(1)
        return package

    kernel = kernel_with(DeferredPackage(load, "entry #1"), module)
    x = torch.randn(1, 8)
    with torch.no_grad():
        assert kernel(torch.randn(9, 8)) is not None and not loads  # refused: nothing loaded
        for _ in range(3):
            torch.testing.assert_close(kernel(x), module(x))
    assert loads == [1] and len(package.seen) == 3 and kernel.routes[0].package is package

    def broken() -> Any:
        raise Unusable("load-failed", "entry #2: cannot load")

    failing = kernel_with(DeferredPackage(broken, "entry #2"), module)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        for _ in range(2):
            torch.testing.assert_close(failing(x), module(x))
            assert failing.last_path == EAGER
    assert sum("cannot load" in r.getMessage() for r in caplog.records) == 1


def test_a_copy_of_a_kernel_calls_its_own_packages(module: torch.nn.Module) -> None:
    """A deep copy's hot path serves the copy's routes (whose packages a copy may copy, as a seed's are), not
    the runners the original's dispatcher was built with. Seeded defect: the copy sharing the original's
    dispatcher and runners sends its calls to the original's package."""
    import copy

    kernel = kernel_with(FakePackage(module), module)
    twin = copy.deepcopy(kernel)
    original, copied = kernel.routes[0].package, twin.routes[0].package
    assert isinstance(original, FakePackage) and isinstance(copied, FakePackage) and copied is not original
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), module(x))
        torch.testing.assert_close(kernel(x), module(x))
    assert twin.last_path == kernel.last_path == COMPILED
    assert len(copied.seen) == 1 and len(original.seen) == 1


class _PassThroughDispatch(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


# torch loads its forward-AD decompositions with torch.jit.script on first use, which warns in 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_what_the_fast_check_passes_on_is_judged_in_full(module: torch.nn.Module) -> None:
    """Calls the dispatcher's one C call does not pass take the full checks: a dispatch mode, a forward-AD
    level, a negative-bit view and a vmap run eager; a Parameter and an inference tensor run compiled."""
    package = FakePackage(module)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # built here, the kernel still expects a plain thread
        kernel = kernel_with(package, module)
    with torch.no_grad():
        for enter in (lambda: torch.autocast("cpu", dtype=torch.bfloat16), _PassThroughDispatch):
            with enter():
                kernel(x)
            assert kernel.last_path == EAGER
        with fwAD.dual_level():
            kernel(fwAD.make_dual(x, torch.ones_like(x)))
            assert kernel.last_path == EAGER
        kernel(torch._neg_view(x))
        assert kernel.last_path == EAGER
        torch.vmap(kernel)(torch.randn(3, 2, 8))
        assert kernel.last_path == EAGER and not package.seen
        kernel(torch.nn.Parameter(x.clone()))
        assert kernel.last_path == COMPILED
        with torch.inference_mode():
            kernel(torch.randn(2, 8))
        assert kernel.last_path == COMPILED
        kernel(x)
        assert kernel.last_path == COMPILED and len(package.seen) == 3
