"""Hostile inputs to a loaded kernel: random shapes, dtypes, ranks, devices, strides, zero-size tensors,
non-tensors and wrong argument counts. Each call either runs compiled with parity, or runs eager (with a
WARNING naming the reason) giving what the eager module gives, including the eager module's own exception
for inputs it rejects. The compiled code never sees an input its guards do not allow."""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.artifacts.runtime import CompiledPackage
from esper.kasmina import COMPILED, EAGER, Kasmina, Kernel
from tests.support import TINY

pytestmark = pytest.mark.compiles

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8)
DTYPES += (torch.bool, torch.complex64)
LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "offset")
CASES: Counter[str] = Counter()


def accepted(args: tuple[Any, ...]) -> bool:
    """tiny_mlp's guard schema, written independently of the guard code: x: float32[1..32, 8] on cpu."""
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return False
    x = args[0]
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() == 2
        and 1 <= x.shape[0] <= 32
        and x.shape[1] == 8
    )


def _values(shape: list[int], dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    return torch.randint(0, 100, shape, generator=gen, dtype=dtype)


def make_tensor(shape: list[int], dtype: torch.dtype, device: str, layout: str, seed: int) -> torch.Tensor:
    """A tensor of exactly ``shape``, laid out as ``layout`` (all but "contiguous" give odd strides)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed" and len(shape) >= 2:
        swapped = [*shape[:-2], shape[-1], shape[-2]]
        t = _values(swapped, dtype, device, gen).transpose(-1, -2)
    elif layout == "strided" and shape:
        t = _values([2 * shape[0], *shape[1:]], dtype, device, gen)[::2]
    elif layout == "expanded" and shape:
        t = _values([1, *shape[1:]], dtype, device, gen).expand(shape)
    elif layout == "offset":
        n = 1
        for s in shape:
            n *= s
        t = _values([n + 3], dtype, device, gen)[3:].view(shape)
    else:
        t = _values(shape, dtype, device, gen)
    assert list(t.shape) == list(shape)
    return t


@st.composite
def tensors(draw: st.DrawFn, *, near_guards: bool) -> torch.Tensor:
    if near_guards:  # mostly what the guards allow, so that the compiled path is well exercised
        shape = [draw(st.integers(0, 40)), draw(st.sampled_from([8] * 12 + [7, 9, 0]))]
        dtype = draw(st.sampled_from([torch.float32] * 30 + list(DTYPES)))
        device = draw(st.sampled_from(["cpu"] * 12 + ["meta"]))
    else:
        shape = draw(st.lists(st.integers(0, 40) | st.just(8), min_size=0, max_size=4))
        dtype = draw(st.sampled_from(DTYPES))
        device = draw(st.sampled_from(["cpu", "meta"]))
    t = make_tensor(shape, dtype, device, draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 2**16)))
    if (dtype.is_floating_point or dtype.is_complex) and draw(st.integers(0, 3)) == 0:
        t = t.detach().requires_grad_(True)
    return t


NON_TENSORS = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.lists(st.floats(-1, 1), max_size=8),
)
ARGS = st.one_of(
    st.tuples(tensors(near_guards=True)),
    st.tuples(tensors(near_guards=True)),
    st.tuples(tensors(near_guards=False)),
    st.lists(tensors(near_guards=False) | NON_TENSORS, min_size=0, max_size=3).map(tuple),
)


@pytest.fixture(scope="module")
def kernel(compiled_urza: Path) -> Kernel:
    k = Kasmina(compiled_urza, blueprint_paths=[TINY]).load("tiny_mlp")
    assert k.route == COMPILED
    return k


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    from esper.catalog import load_catalog

    return load_catalog([TINY]).get("tiny_mlp").build()


@pytest.fixture
def compiled_sees(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, ...]]]:
    """Every argument list that reaches compiled code; each is checked against the schema as it arrives."""
    seen: list[tuple[Any, ...]] = []
    real = CompiledPackage.__call__

    def spy(self: CompiledPackage, args: Any) -> Any:
        args = tuple(args)
        assert accepted(args) and all(a.is_contiguous() for a in args), "compiled code was handed a refused input"
        seen.append(args)
        return real(self, args)

    monkeypatch.setattr(CompiledPackage, "__call__", spy)
    yield seen


def _call(fn: Any, args: tuple[Any, ...]) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args), None
    except Exception as e:  # the eager module's own refusal is a legitimate outcome: compared below
        return None, e


def test_hostile_inputs_never_crash_or_reach_compiled_code(
    kernel: Kernel, reference: torch.nn.Module, compiled_sees: list[tuple[Any, ...]]
) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("esper.kasmina").addHandler(handler)

    @given(args=ARGS, grad=st.booleans())
    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def case(args: tuple[Any, ...], grad: bool) -> None:
        ok = accepted(args)
        why = kernel.check(*args)
        assert (why is None) == ok, (why, args)
        needs_grad = ok and grad and args[0].requires_grad
        compiled_before = kernel.calls[COMPILED]
        with torch.set_grad_enabled(grad):
            want, want_error = _call(reference, args)
            got, got_error = _call(kernel, args)
        if ok and not needs_grad:
            assert got_error is None and kernel.last_path == COMPILED
            assert kernel.calls[COMPILED] == compiled_before + 1
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            CASES["compiled, parity"] += 1
            return
        assert kernel.last_path == EAGER and kernel.calls[COMPILED] == compiled_before
        reason = "inputs require grad" if needs_grad else why
        # One WARNING per kind of refusal: the same refusal at another size is not logged again.
        assert any(_kind(reason) in _kind(r.getMessage()) for r in records), f"no WARNING says {reason!r}"
        if want_error is not None:
            assert type(got_error) is type(want_error) and str(got_error) == str(want_error)
            CASES["eager, the eager module's own error"] += 1
            return
        assert got_error is None and got.shape == want.shape and got.dtype == want.dtype
        assert got.device == want.device
        if got.device.type == "cpu":
            torch.testing.assert_close(got.detach(), want.detach(), equal_nan=True)
        CASES["eager, same output"] += 1

    try:
        case()
    finally:
        logging.getLogger("esper.kasmina").removeHandler(handler)
    messages = [_kind(r.getMessage()) for r in records if r.levelno == logging.WARNING]
    assert len(messages) == len(set(messages)), "a WARNING was repeated for the same kind of refusal"
    print(f"\nhostile input cases: {sum(CASES.values())} ({dict(CASES)}); compiled calls checked: {len(compiled_sees)}")
    assert CASES["compiled, parity"] >= 10 and sum(CASES.values()) - CASES["compiled, parity"] >= 10


def _kind(message: str) -> str:
    return re.sub(r"\d+", "N", message)


def test_kernel_guard_accepts_exactly_the_schema_shapes(kernel: Kernel) -> None:
    """Exhaustive over ranks 0-3 and sizes around every boundary of the schema."""
    sizes = (0, 1, 7, 8, 9, 31, 32, 33)
    n = 0
    for rank in range(4):
        for shape in itertools.product(sizes, repeat=rank):
            x = torch.empty(shape)
            assert (kernel.check(x) is None) == accepted((x,)), shape
            n += 1
    assert n == 1 + 8 + 64 + 512
