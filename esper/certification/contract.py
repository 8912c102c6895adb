"""The contract a compiled kernel has with its caller, beyond its output values: pure checks that compare what
the compiled side did in one call with what eager did in the same call.

Each check returns a :class:`ClauseResult` (the clause it judged and every :class:`Breach` found); nothing here
raises on a breach, runs a test framework or loads an artifact. A driver (certification) makes the calls,
hands both sides' inputs and outputs here, and records the results. The clauses, stated for inference and
training alike (docs/certification.md, "The contract"):

- **metadata** (:func:`check_metadata`): every output has eager's dtype, shape, device and layout, and is
  contiguous in every memory format eager's is (a caller's ``.view`` depends on it); other stride
  differences are no breach.
- **aliasing** (:func:`check_aliasing`): an output shares memory with an input, or with another output, only
  where eager's does.
- **mutation** (:func:`snapshot`, :func:`check_mutation`): every input tensor, weight and buffer is bitwise
  unchanged after the call unless eager changes it, and then changed as eager changes it.
- **non-finite values** (:func:`place_nonfinite`, :func:`check_nonfinite`): NaN and +-inf come out where
  eager and the float64 reference together say they may.
- **weights** (:func:`weight_sets`): the weight sets a seed's trained weights look like, for parity beyond
  the blueprint's own.
- **shapes**: :func:`esper.numerics.coverage.shape_design` (a covering design over a profile's dims).
- **repeated calls** (:func:`repeated_calls`): many calls in one process, shapes and weights alternating,
  each still eager's answer.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch.utils import _pytree as pytree

from esper.numerics.inputs import place_nonfinite_at
from esper.numerics.parity import REDUCTION, bitwise_equal, judge_tensor, nonfinite_breach

__all__ = [
    "Breach",
    "Call",
    "Clause",
    "ClauseResult",
    "Disagreement",
    "NonFiniteRegime",
    "RepeatResult",
    "WeightChange",
    "WeightSet",
    "alternate",
    "check_aliasing",
    "check_metadata",
    "check_mutation",
    "check_nonfinite",
    "close_to_eager",
    "named_state",
    "place_nonfinite",
    "repeated_calls",
    "snapshot",
    "weight_sets",
]


class Clause(StrEnum):
    """The clauses of the contract a check judges."""

    METADATA = "metadata"
    ALIASING = "aliasing"
    MUTATION = "mutation"
    NONFINITE = "nonfinite"
    WEIGHTS = "weights"
    SHAPES = "shapes"
    REPEATED = "repeated"


@dataclass(frozen=True)
class Breach:
    """One breach of a clause: where (an output, input, weight or buffer name) and what differs from eager."""

    clause: Clause
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


@dataclass(frozen=True)
class ClauseResult:
    """What one check found: the clause and every breach (none: the compiled side kept the clause)."""

    clause: Clause
    breaches: tuple[Breach, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.breaches

    @property
    def reason(self) -> str:
        """The first breach, readable ("" when passed)."""
        return f"{self.clause}: {self.breaches[0]}" if self.breaches else ""

    def evidence(self) -> dict[str, Any]:
        """JSON-safe dict for Urza evidence."""
        return {"clause": str(self.clause), "passed": self.passed, "breaches": [str(b) for b in self.breaches]}


def _named(x: Any, label: str) -> list[tuple[str, Any]]:
    flat, _ = pytree.tree_flatten_with_path(x)
    return [(f"{label}{pytree.keystr(path)}", leaf) for path, leaf in flat]


def _tensors(x: Any, label: str) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in _named(x, label) if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------------------------------------------
# Output metadata
# ---------------------------------------------------------------------------------------------------------

MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _dense_formats(t: torch.Tensor) -> tuple[torch.memory_format, ...]:
    """The memory formats ``t`` is contiguous in (those whose rank fits)."""
    ranks = {torch.channels_last: 4, torch.channels_last_3d: 5}
    return tuple(f for f in MEMORY_FORMATS if ranks.get(f, t.dim()) == t.dim() and t.is_contiguous(memory_format=f))


def check_metadata(compiled: Any, eager: Any) -> ClauseResult:
    """Judge the outputs' metadata against eager's, output by output.

    Required: the same outputs (count, and a tensor where eager has one), and at each tensor eager's dtype,
    shape, device and layout; and contiguity in every memory format eager's output is contiguous in (a caller
    that calls ``.view`` on eager's output must be able to on the compiled one). Other stride differences are
    no breach: where eager's output is not dense in any format (a strided view) the caller cannot rely on
    its strides either, and where the output aliases an input :func:`check_aliasing` judges it.
    """
    out: list[Breach] = []
    named_c, named_e = _named(compiled, "output"), _named(eager, "output")
    if len(named_c) != len(named_e):
        detail = f"compiled returned {len(named_c)} outputs, eager {len(named_e)}"
        return ClauseResult(Clause.METADATA, (Breach(Clause.METADATA, "output", detail),))
    for (name, c), (_, e) in zip(named_c, named_e, strict=True):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(c, torch.Tensor):
            out.append(Breach(Clause.METADATA, name, f"compiled gave {type(c).__name__}, eager a tensor"))
            continue
        for what in ("dtype", "shape", "device", "layout"):
            cv, ev = getattr(c, what), getattr(e, what)
            if cv != ev:
                out.append(Breach(Clause.METADATA, name, f"{what} {cv} where eager's is {ev}"))
        if c.layout == torch.strided and c.shape == e.shape:
            lost = [f for f in _dense_formats(e) if f not in _dense_formats(c)]
            if lost:
                out.append(
                    Breach(
                        Clause.METADATA,
                        name,
                        f"not contiguous in {lost[0]} as eager's is (strides {list(c.stride())}, "
                        f"eager's {list(e.stride())})",
                    )
                )
    return ClauseResult(Clause.METADATA, tuple(out))


# ---------------------------------------------------------------------------------------------------------
# Aliasing
# ---------------------------------------------------------------------------------------------------------


def _extent(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(storage pointer, first byte, last byte + 1)`` of the memory ``t`` can reach; ``None`` when empty."""
    if t.numel() == 0 or t.layout != torch.strided:
        return None
    size = t.element_size()
    first = int(t.storage_offset()) * size
    last = first + int(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))) * size + size
    return t.untyped_storage().data_ptr(), first, last


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors can reach a common byte of one storage (views of one tensor included). Judged on
    the byte extents, so two interleaved views (even and odd columns) count as overlapping: conservative."""
    ea, eb = _extent(a), _extent(b)
    return ea is not None and eb is not None and ea[0] == eb[0] and ea[1] < eb[2] and eb[1] < ea[2]


def _inputs(args: Sequence[Any]) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a call's positional arguments, named as :func:`named_state` names them (``input 0``)."""
    return [named for k, a in enumerate(args) for named in _tensors(a, f"input {k}")]


def _alias_pairs(outputs: Sequence[tuple[str, torch.Tensor]], inputs: Sequence[tuple[str, torch.Tensor]]) -> set:
    pairs = {(o, i) for o, ot in outputs for i, it in inputs if overlaps(ot, it)}
    pairs |= {(a, b) for (a, at), (b, bt) in itertools.combinations(outputs, 2) if overlaps(at, bt)}
    return pairs


def check_aliasing(
    compiled: Any, eager: Any, compiled_inputs: Sequence[Any], eager_inputs: Sequence[Any]
) -> ClauseResult:
    """Judge which outputs share memory with an input or with another output, against eager's.

    Each side is given the inputs its own call received (two calls, two sets of input tensors). A pair
    (output, input) or (output, output) that overlaps on the compiled side must overlap on eager's: a
    compiled output that aliases where eager's is a fresh tensor makes a caller's write into it reach the
    input (or the other output). The converse (eager returns a view, compiled a copy) is no breach: the
    values are equal, and a caller cannot tell a fresh tensor from a view it did not write into.
    """
    outs_c, outs_e = _tensors(compiled, "output"), _tensors(eager, "output")
    ins_c, ins_e = _inputs(compiled_inputs), _inputs(eager_inputs)
    extra = sorted(_alias_pairs(outs_c, ins_c) - _alias_pairs(outs_e, ins_e))
    breaches = tuple(Breach(Clause.ALIASING, a, f"shares memory with {b}; eager's does not") for a, b in extra)
    return ClauseResult(Clause.ALIASING, breaches)


# ---------------------------------------------------------------------------------------------------------
# Mutation of inputs, weights and buffers
# ---------------------------------------------------------------------------------------------------------


def named_state(args: Sequence[Any], module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The tensors a call may write into, by name: ``input 0``, ``input 1``, ... and the module's
    ``parameter['fc.weight']`` and ``buffer['running_mean']`` (the seed's weights and buffers)."""
    state = {f"input {k}": a for k, a in enumerate(args) if isinstance(a, torch.Tensor)}
    if module is not None:
        state |= {f"parameter[{n!r}]": p for n, p in module.named_parameters()}
        state |= {f"buffer[{n!r}]": b for n, b in module.named_buffers()}
    return state


def snapshot(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``state``'s tensors (detached), to compare with after a call."""
    return {n: t.detach().clone() for n, t in state.items()}


def _changed_elements(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    same = before == after
    if before.is_floating_point() or before.is_complex():
        same |= before.isnan() & after.isnan()
    return ~same


def check_mutation(
    before: Mapping[str, torch.Tensor],
    compiled_after: Mapping[str, torch.Tensor],
    eager_after: Mapping[str, torch.Tensor],
    exact_after: Mapping[str, torch.Tensor] | None = None,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> ClauseResult:
    """Judge what a call wrote into the caller's tensors against what eager's call wrote.

    ``before`` is the :func:`snapshot` both calls started from (each side ran on its own copies of it);
    ``compiled_after`` and ``eager_after`` are each side's tensors after its call, by the same names.

    - A tensor eager leaves bitwise unchanged must be bitwise unchanged on the compiled side: bitwise,
      because a write where eager writes nothing is a fault whatever its size, and an unchanged value has no
      rounding to allow for.
    - A tensor eager changes must change as eager's does. Non-floating tensors (a counter such as
      ``num_batches_tracked``) bitwise. Floating tensors are computed updates (running statistics) whose
      rounding depends on summation order: with ``exact_after`` (the float64 reference's tensors after its
      call) they are judged by the parity rule (:func:`esper.numerics.parity.judge_tensor`, widened by
      :data:`~esper.numerics.parity.REDUCTION` as gradients and buffers are); without it, within
      ``atol + rtol * |eager|``, and elements eager leaves unchanged must stay bitwise unchanged (a partial
      write, such as one row of a cache, must not spill into the rest).
    """
    breaches: list[Breach] = []
    for name, b in before.items():
        c, e = compiled_after.get(name), eager_after.get(name)
        if c is None or e is None:
            breaches.append(Breach(Clause.MUTATION, name, "missing after the call"))
            continue
        c, e = c.detach(), e.detach()
        if bitwise_equal(e, b):
            if not bitwise_equal(c, b):
                if c.shape != b.shape or c.dtype != b.dtype:
                    detail = f"became {c.dtype} {list(c.shape)} (was {b.dtype} {list(b.shape)}); eager's did not"
                else:
                    n = int(_changed_elements(b, c).sum())
                    detail = f"written by the call ({n} of {b.numel()} element(s) changed); eager writes nothing"
                breaches.append(Breach(Clause.MUTATION, name, detail))
            continue
        if c.shape != e.shape or c.dtype != e.dtype:
            detail = f"became {c.dtype} {list(c.shape)}, eager's {e.dtype} {list(e.shape)}"
            breaches.append(Breach(Clause.MUTATION, name, detail))
            continue
        if not (e.is_floating_point() or e.is_complex()):
            if not torch.equal(c, e):
                breaches.append(Breach(Clause.MUTATION, name, "updated otherwise than eager updates it"))
            continue
        if exact_after is not None and name in exact_after:
            v = judge_tensor(name, c, e, exact_after[name], atol=atol, rtol=rtol, reduction=REDUCTION)
            if not v.passed:
                breaches.append(Breach(Clause.MUTATION, name, f"updated otherwise than eager: {v.reason}"))
            continue
        untouched = ~_changed_elements(b, e)
        if bool((_changed_elements(b, c) & untouched).any()):
            breaches.append(Breach(Clause.MUTATION, name, "written at elements eager's update leaves unchanged"))
            continue
        if not torch.allclose(c, e, atol=atol, rtol=rtol, equal_nan=True):
            worst = float((c.double() - e.double()).abs().nan_to_num(0.0).max())
            breaches.append(Breach(Clause.MUTATION, name, f"updated otherwise than eager (differs by {worst:.3g})"))
    return ClauseResult(Clause.MUTATION, tuple(breaches))


# ---------------------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonFiniteRegime:
    """Where NaN, +inf and -inf are placed in the floating inputs: ``per_value`` elements of each (at most a
    third of a tensor each), at positions drawn from ``seed``. Other elements keep their values."""

    seed: int = 0
    per_value: int = 1


def place_nonfinite(args: Sequence[Any], regime: NonFiniteRegime) -> tuple[Any, ...]:
    """Copies of ``args`` with NaN, +inf and -inf at seeded positions of each floating tensor (distinct
    positions, the same for the same regime and shapes); other arguments are returned as they are."""
    g = torch.Generator().manual_seed(regime.seed)
    out: list[Any] = []
    for a in args:
        if not (isinstance(a, torch.Tensor) and a.is_floating_point()) or a.numel() == 0:
            out.append(a)
            continue
        t = a.detach().clone(memory_format=torch.contiguous_format)
        place_nonfinite_at(t, regime.per_value, g)
        out.append(t)
    return tuple(out)


def check_nonfinite(
    compiled: Any, eager: Any, exact: Any, *, atol: float, rtol: float, label: str = "output"
) -> ClauseResult:
    """Judge where NaN and +-inf come out, against eager and the float64 reference together, never eager alone.

    The rule is :func:`esper.numerics.parity.nonfinite_breach`'s (parity judges every case by it), per
    element of each floating output (complex: its real and imaginary parts), with ``E``, ``X`` and ``C`` the
    classes (finite, NaN, +inf, -inf) of eager's, the reference's and the compiled value:

    1. ``E`` and ``X`` both finite: ``C`` finite (the values are parity's to judge).
    2. ``E`` and ``X`` both non-finite: ``C`` is ``E`` or ``X``. A finite compiled value hides a NaN or an inf
       both say is there: a fault.
    3. ``E`` non-finite, ``X`` finite (eager overflowed or cancelled inf - inf where float64 does not): ``C`` is
       non-finite of any class (which intermediate overflows first depends on the evaluation order), or finite
       and within ``atol + rtol * |X|`` of the reference: a kernel that avoids eager's overflow is no fault.
    4. ``E`` finite, ``X`` non-finite: ``C`` is finite (parity judges the value) or ``X``.

    Non-floating outputs are parity's (bitwise) to judge.
    """
    breaches: list[Breach] = []
    named_c, named_e, named_x = _named(compiled, label), _named(eager, label), _named(exact, label)
    if not len(named_c) == len(named_e) == len(named_x):
        detail = f"compiled returned {len(named_c)} outputs, eager {len(named_e)}, float64 {len(named_x)}"
        return ClauseResult(Clause.NONFINITE, (Breach(Clause.NONFINITE, label, detail),))
    for (name, c), (_, e), (_, x) in zip(named_c, named_e, named_x, strict=True):
        if not (isinstance(c, torch.Tensor) and isinstance(e, torch.Tensor) and isinstance(x, torch.Tensor)):
            continue
        if not (e.is_floating_point() or e.is_complex()) or c.shape != e.shape or x.shape != e.shape:
            continue
        c, e, x = (t.detach().cpu() for t in (c, e, x))
        if e.is_complex():
            c, e, x = (torch.view_as_real(t.to(e.dtype if t is not x else torch.complex128)) for t in (c, e, x))
        detail = nonfinite_breach(c, e, x, atol=atol, rtol=rtol)
        if detail:
            breaches.append(Breach(Clause.NONFINITE, name, detail))
    return ClauseResult(Clause.NONFINITE, tuple(breaches))


# ---------------------------------------------------------------------------------------------------------
# Weight sets
# ---------------------------------------------------------------------------------------------------------


class WeightChange(StrEnum):
    """The weight sets a seed's trained weights look like, beyond the blueprint's own."""

    OWN = "own"
    SCALED_UP = "scaled-x10"
    SCALED_DOWN = "scaled-x0.1"
    PERTURBED = "perturbed"
    OUTLIERS = "outliers"


@dataclass(frozen=True)
class WeightSet:
    """One named weight set: a state dict of the blueprint's names, shapes and dtypes."""

    change: WeightChange
    seed: int
    state: Mapping[str, torch.Tensor]

    @property
    def name(self) -> str:
        return str(self.change) if self.change is WeightChange.OWN else f"{self.change}#{self.seed}"


# Perturbation: Gaussian noise of this many times each tensor's RMS (a trained tensor drifts by about its own
# scale). Outliers: this many entries per tensor (at most) multiplied by OUTLIER_FACTOR.
NOISE = 0.5
OUTLIERS = 3
OUTLIER_FACTOR = 100.0


def _generator(seed: int, change: WeightChange, name: str) -> torch.Generator:
    # crc32, not hash(): the same draw in every process (hash() of a str is salted per process).
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{change}/{name}".encode()))


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def weight_sets(
    state: Mapping[str, torch.Tensor],
    seed: int,
    changes: Iterable[WeightChange] = tuple(WeightChange),
    *,
    keep: Collection[str] = (),
) -> tuple[WeightSet, ...]:
    """Named weight sets derived from a module's ``state_dict`` (deterministic per ``seed``):

    - ``own``: the tensors as they are; ``scaled-x10`` / ``scaled-x0.1``: every floating tensor times 10 / 0.1;
    - ``perturbed``: plus Gaussian noise of :data:`NOISE` times the tensor's RMS (a tensor that is all zeros,
      a bias initialised to 0, takes the RMS of all floating tensors instead, so it moves too);
    - ``outliers``: :data:`OUTLIERS` entries per tensor multiplied by :data:`OUTLIER_FACTOR` (a zero entry
      becomes that many times the RMS).

    Only floating tensors change; integer and boolean buffers (counters, masks, indices) are copied as they
    are, and so are the tensors named in ``keep`` (weights a compiled route folded into its code, which a seed
    can only hold at the blueprint's values). A tensor without negative entries (a variance) stays
    non-negative when perturbed.
    """
    floats = [t for t in state.values() if t.is_floating_point() and t.numel()]
    overall = math.sqrt(sum(_rms(t) ** 2 for t in floats) / len(floats)) if floats else 1.0
    overall = overall or 1.0
    sets: list[WeightSet] = []
    for change in changes:
        new: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            t = t.detach().clone()
            if not t.is_floating_point() or t.numel() == 0 or change is WeightChange.OWN or name in keep:
                new[name] = t
                continue
            scale = _rms(t) or overall
            g = _generator(seed, change, name)
            if change is WeightChange.SCALED_UP:
                t = t * 10.0
            elif change is WeightChange.SCALED_DOWN:
                t = t * 0.1
            elif change is WeightChange.PERTURBED:
                noise = torch.randn(t.shape, generator=g, dtype=torch.float64) * (NOISE * scale)
                moved = t.double() + noise
                t = (moved.abs() if bool((t >= 0).all()) else moved).to(t.dtype)
            elif change is WeightChange.OUTLIERS:
                flat = t.reshape(-1)
                where = torch.randperm(flat.numel(), generator=g)[: min(OUTLIERS, flat.numel())]
                picked = flat[where]
                flat[where] = torch.where(picked == 0, torch.full_like(picked, scale), picked) * OUTLIER_FACTOR
                t = flat.view(t.shape)
            new[name] = t
        sets.append(WeightSet(change, seed, new))
    return tuple(sets)


# ---------------------------------------------------------------------------------------------------------
# Repeated calls
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Call:
    """One call of a repeated-call schedule: its inputs (a shape's), labelled, and the weight set's name."""

    label: str
    args: tuple[Any, ...]
    weights: str = WeightChange.OWN.value


@dataclass(frozen=True)
class Disagreement:
    """The first call whose compiled answer was not eager's: its index in the schedule and why."""

    index: int
    call: str  # the call's label and weight set
    reason: str


@dataclass(frozen=True)
class RepeatResult:
    """What :func:`repeated_calls` found: how many calls ran and the first disagreement (``None``: none)."""

    calls: int
    first: Disagreement | None

    @property
    def passed(self) -> bool:
        return self.first is None

    def clause(self) -> ClauseResult:
        """As a :class:`ClauseResult` of the repeated-calls clause."""
        if self.first is None:
            return ClauseResult(Clause.REPEATED)
        where = f"call {self.first.index} ({self.first.call})"
        return ClauseResult(Clause.REPEATED, (Breach(Clause.REPEATED, where, self.first.reason),))


def close_to_eager(*, atol: float, rtol: float) -> Callable[[Any, Any], str]:
    """An agreement rule for :func:`repeated_calls`: every output tensor of eager's shape and dtype, within
    ``atol + rtol * |eager|`` (NaN where eager's NaN). Returns "" or the first difference."""

    def agree(compiled: Any, eager: Any) -> str:
        named_c, named_e = _named(compiled, "output"), _named(eager, "output")
        if len(named_c) != len(named_e):
            return f"compiled returned {len(named_c)} outputs, eager {len(named_e)}"
        for (name, c), (_, e) in zip(named_c, named_e, strict=True):
            if not isinstance(e, torch.Tensor):
                if c != e:
                    return f"{name}: {c!r} != eager's {e!r}"
                continue
            if not isinstance(c, torch.Tensor) or c.shape != e.shape or c.dtype != e.dtype:
                return f"{name}: not a tensor of eager's shape and dtype"
            if not torch.allclose(c, e, atol=atol, rtol=rtol, equal_nan=True):
                worst = float((c.double() - e.double()).abs().nan_to_num(0.0).max())
                return f"{name}: differs from eager by {worst:.3g}"
        return ""

    return agree


def _clone(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)


def alternate(calls: Sequence[Call], rounds: int) -> list[Call]:
    """``calls`` repeated ``rounds`` times, each round in an order where consecutive calls differ in both
    their inputs and their weight set wherever the remaining calls allow (so state a kernel keeps from one
    shape or seed to the next meets another)."""
    out: list[Call] = []
    for _ in range(rounds):
        todo = list(calls)
        while todo:
            prev = out[-1] if out else None

            def distance(c: Call, prev: Call | None = prev) -> int:
                return 0 if prev is None else -((c.label != prev.label) + (c.weights != prev.weights))

            best = min(range(len(todo)), key=lambda k: distance(todo[k]))
            out.append(todo.pop(best))
    return out


def repeated_calls(
    compiled: Callable[[str, tuple[Any, ...]], Any],
    eager: Callable[[str, tuple[Any, ...]], Any],
    schedule: Sequence[Call],
    *,
    agree: Callable[[Any, Any], str],
    reproducible: bool = True,
) -> RepeatResult:
    """Call ``compiled(weights, args)`` for every call of ``schedule`` in order, in one process, and compare
    each answer with ``eager(weights, args)`` by ``agree`` (returns "" or why not). Each side gets its own
    copy of the inputs every time. With ``reproducible``, a call whose inputs and weights came before must
    also give the compiled side's earlier answer bit for bit: a deterministic kernel that drifts from its own
    first answer keeps state across calls, even while the drift is inside the tolerance ``agree`` allows.
    Stops at the first disagreement."""
    first_answers: dict[tuple[str, str], Any] = {}
    for index, call in enumerate(schedule):
        got = compiled(call.weights, _clone(call.args))
        want = eager(call.weights, _clone(call.args))
        what = f"{call.label}, weights {call.weights}"
        reason = agree(got, want)
        if not reason and reproducible:
            key = (call.label, call.weights)
            if key in first_answers:
                earlier = [t for _, t in _tensors(first_answers[key], "o")]
                now = [t for _, t in _tensors(got, "o")]
                if len(earlier) != len(now) or not all(bitwise_equal(a, b) for a, b in zip(earlier, now, strict=True)):
                    reason = "the compiled answer differs from its own answer to the same call earlier"
            else:
                first_answers[key] = pytree.tree_map(
                    lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, got
                )
        if reason:
            return RepeatResult(index + 1, Disagreement(index, what, reason))
    return RepeatResult(len(schedule), None)
