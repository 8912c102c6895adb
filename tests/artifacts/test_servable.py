"""Tensors the guard must not pass to compiled code, keyword arguments bound by
input name, and pins of the private torch calls esper.artifacts.servable relies on."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from esper.artifacts import servable
from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard, bind_arguments, compile_check, compile_predicate

SCHEMA = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=8), DimGuard(size=4))),))
ACCEPTS = compile_predicate(SCHEMA)
CHECK = compile_check(SCHEMA)


class Sub(torch.Tensor):
    pass


def sparse_csr() -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        return torch.randn(2, 4).to_sparse_csr()


def quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # quantized tensor creation is deprecated in 2.13
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.randn(2, 4), 0.1, 0, torch.qint8)


def refused(args: tuple[Any, ...], fragment: str) -> None:
    assert ACCEPTS(args) is False
    why = CHECK(args)
    assert why is not None and fragment in why, why


def test_plain_tensors_and_parameters_are_accepted() -> None:
    assert ACCEPTS((torch.randn(2, 4),)) and CHECK((torch.randn(2, 4),)) is None
    p = torch.nn.Parameter(torch.randn(2, 4))
    assert ACCEPTS((p,)) and CHECK((p,)) is None
    assert ACCEPTS((torch.randn(4, 2).t(),))  # a strided, non-contiguous view is a plain tensor


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: torch.randn(2, 4).as_subclass(Sub), "tensor subclass (Sub)"),
        (lambda: torch._neg_view(torch.randn(2, 4)), "negative-bit view"),
        (lambda: torch.randn(2, 4, dtype=torch.complex64).conj().imag, "negative-bit view"),
        (lambda: torch.randn(2, 4).to_sparse(), "layout torch.sparse_coo"),
        (sparse_csr, "layout torch.sparse_csr"),
        (lambda: torch.randn(2, 4).to_mkldnn(), "layout torch._mkldnn"),
        (lambda: torch.randn(2, 4, device="meta"), "guard requires cpu"),
        (quantized, "dtype torch.qint8"),
        (lambda: torch.randn(2, 4, dtype=torch.complex64).conj(), "dtype torch.complex64"),
    ],
)
def test_tensors_compiled_code_cannot_serve_are_refused(make: Callable[[], torch.Tensor], fragment: str) -> None:
    refused((make(),), fragment)


def test_nested_tensors_are_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nt = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)])
    assert ACCEPTS((nt,)) is False and CHECK((nt,)) is not None


# torch loads its forward-AD decompositions with torch.jit.script on first use, which warns in 2.13.
TORCH_JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@TORCH_JIT_WARNING
def test_forward_mode_dual_tensors_are_refused() -> None:
    x = torch.randn(2, 4)
    with fwAD.dual_level():
        refused((fwAD.make_dual(x, torch.ones_like(x)),), "forward-mode dual tensor")
        assert ACCEPTS((x,)) and CHECK((x,)) is None  # a plain tensor inside a dual level is fine


@TORCH_JIT_WARNING
def test_functorch_wrapped_tensors_are_refused() -> None:
    seen: list[tuple[bool, str | None]] = []

    def probe(t: torch.Tensor) -> torch.Tensor:
        seen.append((ACCEPTS((t.reshape(2, 4),)), CHECK((t.reshape(2, 4),))))
        return t.sum()

    torch.func.vmap(probe)(torch.randn(3, 8))
    torch.func.grad(probe)(torch.randn(8))
    torch.func.jvp(probe, (torch.randn(8),), (torch.randn(8),))
    assert len(seen) == 3
    for accepted, why in seen:
        assert accepted is False and why is not None and "torch.func transform" in why


def test_cuda_schemas_check_the_exact_device_index() -> None:
    cuda = GuardSchema(inputs=SCHEMA.inputs, device="cuda")
    from esper.artifacts import guards

    assert "get_device() != 1" in guards._predicate_source(cuda, device_index=1)
    assert "get_device()" not in guards._predicate_source(cuda)
    assert "get_device()" not in guards._predicate_source(SCHEMA, device_index=0)  # CPU: no index


def test_private_torch_calls_are_pinned() -> None:
    """esper.artifacts.servable reads these; if torch moves them, this fails before the guard silently weakens."""
    assert fwAD._current_level == -1
    with fwAD.dual_level():
        assert fwAD._current_level == 0
    assert servable.dual_level() == -1
    assert torch._C._functorch.is_functorch_wrapped_tensor(torch.randn(2)) is False
    assert servable.functorch_wrapped(torch.randn(2)) is False


def test_keyword_arguments_are_bound_by_input_name() -> None:
    two = GuardSchema(
        inputs=(
            InputGuard("x", "float32", (DimGuard(size=4),)),
            InputGuard("mask", "bool", (DimGuard(size=4),)),
        )
    )
    x, m = torch.randn(4), torch.ones(4, dtype=torch.bool)
    assert bind_arguments(two, (x,), {"mask": m}) == (x, m)
    assert bind_arguments(two, (), {"mask": m, "x": x}) == (x, m)
    assert bind_arguments(two, (x, m), {}) == (x, m)
    with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
        bind_arguments(two, (x,), {"y": m})
    with pytest.raises(TypeError, match="multiple values for input 'x'"):
        bind_arguments(two, (x,), {"x": x})
    with pytest.raises(TypeError, match="missing inputs: mask"):
        bind_arguments(two, (), {"x": x})
    with pytest.raises(TypeError, match="got 3 positional"):
        bind_arguments(two, (x, m, m), {"x": x})
