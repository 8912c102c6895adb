"""Tensors the guard must not pass to compiled code, keyword arguments bound by
input name, and pins of the private torch calls esper.artifacts.servable relies on."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from esper.artifacts import servable
from esper.artifacts.guards import (
    DimGuard,
    GuardSchema,
    InputGuard,
    bind_arguments,
    compile_check,
    compile_dispatch,
    compile_predicate,
)

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
    assert servable.tensor_match([(torch.float32, [None])], "cpu") is not None  # else every call takes the slow way


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


PLAIN_STATES: list[tuple[str, Callable[[], Any]]] = [
    ("autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    ("a dispatch mode", lambda: _PassThroughDispatch()),
    ("inference mode", torch.inference_mode),
]


class _PassThroughDispatch(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def test_tensor_match_passes_only_plain_inputs_on_a_plain_thread() -> None:
    """The fast path's one C call: a plain float32 tensor of the rank given passes, whatever its sizes and
    strides where they are left open; anything the Python tests would look at twice (or refuse) does not."""
    match = servable.tensor_match([(torch.float32, [None, None]), (torch.float32, [None])], "cpu")
    assert match is not None
    x, b = torch.randn(3, 4), torch.randn(4)
    assert match(x, b) and match(torch.randn(9, 2).t(), torch.randn(7))
    others = [
        x.double(),
        x.clone().requires_grad_(),
        torch._neg_view(x),
        torch.nn.Parameter(x.clone()),
        Sub(x),
        x.to_sparse(),
        torch.randn(3, 4, 1),
        sparse_csr(),
    ]
    for other in others:
        assert not match(other, b), other
    with torch.inference_mode():
        assert not match(torch.randn(3, 4), b)  # an inference tensor takes the Python tests
    assert torch.vmap(lambda t: torch.tensor(match(t, b)))(torch.randn(2, 3, 4)).any().item() is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not match(x, b)
    with _PassThroughDispatch():
        assert not match(x, b)
    assert match(x, b)  # the clean twin, after all of the above


def test_tensor_match_checks_the_sizes_it_is_given() -> None:
    """Sizes given are checked exactly, sizes left ``None`` not at all, and strides not unless given."""
    match = servable.tensor_match([(torch.float32, [None, 4]), (torch.float32, [2])], "cpu")
    assert match is not None
    b = torch.randn(2)
    assert match(torch.randn(3, 4), b) and match(torch.randn(9, 4), b) and match(torch.randn(4, 9).t()[:, :4], b)
    assert not match(torch.randn(3, 5), b)
    assert not match(torch.randn(3, 4), torch.randn(3))
    assert not match(torch.randn(3, 4, 1), b)


def test_tensor_match_checks_the_strides_it_is_given() -> None:
    """An input given strides passes only with exactly those (a contiguous tensor of any batch); another input
    of the same call is not held to any. A size-1 dim laid out otherwise is contiguous to torch and still
    refused: a refusal only sends the call the slow way. Seeded defect: the same check without the strides
    passes every one of the views."""
    laid = servable.tensor_match([(torch.float32, [None, 4]), (torch.float32, [2])], "cpu", strides=[(4, 1)])
    loose = servable.tensor_match([(torch.float32, [None, 4]), (torch.float32, [2])], "cpu")
    assert laid is not None and loose is not None
    b = torch.randn(2)
    for x in (torch.randn(3, 4), torch.randn(1, 4), torch.randn(64, 4)):
        assert laid(x, b) and loose(x, b)
    assert laid(torch.randn(3, 4), torch.randn(4)[::2])  # the second input's layout is not checked
    views = (torch.randn(4, 3).t(), torch.randn(3, 8)[:, ::2], torch.randn(4, 1).t())
    for v in views:
        assert loose(v, b) and not laid(v, b), v.stride()
    with pytest.raises(ValueError, match="one stride per dim"):
        servable.tensor_match([(torch.float32, [None, 4])], "cpu", strides=[(4,)])
    with pytest.raises(ValueError, match="one stride per dim"):
        servable.tensor_match([(torch.float32, [None, 4])], "cpu", strides=[(4, 1), (1,)])


@pytest.mark.parametrize(("state", "enter"), PLAIN_STATES, ids=[s for s, _ in PLAIN_STATES])
def test_tensor_match_ignores_the_state_of_the_thread_that_builds_it(
    state: str, enter: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built while the loading thread has autocast, a dispatch mode or inference mode on, the check still
    expects a plain thread: calls in that state take the Python tests, plain calls pass. Seeded defect: the
    same check built on the loading thread itself passes calls made in that state."""
    x = torch.randn(3, 4)
    with enter():
        match = servable.tensor_match([(torch.float32, [None, None])], "cpu")
        assert match is not None
        y = torch.randn(3, 4)
        assert not match(y)
    assert match(x)

    class Inline:  # a "thread" that runs its target on the caller's
        def __init__(self, target: Callable[[], None], **_: Any) -> None:
            self.target = target

        def start(self) -> None:
            self.target()

        def join(self) -> None:
            pass

    monkeypatch.setattr(servable.threading, "Thread", Inline)
    with enter():
        naive = servable.tensor_match([(torch.float32, [None, None])], "cpu")
        assert naive is not None and naive(torch.randn(3, 4))


@TORCH_JIT_WARNING
def test_fast_dispatch_answers_what_the_plain_one_does() -> None:
    """The fast dispatcher's answer is the plain one's, plus twice the route count exactly where the call is in
    a compiled cell with plain inputs on a plain thread: never another route, never a refused call."""
    schemas = [
        GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=lo, max=hi), DimGuard(size=4))),))
        for lo, hi in ((1, 4), (5, 8))
    ]
    plain = compile_dispatch(schemas)
    fast = compile_dispatch(schemas, fast=True)
    assert plain is not None and fast is not None
    x = torch.randn(3, 4)
    cases: list[tuple[tuple[Any, ...], Callable[[], Any], bool]] = [
        ((x,), contextlib.nullcontext, True),
        ((torch.randn(6, 4),), contextlib.nullcontext, True),
        ((torch.randn(9, 4),), contextlib.nullcontext, False),
        ((x.double(),), contextlib.nullcontext, False),
        ((x.clone().requires_grad_(),), contextlib.nullcontext, False),
        ((torch.nn.Parameter(x.clone()),), contextlib.nullcontext, False),
        ((torch._neg_view(x),), contextlib.nullcontext, False),
        ((x,), lambda: torch.autocast("cpu", dtype=torch.bfloat16), False),
        ((x,), lambda: torch.device("cpu"), False),  # a torch function mode
        ((x,), fwAD.dual_level, False),
        ((x,), _PassThroughDispatch, False),
        ((x, x), contextlib.nullcontext, False),
        ((torch.randn(3, 5),), contextlib.nullcontext, False),
        ((torch.randn(4, 3).t(),), contextlib.nullcontext, False),  # the caller's layout check is not skipped
        ((torch.randn(3, 8)[:, ::2],), contextlib.nullcontext, False),
        ((torch.randn(3, 4, 1),), contextlib.nullcontext, False),
    ]
    for args, enter, verified in cases:
        with enter():
            want, got = plain(args), fast(args)
        if verified:
            assert 0 <= want < 2 and got == want + 4, (args, enter)
        else:
            assert got == want, (args, enter)


@TORCH_JIT_WARNING
def test_fast_dispatch_hands_out_a_routes_runner_exactly_where_it_answers_fast() -> None:
    """Given a runner for a route, the fast dispatcher returns it (the object itself) where it would answer
    that route ``+ 2 * len(schemas)``, and its plain answer everywhere else: another route's fast answer, a
    refused call, a call in an eager cell or one it cannot vouch for. Inputs whose strides depend on a dynamic
    size are still tested for contiguity."""
    batch, seq = DimGuard(name="batch", min=1, max=8), DimGuard(name="seq", min=1, max=8)
    for dims in ((batch, DimGuard(size=4)), (batch, seq, DimGuard(size=4))):
        schemas = [
            GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=lo, max=hi), *dims[1:])),))
            for lo, hi in ((1, 4), (5, 8))
        ]
        runner = object()
        fast = compile_dispatch(schemas, fast=True)
        served = compile_dispatch(schemas, fast=True, runners=[runner])
        assert fast is not None and served is not None
        shape = [3, 4] if len(dims) == 2 else [3, 2, 4]
        x = torch.randn(*shape)
        assert fast((x,)) == 4 and served((x,)) is runner
        other = torch.randn(6, *shape[1:])
        assert fast((other,)) == served((other,)) == 5  # no runner for the second route
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert served((x,)) == fast((x,)) == 0
        for refused in (x.double(), torch.randn(9, *shape[1:])):
            assert served((refused,)) == fast((refused,)) == -1
        scattered = torch.randn(*reversed(shape)).permute(*reversed(range(len(shape))))
        assert not scattered.is_contiguous() and served((scattered,)) == fast((scattered,)) == 0
    with pytest.raises(ValueError, match="runners"):
        compile_dispatch(schemas, fast=True, runners=[runner, runner, runner])


@TORCH_JIT_WARNING
def test_fast_dispatch_reads_a_shared_dim_once_and_holds_inputs_to_it() -> None:
    """Two inputs sharing a dynamic dim: the fast way in answers only where their sizes agree (the full tests
    refuse the rest), and checks the fixed sizes of an input with no dynamic dim (``match`` alone reads them)."""
    batch = DimGuard(name="batch", min=1, max=8)
    schema = GuardSchema(
        inputs=(
            InputGuard("x", "float32", (batch, DimGuard(size=4))),
            InputGuard("m", "float32", (batch,)),
            InputGuard("w", "float32", (DimGuard(size=2), DimGuard(size=3))),
        )
    )
    plain, fast = compile_dispatch([schema]), compile_dispatch([schema], fast=True)
    assert plain is not None and fast is not None
    w = torch.randn(2, 3)
    assert plain((torch.randn(5, 4), torch.randn(5), w)) == 0 and fast((torch.randn(5, 4), torch.randn(5), w)) == 2
    for args in (
        (torch.randn(5, 4), torch.randn(6), w),
        (torch.randn(5, 4), torch.randn(5), torch.randn(3, 2)),
        (torch.randn(9, 4), torch.randn(9), w),
    ):
        assert plain(args) == fast(args) == -1, [a.shape for a in args]
