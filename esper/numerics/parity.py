"""Compiled-vs-eager numeric comparison: the one parity rule (:func:`judge`) that Tezzeret's compile-time checks and
certification both apply, and the float64 reference it judges against."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree


@dataclass
class ParityStats:
    """Running totals over the cases a certification compared."""

    cases: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    # Cases whose output passed only against the spread of eager's legitimate executions (ill-conditioned).
    calibrated: int = 0

    def add(self, abs_err: float, rel_err: float) -> None:
        self.cases += 1
        self.max_abs = max(self.max_abs, abs_err)
        self.max_rel = max(self.max_rel, rel_err)


# ---------------------------------------------------------------------------------------------------------
# Sound parity: compiled and eager both judged against a float64 reference.
# ---------------------------------------------------------------------------------------------------------

# How many times eager's own worst float32 error (against float64) widens the declared atol in the pointwise
# rule of :func:`judge`. Same figure as ``esper.numerics.gradients.SLACK``: an honest kernel's worst element is within
# a few times eager's worst; a wrong one is off by the value's own magnitude.
POINTWISE_SLACK = 32.0
# The RMSE rule's floor, in units of the output dtype's machine epsilon times the reference's RMS. Where
# eager happens to be exact (error 0) an honest kernel may still round differently (an ulp <= eps * |x|);
# and a reduction feeding a gate can amplify a reordered sum: measured, squeeze_excitation's compiled
# package at 1e3-scale inputs reaches RMSE 2.4e-4 = 5.3x eager's own, about 2 ulps of the output's RMS.
# Losing precision (a bfloat16 step) costs thousands of ulps.
FLOOR_ULPS = 4.0


# How much more rounding a training step's gradients and mutated buffers may show than an output, relative to
# eager's own: each is a sum over the batch and every position, in whatever order the compiled backward chose,
# and eager's order is one sample of that rounding. Measured: squeeze_excitation's input gradient at 1e3-scale
# inputs came out at 3.1x eager's RMSE against float64 (ulp-level noise); the seeded wrong-gradient and
# wrong-buffer defects come out at 1e7x, so a factor of 4 separates them with room to spare.
REDUCTION = 4.0
# The parts of a training step judged as reductions of the whole step.
REDUCED_PARTS = frozenset({"gradient", "buffer"})


def reduction_of(part: str) -> float:
    """The factor :func:`judge` widens a part's RMSE rule by: :data:`REDUCTION` for a training step's gradients
    and buffers, 1 for outputs."""
    return REDUCTION if part in REDUCED_PARTS else 1.0


def multiplier(numel: int, dtype: torch.dtype) -> float:
    """How many times eager's RMSE against float64 a compiled output may show, after
    ``torch._dynamo.utils.same`` (with ``use_larger_multiplier_for_smaller_tensor``): 2 for a float32
    tensor of 1000 elements or more, 3 under 1000 or for a half-precision dtype, 8 up to 500 elements and
    10 up to 10, where a handful of roundings dominate the RMSE."""
    m = 3.0 if dtype in (torch.float16, torch.bfloat16) else 2.0
    if numel <= 10:
        return 10.0
    if numel <= 500:
        return 8.0
    if numel < 1000:
        return max(m, 3.0)
    return m


@dataclass(frozen=True)
class OutputVerdict:
    """The judgement of one output tensor (see :func:`judge` for the rules)."""

    name: str
    passed: bool
    reason: str  # "<name>: <rule broken>", "" when passed
    numel: int = 0
    rmse_compiled: float = 0.0  # RMSE(compiled, fp64) over the elements finite in eager and fp64
    rmse_eager: float = 0.0  # RMSE(eager, fp64), same elements
    ratio: float = 1.0  # rmse_compiled / rmse_eager (1.0 when both are 0, inf when only eager is exact)
    allowed_rmse: float = 0.0  # multiplier * rmse_eager + floor
    max_abs: float = 0.0  # largest |compiled - eager| over finite elements
    allowed_abs: float = 0.0  # the pointwise rule's bound at the element closest to breaking it
    worst_diff: float = 0.0  # |compiled - eager| at that element (the rule breaks where it exceeds allowed_abs)
    eager_max_error: float = 0.0  # max |eager - fp64|, the sample the pointwise rule's slack multiplies
    slack: float = POINTWISE_SLACK  # that slack
    nonfinite_ok: bool = True  # NaN and +-inf where eager and float64 say they may (nonfinite_breach)
    resolved: bool = True  # the float64 value stands above eager's own rounding (RMSE rule applied)
    degenerate: bool = False  # the float64 reference equals eager bit for bit: it measured no rounding


@dataclass(frozen=True)
class ParityVerdict:
    """Whether a compiled output is as good as eager's, with the figures: the worst output's RMSE against
    float64 (compiled and eager) and their ratio, the largest difference to eager, NaN/inf placement, and
    every output's own :class:`OutputVerdict`. ``reason`` names the first failing output and the rule it
    broke ("" when passed)."""

    passed: bool
    reason: str
    rmse_compiled: float
    rmse_eager: float
    ratio: float
    max_abs: float
    nonfinite_ok: bool
    outputs: tuple[OutputVerdict, ...] = ()

    def degenerate(self) -> tuple[str, ...]:
        """The outputs whose float64 reference was bit-identical to eager (see :func:`judge`)."""
        return tuple(o.name for o in self.outputs if o.degenerate)

    def evidence(self) -> dict[str, Any]:
        """The figures as a JSON-safe dict for Urza evidence (a non-finite ratio becomes ``None``)."""
        return {
            "passed": self.passed,
            "reason": self.reason,
            "rmse_compiled": self.rmse_compiled,
            "rmse_eager": self.rmse_eager,
            "rmse_ratio": _finite_or_none(self.ratio),
            "max_abs": self.max_abs,
            "nonfinite_ok": self.nonfinite_ok,
            "degenerate_reference": list(self.degenerate()),
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _named_leaves(x: Any, label: str = "output") -> list[tuple[str, Any]]:
    flat, _ = pytree.tree_flatten_with_path(x)
    return [(f"{label}{pytree.keystr(path)}", leaf) for path, leaf in flat]


# The classes of an element for the non-finite rule (:func:`nonfinite_breach`), by the code :func:`value_classes` gives.
VALUE_CLASSES = ("finite", "NaN", "+inf", "-inf")


def value_classes(t: torch.Tensor) -> torch.Tensor:
    """Per element of a real floating tensor: 0 finite, 1 NaN, 2 +inf, 3 -inf (:data:`VALUE_CLASSES`)."""
    # masked_fill_ rather than boolean-index assignment: the latter gathers the indices first (several times
    # slower on a large output).
    k = t.isnan().to(torch.int8)
    k.masked_fill_(t == math.inf, 2)
    k.masked_fill_(t == -math.inf, 3)
    return k


def nonfinite_breach(c: torch.Tensor, e: torch.Tensor, x: torch.Tensor, *, atol: float, rtol: float) -> str:
    """Where NaN and +-inf may come out, judged against eager and the float64 reference together, never
    eager alone: "" when ``c`` (compiled) keeps the rule, else the count and the first element that breaks it.

    Per element of real floating tensors of one shape, with ``E``, ``X`` and ``C`` the classes (finite, NaN,
    +inf, -inf) of eager's, the reference's and the compiled value:

    1. ``E`` and ``X`` both finite: ``C`` finite (the value is the RMSE and pointwise rules' to judge).
    2. ``E`` and ``X`` both non-finite: ``C`` is ``E`` or ``X``. A finite compiled value hides a NaN or an inf
       both say is there: a fault.
    3. ``E`` non-finite, ``X`` finite (eager overflowed, or cancelled inf - inf, where float64 does not):
       ``C`` non-finite of any class (which intermediate overflows first depends on the evaluation order), or
       finite and within ``atol + rtol * |X|`` of the reference: a kernel that avoids eager's overflow is no
       fault.
    4. ``E`` finite, ``X`` non-finite: ``C`` finite (the value is judged where both references are finite,
       so here by nothing more) or ``X``.
    """
    kc, ke, kx = value_classes(c), value_classes(e), value_classes(x)
    finite_e, finite_x, finite_c = ke == 0, kx == 0, kc == 0
    bad = finite_e & finite_x & ~finite_c  # rule 1
    bad |= ~finite_e & ~finite_x & (kc != ke) & (kc != kx)  # rule 2
    avoided = ~finite_e & finite_x & finite_c
    if bool(avoided.any()):
        far = (c.double() - x.double()).abs() > atol + rtol * x.double().abs()
        bad |= avoided & far  # rule 3
    bad |= finite_e & ~finite_x & ~finite_c & (kc != kx)  # rule 4
    if not bool(bad.any()):
        return ""
    idx = tuple(int(i) for i in bad.nonzero()[0])
    what = (
        f"compiled {VALUE_CLASSES[int(kc[idx])]} where eager is {VALUE_CLASSES[int(ke[idx])]} and float64 "
        f"{VALUE_CLASSES[int(kx[idx])]}"
    )
    if int(kc[idx]) == 0 and int(kx[idx]) == 0:
        what += f" ({float(c[idx]):.6g} against float64's {float(x[idx]):.6g})"
    return f"non-finite placement differs: {int(bad.sum())} element(s), first at {list(idx)}: {what}"


# Elements per pass of :func:`error_sums`. Float64 temporaries of this size (256 KB) are reused from malloc's
# heap, while a whole-tensor temporary of a large output (8M elements, 64 MB) is a fresh mapping each time
# whose page faults cost more than the arithmetic. Measured on one thread, one 8M-element output: 2.6 s with
# whole-tensor masks and temporaries, 0.12 s in chunks of 2^15 (2^12: 0.34 s, Python overhead; 2^18: 0.28 s).
CHUNK = 1 << 15


@dataclass(frozen=True)
class ErrorSums:
    """One pass over compiled, eager and float64 values: the sums and extremes :func:`judge_tensor` needs."""

    sq_compiled: float  # sum (compiled - fp64)^2
    sq_eager: float  # sum (eager - fp64)^2
    sq_exact: float  # sum fp64^2
    max_eager_error: float  # max |eager - fp64|
    max_diff: float  # max |compiled - eager|
    worst_diff: float  # |compiled - eager| where |compiled - eager| - rtol * |eager| is largest
    worst_scaled: float  # rtol * |eager| there


def error_sums(
    c: torch.Tensor, e: torch.Tensor, f: torch.Tensor, rtol: float, keep: torch.Tensor | None = None
) -> ErrorSums:
    """:class:`ErrorSums` of finite ``c`` (compiled), ``e`` (eager) and ``f`` (float64) of one shape, in
    float64, a chunk of :data:`CHUNK` elements at a time; with ``keep`` (a boolean tensor of that shape), of the
    elements it holds true alone, the others counting for nothing (as if left out: a boolean gather of three
    large tensors costs more than the whole pass)."""
    c, e, f = c.reshape(-1), e.reshape(-1), f.reshape(-1)
    drop = None if keep is None else ~keep.reshape(-1)
    sq_c = sq_e = sq_f = max_err = max_diff = 0.0
    best, worst_diff, worst_scaled = -math.inf, 0.0, 0.0
    for start in range(0, c.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        c64, e64, f64 = c[part].to(torch.float64, copy=True), e[part].to(torch.float64, copy=True), f[part]
        gone = None if drop is None else drop[part]
        if gone is not None:
            c64.masked_fill_(gone, 0.0)
            e64.masked_fill_(gone, 0.0)
            f64 = f64.masked_fill(gone, 0.0)
        err_c, err_e = c64 - f64, e64 - f64
        sq_c += float(torch.dot(err_c, err_c))
        sq_e += float(torch.dot(err_e, err_e))
        sq_f += float(torch.dot(f64, f64))
        max_err = max(max_err, float(err_e.abs_().max()))
        diff = c64.sub_(e64).abs_()
        max_diff = max(max_diff, float(diff.max()))
        scaled = e64.abs_().mul_(rtol)
        excess = err_c.copy_(diff).sub_(scaled)
        if gone is not None:
            excess.masked_fill_(gone, -math.inf)
        i = int(excess.argmax())
        if float(excess[i]) > best:
            best, worst_diff, worst_scaled = float(excess[i]), float(diff[i]), float(scaled[i])
    return ErrorSums(sq_c, sq_e, sq_f, max_err, max_diff, worst_diff, worst_scaled)


def judge_tensor(
    name: str,
    compiled: torch.Tensor,
    eager: torch.Tensor,
    exact: torch.Tensor,
    *,
    atol: float,
    rtol: float,
    slack: float = POINTWISE_SLACK,
    floor_ulps: float = FLOOR_ULPS,
    reduction: float = 1.0,
) -> OutputVerdict:
    """Judge one output tensor; see :func:`judge`."""

    def verdict(passed: bool, reason: str, **figures: Any) -> OutputVerdict:
        return OutputVerdict(name, passed, f"{name}: {reason}" if reason else "", eager.numel(), **figures)

    if compiled.shape != eager.shape or compiled.dtype != eager.dtype:
        return verdict(
            False, f"compiled is {compiled.dtype} {list(compiled.shape)}, eager {eager.dtype} {list(eager.shape)}"
        )
    c, e, exact = compiled.detach().cpu(), eager.detach().cpu(), exact.detach().cpu()
    if e.is_complex():  # judge the real and imaginary parts as one real tensor
        c, e, exact = torch.view_as_real(c), torch.view_as_real(e), torch.view_as_real(exact.to(torch.complex128))
    if not e.is_floating_point():
        same = torch.equal(c, e)
        return verdict(same, "" if same else "a non-floating output differs from eager's")
    # Fast path: a NaN or an inf anywhere makes the sum non-finite; a finite sum leaves nothing to misplace and
    # nothing to mask (a sum that overflows on finite values just takes the exact path).
    all_finite = math.isfinite(float(c.sum())) and math.isfinite(float(e.sum()))
    f64 = exact if exact.dtype == torch.float64 else exact.double()
    mismatch = "" if all_finite else nonfinite_breach(c, e, f64, atol=atol, rtol=rtol)
    if mismatch:
        return verdict(False, mismatch, nonfinite_ok=False)
    finite: torch.Tensor | None = None
    n = c.numel()
    if not (all_finite and math.isfinite(float(f64.sum()))):
        # Where eager or the reference is non-finite, the rule above judged the compiled value.
        finite = torch.isfinite(e) & torch.isfinite(f64)
        n = int(finite.sum())
    if n == 0:
        return verdict(True, "")
    eps = torch.finfo(e.dtype).eps
    s = error_sums(c, e, f64, rtol, finite)
    r_c, r_e, rms = (math.sqrt(x / n) for x in (s.sq_compiled, s.sq_eager, s.sq_exact))
    floor = floor_ulps * eps * rms + torch.finfo(e.dtype).tiny
    m = multiplier(n, e.dtype) * reduction
    allowed_rmse = m * r_e + floor
    ratio = r_c / r_e if r_e > 0 else (1.0 if r_c == 0 else float("inf"))
    # The pointwise bound at the element closest to breaking it: atol + slack * max|eager - fp64| + rtol * |eager|.
    allowed_abs = atol + slack * s.max_eager_error + s.worst_scaled
    figures = dict(
        rmse_compiled=r_c,
        rmse_eager=r_e,
        ratio=ratio,
        allowed_rmse=allowed_rmse,
        max_abs=s.max_diff,
        allowed_abs=allowed_abs,
        worst_diff=s.worst_diff,
        eager_max_error=s.max_eager_error,
        slack=slack,
    )
    # Where the exact value is no larger than eager's own rounding (terms that cancel to ~0: a BatchNorm's
    # pre-normalisation bias gradient is exactly 0 in float64 and pure float32 noise), there is no signal
    # for the RMSE ratio to measure: two honest summation orders give noise of different size (measured:
    # tiny_bn's fc.bias gradient at batch 2, compiled 11.8x eager's, both ~1e-6 on a value of 0). The
    # pointwise rule still bounds such a tensor (a wrong value is off by far more than eager's rounding).
    resolved = rms > r_e
    figures["resolved"] = resolved
    # A degenerate reference (bit-identical to eager) measured none of eager's rounding: eager is exact there,
    # or the module computes in a precision the float64 run did not reach. Recorded: its ratio means nothing.
    figures["degenerate"] = r_e == 0.0
    if resolved and r_c > allowed_rmse:
        return verdict(
            False,
            f"RMSE against float64 {r_c:.3g} exceeds {m:g} x eager's own {r_e:.3g} + floor {floor:.3g} "
            f"(ratio {ratio:.3g})",
            **figures,
        )
    if s.worst_diff > allowed_abs:
        return verdict(
            False,
            f"differs from eager by {s.worst_diff:.3g} at a finite element, beyond atol + "
            f"{slack:g} x eager's worst float64 error + rtol x |eager| = {allowed_abs:.3g}",
            **figures,
        )
    return verdict(True, "", **figures)


def judge(
    compiled: Any,
    eager: Any,
    exact: Any,
    *,
    atol: float,
    rtol: float,
    slack: float = POINTWISE_SLACK,
    floor_ulps: float = FLOOR_ULPS,
    label: str = "output",
    reduction: float = 1.0,
) -> ParityVerdict:
    """Judge a compiled output (any pytree of tensors) against eager's output and the float64 ``exact``
    reference (eager run on a float64 copy, see :func:`float64_reference`), all from the same inputs.

    Every output tensor must satisfy all of:

    1. **structure**: the same tensors, shapes and dtypes as eager's; a non-floating tensor equals eager's.
    2. **non-finite placement**: NaN, +inf and -inf where eager and the float64 reference together say they
       may (:func:`nonfinite_breach`): where both are finite, a finite value; where both are non-finite, one
       of their classes; where only eager overflowed, a non-finite value or one within the tolerance of the
       reference.
    3. **RMSE rule** (torch's ``same``), over the elements finite in eager and float64:
       ``RMSE(compiled, fp64) <= m * RMSE(eager, fp64) + floor``, ``m`` from :func:`multiplier` (2 for
       float32 at >= 1000 elements, up to 10 for tiny tensors), ``floor = floor_ulps * eps * RMS(fp64)``.
       The floor is tied to the dtype's rounding, never to the declared tolerance: a loose tolerance must not
       re-admit a kernel that lost precision. Applied where ``RMS(fp64) > RMSE(eager, fp64)`` only: a
       tensor whose exact value is below eager's own rounding (cancellation to ~0) holds no signal for a
       ratio, and is bounded by rule 4 alone. A tensor whose reference equals eager bit for bit is
       judged as if eager were exact (the floor alone) and recorded as ``degenerate``.
    4. **pointwise rule**: ``|compiled - eager| <= atol + slack * max|eager - fp64| + rtol * |eager|`` at
       every finite element: the declared tolerance, widened by eager's own worst rounding. The RMSE rule
       averages; this catches one wrong element in a large tensor. The widening keeps a tolerance declared
       too tight for honest rounding (large magnitudes, cancellation) from rejecting a correct kernel.

    ``label`` prefixes output names in reasons (``"gradient"`` for a dict of gradients gives
    ``gradient['fc.weight']``).

    So the declared tolerance is necessary (widened by eager's rounding), never sufficient: a kernel inside
    it whose error is many times eager's own fails rule 3, and a correct kernel whose difference to eager
    exceeds the literal tolerance because eager itself rounds that far passes.
    """
    named_c, named_e, named_x = (_named_leaves(t, label) for t in (compiled, eager, exact))
    if len(named_c) != len(named_e) or len(named_x) != len(named_e):
        reason = f"compiled returned {len(named_c)} outputs, eager {len(named_e)}, float64 {len(named_x)}"
        return ParityVerdict(False, reason, 0.0, 0.0, float("inf"), float("inf"), True)
    outs: list[OutputVerdict] = []
    for (name, c), (_, e), (_, x) in zip(named_c, named_e, named_x, strict=True):
        if not isinstance(e, torch.Tensor):
            ok = type(c) is type(e) and c == e
            outs.append(OutputVerdict(name, ok, "" if ok else f"{name}: {c!r} != eager's {e!r}"))
            continue
        if not isinstance(c, torch.Tensor):
            outs.append(OutputVerdict(name, False, f"{name}: compiled gave {type(c).__name__}, not a tensor"))
            continue
        outs.append(
            judge_tensor(name, c, e, x, atol=atol, rtol=rtol, slack=slack, floor_ulps=floor_ulps, reduction=reduction)
        )
    failed = [o for o in outs if not o.passed]
    # The worst ratio over the outputs the RMSE rule measured (or every output, if none was resolved).
    worst = max([o for o in outs if o.resolved] or outs, key=lambda o: o.ratio, default=None)
    return ParityVerdict(
        passed=not failed,
        reason=failed[0].reason if failed else "",
        rmse_compiled=worst.rmse_compiled if worst else 0.0,
        rmse_eager=worst.rmse_eager if worst else 0.0,
        ratio=worst.ratio if worst else 1.0,
        max_abs=max((o.max_abs for o in outs), default=0.0),
        nonfinite_ok=all(o.nonfinite_ok for o in outs),
        outputs=tuple(outs),
    )


def to_float64(args: Sequence[Any]) -> list[Any]:
    """``args`` with every floating tensor cast to float64 (detached); other values unchanged."""
    return [a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


# Lower floating dtypes and what the float64 reference computes them in (see :class:`Float64Casts`).
WIDER: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.float64,
    torch.float16: torch.float64,
    torch.bfloat16: torch.float64,
    torch.complex32: torch.complex128,
    torch.complex64: torch.complex128,
}
_WIDER_METHODS: dict[Any, Any] = {
    torch.Tensor.float: torch.Tensor.double,
    torch.Tensor.half: torch.Tensor.double,
    torch.Tensor.bfloat16: torch.Tensor.double,
}


def _wider(value: Any) -> Any:
    return WIDER.get(value, value) if isinstance(value, torch.dtype) else value


class NotWidenable(RuntimeError):
    """The module does something its float64 reference cannot run with widened casts (see :class:`Float64Casts`)."""


class Float64Casts(TorchFunctionMode):
    """Inside it, a cast or a factory to a lower floating dtype gives float64 (complex128) instead:
    ``x.float()``, ``x.to(torch.float32)``, ``torch.zeros(n, dtype=torch.float16)``, ``softmax(dtype=...)``.

    Why: a module that casts to float32 inside (LlamaRMSNorm normalizes in float32 whatever its input's
    dtype) would otherwise run float32 arithmetic in its float64 copy, bit for bit what eager runs, and the
    reference would measure none of eager's rounding (an error of exactly 0, against which every honest
    reordering looks infinitely worse). A bit reinterpretation (``x.view(torch.int32)``) cannot be widened
    (it would read a float64 pattern): it raises :class:`NotWidenable`. Casts inside the dispatcher
    (autocast) are not seen: :func:`judge` records a reference that still equals eager bit for bit as
    degenerate.
    """

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.view and any(isinstance(a, torch.dtype) for a in (*args, *kwargs.values())):
            raise NotWidenable("the module reinterprets a tensor's bits (Tensor.view(dtype))")
        func = _WIDER_METHODS.get(func, func)
        return func(*(_wider(a) for a in args), **{k: _wider(v) for k, v in kwargs.items()})


class _Float64Forward:
    """A float64 copy's ``forward``: its class's own, run under :class:`Float64Casts`. An object holding the
    module rather than a closure, so that a deep copy of the copy runs its own module.

    A forward that fails with its casts widened (bit tricks on a float32 pattern: :class:`NotWidenable`, or
    anything else) runs again as a plain float64 copy, its buffers first put back as they were (a failed
    call may have updated some).
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward
        saved = [(b, b.detach().clone()) for b in self.module.buffers()]
        try:
            with Float64Casts():
                return forward(self.module, *args, **kwargs)
        except Exception:
            with torch.no_grad():
                for b, before in saved:
                    b.copy_(before)
            return forward(self.module, *args, **kwargs)


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` with its floating parameters and buffers in float64, same train/eval mode,
    whose forward keeps its own casts to lower precisions in float64 (:class:`Float64Casts`)."""
    double = copy.deepcopy(module).double()
    double.forward = _Float64Forward(double)
    return double


def float64_reference(module: torch.nn.Module, args: Sequence[Any]) -> Any:
    """The float64 yardstick: a float64 copy of ``module`` run on ``args`` cast to float64, without grad.

    Buffers the copy mutates (BatchNorm running statistics in train mode) change on the copy only."""
    with torch.no_grad():
        return float64_copy(module)(*to_float64(args))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits, NaN equal to NaN (a NaN's payload aside)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        # Identical bits are equal whatever they hold, in one pass (the common case: a tensor left as it was).
        if a.is_contiguous() and b.is_contiguous() and _same_bits(a, b):
            return True
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


# The integer dtype of each element size, to compare floating tensors' bits as integers (a byte view compares
# several times slower).
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether contiguous ``a`` and ``b`` of one floating or complex dtype hold the same bits."""
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    bits = _BITS_OF_SIZE.get(a.element_size())
    return bits is not None and torch.equal(a.reshape(-1).view(bits), b.reshape(-1).view(bits))


def _bitwise_equal(x: Any, y: Any) -> bool:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        return type(x) is type(y) and x == y
    return bitwise_equal(x, y)


def nondeterministic(run: Callable[[], Any]) -> bool:
    """Whether ``run`` (e.g. ``lambda: module(*args)``) gives different outputs in two identical calls: such a
    module is reported as nondeterministic instead of compared bit for bit. NaNs compare equal to NaNs."""
    a, b = _named_leaves(run()), _named_leaves(run())
    return len(a) != len(b) or not all(_bitwise_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))


@dataclass(frozen=True)
class ParitySummary:
    """Parity over every case a check ran: for ``esper urza show`` and the certify summary."""

    cases: int
    failures: int
    worst_ratio: float  # the largest RMSE ratio to eager's own error (cases where eager was exact left out)
    worst_rmse_compiled: float
    worst_rmse_eager: float
    max_abs: float
    first_failure: str
    # Outputs whose float64 reference was bit-identical to eager in some case (judge's degenerate reference).
    degenerate: tuple[str, ...] = ()

    def evidence(self) -> dict[str, Any]:
        """JSON-safe dict for Urza evidence (a non-finite ratio becomes ``None``)."""
        return {
            "cases": self.cases,
            "failures": self.failures,
            "rmse_ratio": _finite_or_none(self.worst_ratio),
            "rmse_compiled": self.worst_rmse_compiled,
            "rmse_eager": self.worst_rmse_eager,
            "max_abs": self.max_abs,
            "first_failure": self.first_failure,
            "degenerate_reference": list(self.degenerate),
        }


def summarize(verdicts: Iterable[ParityVerdict]) -> ParitySummary:
    """Fold the verdicts of many cases into one :class:`ParitySummary`."""
    vs = list(verdicts)
    # A passing case where eager was exact has ratio inf (admitted by the floor): it says nothing about how
    # close the kernel is to eager's best, so the worst ratio is taken over the others.
    worst = max((v for v in vs if math.isfinite(v.ratio) or not v.passed), key=lambda v: v.ratio, default=None)
    failed = [v for v in vs if not v.passed]
    return ParitySummary(
        cases=len(vs),
        failures=len(failed),
        worst_ratio=worst.ratio if worst else 1.0,
        worst_rmse_compiled=worst.rmse_compiled if worst else 0.0,
        worst_rmse_eager=worst.rmse_eager if worst else 0.0,
        max_abs=max((v.max_abs for v in vs), default=0.0),
        first_failure=failed[0].reason if failed else "",
        degenerate=tuple(dict.fromkeys(name for v in vs for name in v.degenerate())),
    )
