"""Legitimate float32 executions of an eager module, and the calibrated yardstick derived from them.

Eager's error against a float64 reference is one sample of what an honest float32 implementation does: the
same arithmetic in another summation order, on another thread count, through another attention kernel rounds
differently. For a well-conditioned computation those samples agree to a few ulps and eager's one sample is a
fair yardstick. For an ill-conditioned one (attention logits of ~1e6 fed to a softmax) they disagree by many
times, and a compiled kernel judged against eager's one sample may be rejected for rounding no worse than a
reordering eager itself could have done.

:func:`spread` runs the module under several such executions (:class:`Reordered`: every contraction and
reduction evaluated in a seeded other order; :class:`Rounded`: every intermediate rounded to the other
neighbouring float at random; another thread count; the math attention kernel; the batch in
another order or in halves where the float64 reference shows the module treats batch elements alone),
measures each one's error against float64 exactly as :func:`esper.numerics.parity.judge` measures compiled's
(RMSE and largest absolute error over the elements finite in eager and float64), and says whether the module
is well- or ill-conditioned. :func:`allowed_error` applies the multiplier rule to the upper end of that
spread instead of to eager's one sample, and :func:`calibrate` applies judge's pointwise rule to the worst
element of any execution instead of eager's: where a kink sits within float32 rounding of the value (a ReLU
behind an amplifying BatchNorm), honest executions send an element's gradient either way, and so may a compiled
kernel. NaN/inf placement and the shape of an output are never widened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

# torch offers dispatch-level interception (below autograd, after composite ops such as nn.Linear and
# scaled_dot_product_attention have lowered to the aten kernels that actually round) only through this
# module; torch's own tools (FakeTensorMode, the proxy tracer, the flop counter) subclass it from here.
from torch.utils._python_dispatch import TorchDispatchMode

from esper.numerics import parity
from esper.numerics.parity import FLOOR_ULPS, float64_reference

aten = torch.ops.aten


class Conditioning(StrEnum):
    """Whether the legitimate float32 executions of a computation agree with each other."""

    WELL = "well-conditioned"  # they agree to within the multiplier rule: eager's one sample is a fair yardstick
    ILL = "ill-conditioned"  # they disagree by more than the multiplier rule grants: one sample is not
    # The float64 value is no larger than eager's own rounding (terms cancelling to ~0, as judge's "resolved"):
    # the errors are noise around nothing, and their ratio says nothing about conditioning.
    UNRESOLVED = "unresolved"


# ---------------------------------------------------------------------------------------------------------
# Reordered: every contraction and reduction in a seeded other order.
# ---------------------------------------------------------------------------------------------------------


def _perm(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)


def _inverse(p: torch.Tensor) -> torch.Tensor:
    return torch.argsort(p)


def _dims(x: torch.Tensor, dim: Any) -> list[int]:
    """The dims a reduction reduces: ``dim`` normalized; ``None`` or empty means every dim (aten's convention)."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(x.dim()))
    if isinstance(dim, int):
        dim = [dim]
    return [d % x.dim() for d in dim] if x.dim() else []


# Reductions over a list of dims, and where their ``dim`` argument sits.
_REDUCTIONS: dict[Any, int] = {
    aten.sum.dim_IntList: 1,
    aten.mean.dim: 1,
    aten.linalg_vector_norm.default: 2,
    aten.var.correction: 1,
    aten.std.correction: 1,
    aten.var_mean.correction: 1,
    aten.std_mean.correction: 1,
}
# Reductions over every element.
_FULL_REDUCTIONS = frozenset({aten.sum.default, aten.mean.default})
# Ops that normalize along one dim (``dim`` second) and return a tensor shaped like their input.
_ALONG_DIM = frozenset({aten._softmax.default, aten._log_softmax.default, aten._safe_softmax.default})
_FUSED_ATTENTION = frozenset({aten._scaled_dot_product_flash_attention_for_cpu.default})


class Reordered(TorchDispatchMode):
    """Inside it, every contraction and reduction of a floating tensor is evaluated in another order: a seeded
    permutation of the summed dim, the same on every operand, undone on the result where the result keeps
    that dim. Mathematically the same function; in float32, other roundings.

    - ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``mv``, ``addmv``, ``dot`` (what ``nn.Linear``, ``matmul``
      and ``einsum`` lower to): the contracted dim of both operands;
    - ``convolution``: the input channels, within each group, of the input and the weight;
    - ``sum``, ``mean``, ``linalg_vector_norm``, ``var``, ``std`` over dims: each reduced dim;
    - softmax, log-softmax: the softmax dim, un-permuted on the result; ``native_layer_norm``: the last
      normalized dim of input, weight and bias, un-permuted on the output; ``native_batch_norm`` in training:
      the batch, un-permuted on the output;
    - the fused CPU attention kernel: keys and values permuted together along the sequence (an attention
      mask's columns with them, a causal mask made explicit first), and the query-key contraction dim.

    A fresh mode with the same ``seed`` makes the same permutations for the same calls. ``seen`` records the
    ops it met, so that a caller can tell which other executions could make a difference.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.seen: set[Any] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.seen.add(func)
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and not (first.is_floating_point() or first.is_complex()):
            return func(*args, **kwargs)  # integer arithmetic is exact in any order
        handler = self._handler(func)
        return handler(func, list(args), kwargs) if handler else func(*args, **kwargs)

    def _handler(self, func: Any) -> Callable[[Any, list[Any], dict[str, Any]], Any] | None:
        if func in _REDUCTIONS:
            return self._reduction
        if func in _FULL_REDUCTIONS:
            return self._full_reduction
        if func in _ALONG_DIM:
            return self._along_dim
        if func in _FUSED_ATTENTION:
            return self._attention
        return {
            aten.mm.default: self._contract(0, 1, 0),
            aten.addmm.default: self._contract(1, 1, 0),
            aten.bmm.default: self._contract(0, 2, 1),
            aten.baddbmm.default: self._contract(1, 2, 1),
            aten.mv.default: self._contract(0, 1, 0),
            aten.addmv.default: self._contract(1, 1, 0),
            aten.dot.default: self._contract(0, 0, 0),
            aten.convolution.default: self._convolution,
            aten.native_layer_norm.default: self._layer_norm,
            aten.native_batch_norm.default: self._batch_norm,
        }.get(func)

    def _contract(self, at: int, dim_a: int, dim_b: int) -> Callable[[Any, list[Any], dict[str, Any]], Any]:
        """A handler for ``func(..., a, b, ...)`` with ``a`` at ``args[at]`` contracting its ``dim_a`` with ``b``'s
        ``dim_b``."""

        def run(func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
            a, b = args[at], args[at + 1]
            p = _perm(a.shape[dim_a], self.generator)
            args[at], args[at + 1] = a.index_select(dim_a, p), b.index_select(dim_b, p)
            return func(*args, **kwargs)

        return run

    def _convolution(self, func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x, w = args[0], args[1]
        transposed, groups = bool(args[6]), int(args[8])
        per_group = x.shape[1] // groups
        p = _perm(per_group, self.generator)
        channels = (torch.arange(groups)[:, None] * per_group + p[None, :]).reshape(-1)
        args[0] = x.index_select(1, channels)
        # A weight is (out, in / groups, ...) and a transposed one (in, out / groups, ...).
        args[1] = w.index_select(0, channels) if transposed else w.index_select(1, p)
        return func(*args, **kwargs)

    def _reduction(self, func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        at = _REDUCTIONS[func]
        x = args[0]
        dim = kwargs["dim"] if "dim" in kwargs else (args[at] if len(args) > at else None)
        for d in _dims(x, dim):
            x = x.index_select(d, _perm(x.shape[d], self.generator))
        args[0] = x
        return func(*args, **kwargs)

    def _full_reduction(self, func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0].reshape(-1)
        args[0] = x.index_select(0, _perm(x.numel(), self.generator))
        return func(*args, **kwargs)

    def _along_dim(self, func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x, dim = args[0], args[1] % max(args[0].dim(), 1)
        if x.dim() == 0:
            return func(*args, **kwargs)
        p = _perm(x.shape[dim], self.generator)
        args[0] = x.index_select(dim, p)
        return func(*args, **kwargs).index_select(dim, _inverse(p))

    def _layer_norm(self, func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x, weight, bias = args[0], args[2], args[3]
        p = _perm(x.shape[-1], self.generator)
        args[0] = x.index_select(-1, p)
        args[2] = weight.index_select(-1, p) if weight is not None else None
        args[3] = bias.index_select(-1, p) if bias is not None else None
        out, mean, rstd = func(*args, **kwargs)
        return out.index_select(-1, _inverse(p)), mean, rstd

    def _batch_norm(self, func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x, training = args[0], bool(args[5] if len(args) > 5 else kwargs.get("training"))
        if not training or x.dim() == 0:
            return func(*args, **kwargs)  # normalizing by running statistics is elementwise: nothing to reorder
        p = _perm(x.shape[0], self.generator)  # the batch statistics summed over the batch in another order
        args[0] = x.index_select(0, p)
        out, *stats = func(*args, **kwargs)
        return (out.index_select(0, _inverse(p)), *stats)

    def _attention(self, func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        names = ("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale")
        call = dict(zip(names, args, strict=False)) | kwargs
        q, k, v = call["query"], call["key"], call["value"]
        if call.get("dropout_p", 0.0):
            return func(*args, **kwargs)  # a dropout mask is drawn per key position: no consistent permutation
        length, keys = q.shape[-2], k.shape[-2]
        mask = call.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        if call.get("is_causal"):
            causal = torch.ones(length, keys, dtype=torch.bool).tril()
            causal = torch.zeros(length, keys, dtype=q.dtype).masked_fill(~causal, float("-inf"))
            mask = causal if mask is None else mask + causal
        p = _perm(keys, self.generator)
        e = _perm(q.shape[-1], self.generator)  # the query-key contraction: the logits' sum in another order
        call |= {
            "query": q.index_select(-1, e),
            "key": k.index_select(-2, p).index_select(-1, e),
            "value": v.index_select(-2, p),
            "is_causal": False,
            "attn_mask": mask.index_select(-1, p) if mask is not None and mask.shape[-1] == keys else mask,
        }
        return func(**call)


# ---------------------------------------------------------------------------------------------------------
# Rounded: every intermediate result rounded the other way at random.
# ---------------------------------------------------------------------------------------------------------

# Ops that move or make values without rounding them: exact in every execution, so never perturbed.
_EXACT = frozenset(
    {
        aten.clone.default,
        aten._to_copy.default,
        aten.detach.default,
        aten.lift_fresh.default,
        aten.lift_fresh_copy.default,
        aten.cat.default,
        aten.stack.default,
        aten.index_select.default,
        aten.gather.default,
        aten.zeros_like.default,
        aten.ones_like.default,
        aten.empty_like.default,
        aten.full_like.default,
        aten.new_zeros.default,
        aten.new_ones.default,
        aten.new_empty.default,
        aten.new_full.default,
        aten.scalar_tensor.default,
        aten.zeros.default,
        aten.ones.default,
        aten.full.default,
        aten.empty.memory_format,
        aten.empty_strided.default,
    }
)


class Rounded(TorchDispatchMode):
    """Inside it, every floating intermediate result an op computes is moved one ulp up or down at random (each
    finite non-zero element with probability one half, the direction seeded): the rounding of another float32
    execution, which fuses the op with its neighbour, keeps the intermediate in a register or in another
    precision, or folds a constant elsewhere (a bias that a train-mode BatchNorm cancels), and so rounds each
    intermediate to one of the two float32 values around the exact one, not always eager's.

    Reordering never changes how an elementwise result rounds; this does. Where the computation amplifies an
    intermediate's last bit (a train-mode BatchNorm over a batch whose variance is below its ``eps``), a value
    within that amplified rounding of a kink (ReLU's zero, a max's tie) falls on either side in honest
    executions, and the gradient behind it takes either value: the spread sees it. Mutating ops and views are
    left alone (their results are their inputs' memory), as are ops that only move values (:data:`_EXACT`).
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _EXACT or func.is_view or func._schema.is_mutable:
            return out
        return pytree.tree_map_only(torch.Tensor, self._perturbed, out)

    def _perturbed(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.numel() == 0:
            return t
        # One draw per element: 0 or 1 stays, 2 moves down, 3 moves up.
        draw = torch.randint(0, 4, t.shape, generator=self.generator, dtype=torch.int8).to(t.device)
        toward = (draw.to(t.dtype) - 2.5).sign() * math.inf
        move = (draw >= 2) & torch.isfinite(t) & (t != 0)
        return torch.where(move, torch.nextafter(t, toward), t)


# ---------------------------------------------------------------------------------------------------------
# The executions and their errors.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputError:
    """One output's error against float64, over the elements finite in eager, float64 and this execution, and how
    far it lies from eager's output there."""

    name: str
    rmse: float  # RMSE against float64
    max_abs: float  # largest |output - fp64|
    off_eager: float = 0.0  # RMS of output - eager


@dataclass(frozen=True)
class Execution:
    """One legitimate execution's name and its errors, one per floating output."""

    name: str
    errors: tuple[OutputError, ...]


@dataclass(frozen=True)
class OutputSpread:
    """The errors of every execution for one output, and what they say about its conditioning."""

    name: str
    numel: int
    dtype: torch.dtype
    rms_exact: float  # RMS of the float64 reference over the measured elements
    floor: float  # FLOOR_ULPS ulps of that RMS: the spread judge's RMSE rule never looks below
    canonical_rmse: float  # eager's own error, the one sample judge uses today
    rmse: tuple[float, ...]  # each execution's, in Spread.executions' order
    max_abs: float  # the largest |execution - fp64| of any execution
    off_eager: float  # the largest RMS distance of any execution from eager's output
    conditioning: Conditioning

    @property
    def rmse_min(self) -> float:
        return min(self.rmse)

    @property
    def rmse_max(self) -> float:
        return max(self.rmse)

    def rmse_quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1, linear interpolation) of the executions' RMSE."""
        xs = sorted(self.rmse)
        pos = q * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def ratio(self) -> float:
        """How far apart the executions are: largest over smallest RMSE, the smallest taken no lower than the
        floor (agreement to within a few ulps is agreement)."""
        return self.rmse_max / max(self.rmse_min, self.floor)

    @property
    def disagreement_ulps(self) -> float:
        """How far the executions lie from eager, in ulps of the reference's RMS: a few for well-conditioned
        rounding, thousands where cancellation amplifies it."""
        ulp = torch.finfo(self.dtype).eps * self.rms_exact
        return self.off_eager / ulp if ulp > 0 else (0.0 if self.off_eager == 0 else math.inf)


@dataclass(frozen=True)
class Spread:
    """Every legitimate execution of a module on one set of inputs, its errors against float64, and the verdict.
    ``executions[0]`` is canonical eager; ``skipped`` names the executions not run, and why."""

    executions: tuple[Execution, ...]
    outputs: tuple[OutputSpread, ...]
    skipped: tuple[tuple[str, str], ...]
    conditioning: Conditioning

    @property
    def canonical(self) -> Execution:
        return self.executions[0]

    def part(self, label: str) -> Spread:
        """The spread of one part's outputs only (a step's ``gradient``: every ``gradient[...]``), its
        conditioning theirs."""
        keep = [k for k, o in enumerate(self.outputs) if _in_part(o.name, label)]
        outputs = tuple(self.outputs[k] for k in keep)
        executions = tuple(replace(e, errors=tuple(e.errors[k] for k in keep)) for e in self.executions)
        return Spread(executions, outputs, self.skipped, _overall(outputs))

    @property
    def worst_ratio(self) -> float:
        """The largest :attr:`OutputSpread.ratio` over the outputs whose reference stands above rounding."""
        return max((o.ratio for o in self.outputs if o.conditioning is not Conditioning.UNRESOLVED), default=1.0)

    @property
    def worst_disagreement_ulps(self) -> float:
        """The largest :attr:`OutputSpread.disagreement_ulps` over the outputs whose reference stands above
        rounding."""
        resolved = [o for o in self.outputs if o.conditioning is not Conditioning.UNRESOLVED]
        return max((o.disagreement_ulps for o in resolved), default=0.0)

    def evidence(self) -> dict[str, Any]:
        """JSON-safe figures for Urza evidence."""
        return {
            "conditioning": str(self.conditioning),
            "executions": [e.name for e in self.executions],
            "skipped": {name: why for name, why in self.skipped},
            "outputs": {
                o.name: {
                    "conditioning": str(o.conditioning),
                    "rmse_eager": o.canonical_rmse,
                    "rmse_min": o.rmse_min,
                    "rmse_max": o.rmse_max,
                    "spread_ratio": _finite_or_none(o.ratio),
                    "disagreement_ulps": _finite_or_none(o.disagreement_ulps),
                    "max_abs": o.max_abs,
                }
                for o in self.outputs
            },
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _in_part(name: str, label: str) -> bool:
    return name == label or name.startswith(label + "[")


def _named_floats(x: Any, parts: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The floating tensors of ``x`` by the names :func:`~esper.numerics.parity.judge` gives them: ``output...``,
    or with ``parts`` (``x`` a mapping of named parts, a training step's ``output``, ``gradient``, ``buffer``)
    each under its part's label, as judge labels a part (``gradient['fc.weight']``)."""
    if parts:
        return [(f"{part}{name[len('output') :]}", t) for part, value in x.items() for name, t in _named_floats(value)]
    flat, _ = pytree.tree_flatten_with_path(x)
    return [
        (f"output{pytree.keystr(path)}", leaf)
        for path, leaf in flat
        if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex())
    ]


def _as_real(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return torch.view_as_real(t) if t.is_complex() else t


def errors_of(outputs: Any, reference: Any, eager: Any, *, parts: bool = False) -> tuple[OutputError, ...]:
    """Each floating output's RMSE and largest absolute error against the float64 ``reference``, over the elements
    finite in ``eager``, the reference and the output itself: the elements :func:`~esper.numerics.parity.judge`
    measures. ``eager`` only chooses the elements; pass eager's own outputs to measure eager. With ``parts`` the
    three are mappings of named parts (see :func:`spread`)."""
    out: list[OutputError] = []
    for (name, o), (_, e), (_, f) in zip(
        _named_floats(outputs, parts), _named_floats(eager, parts), _named_floats(reference, parts), strict=True
    ):
        o64, e, f64 = _as_real(o).double(), _as_real(e), _as_real(f).double()
        keep = torch.isfinite(o64) & torch.isfinite(e) & torch.isfinite(f64)
        err, off = (o64 - f64)[keep], (o64 - e.double())[keep]
        n = err.numel()
        if not n:
            out.append(OutputError(name, 0.0, 0.0))
            continue
        rms = math.sqrt(float(torch.dot(err, err)) / n)
        out.append(OutputError(name, rms, float(err.abs().max()), math.sqrt(float(torch.dot(off, off)) / n)))
    return tuple(out)


def _snapshot(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in module.buffers()]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, before in saved:
            b.copy_(before)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(module: torch.nn.Module, args: Sequence[Any], seed: int) -> Any:
    """``module(*args)`` without grad, with torch's RNG seeded and restored, and the module's buffers put back as
    they were (a train-mode BatchNorm updates its running statistics): every execution starts from one state."""
    saved = _snapshot(module)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            return module(*args)
    finally:
        _restore(saved)


def _leading(args: Sequence[Any]) -> int | None:
    sizes = [a.shape[0] for a in args if isinstance(a, torch.Tensor)]
    if not sizes or any(a.dim() == 0 for a in args if isinstance(a, torch.Tensor)) or len(set(sizes)) != 1:
        return None
    return sizes[0] if sizes[0] >= 2 else None


# How the batch is reassembled: each plan gives the index lists to run separately, in order, and the
# permutation that puts the concatenated outputs back in the batch's order.
def _batch_plans(size: int) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
    half = size // 2
    reverse = torch.arange(size - 1, -1, -1)
    return {
        "batch-reversed": ([reverse], reverse),  # reversing is its own inverse
        "batch-halves": ([torch.arange(half), torch.arange(half, size)], torch.arange(size)),
    }


def _in_batches(
    run: Callable[[Sequence[Any]], Any], args: Sequence[Any], chunks: list[torch.Tensor], back: torch.Tensor
) -> Any:
    outs = [run([a.index_select(0, idx) if isinstance(a, torch.Tensor) else a for a in args]) for idx in chunks]
    flats = [pytree.tree_flatten(o) for o in outs]
    spec = flats[0][1]
    joined = [
        torch.cat(parts).index_select(0, back) if isinstance(parts[0], torch.Tensor) else parts[0]
        for parts in zip(*(f[0] for f in flats), strict=True)
    ]
    return pytree.tree_unflatten(joined, spec)


def _batched_outputs(outputs: Any, size: int) -> bool:
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    return bool(leaves) and all(t.dim() >= 1 and t.shape[0] == size for t in leaves)


def _run_step(step: Callable[[Sequence[Any]], Any], args: Sequence[Any], seed: int) -> Any:
    """``step(args)`` with torch's RNG seeded and restored (grad as the caller has it: a step may backpropagate)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return step(args)


def _same_function(a: Any, b: Any) -> bool:
    """Whether two float64 results agree to far finer than float32 rounds: every element within float32's epsilon
    of the largest magnitude. Coupled batch elements (train-mode BatchNorm statistics over a half batch) differ
    by the values' own size; float64 arithmetic in another order, by ~1e-16 of it."""
    for (_, x), (_, y) in zip(_named_floats(a), _named_floats(b), strict=True):
        if x.shape != y.shape:
            return False
        x, y = _as_real(x).double().nan_to_num(), _as_real(y).double().nan_to_num()
        if x.numel() and float((x - y).abs().max()) > torch.finfo(torch.float32).eps * float(x.abs().max()):
            return False
    return True


# How far (in ulps of the output's RMS) legitimate executions may lie from eager and still be called agreeing.
# A float32 sum of K terms, reordered, moves by about sqrt(K) half-ulps of its terms' scale, and a
# well-conditioned result is of that scale: 64 ulps is beyond any reordering of 16k terms. Executions further
# apart than that disagree because the computation amplifies rounding (cancellation, a softmax of logits far
# larger than their differences): a condition number far above 1, where eager's error is one draw of many.
ILL_CONDITIONED_ULPS = 64.0


# Executions under :class:`Rounded` in every spread: each draws every intermediate's rounding afresh, and a kink
# within reach of float32 rounding shows in some draws, not all. Only a case that failed the one-sample rule
# pays for them.
ROUNDED = 8


def _conditioning(o: OutputSpread) -> Conditioning:
    if not o.rms_exact > o.canonical_rmse:
        return Conditioning.UNRESOLVED
    # Two signs of ill-conditioning, either enough. The executions disagree far beyond rounding (every element
    # amplifies it alike: their RMSE against float64 may still be alike). Or their errors are further apart
    # than the multiplier rule grants (a few elements dominate the RMSE, and which draw they get decides it):
    # applied to one sample, the rule would reject a legitimate execution. For small outputs the multiplier
    # is large (8-10), matching the larger variation of an RMSE over few elements.
    if o.disagreement_ulps > ILL_CONDITIONED_ULPS or o.ratio > parity.multiplier(o.numel, o.dtype):
        return Conditioning.ILL
    return Conditioning.WELL


def spread(
    target: torch.nn.Module | Callable[[Sequence[Any]], Any],
    inputs: Sequence[Any],
    reference: Callable[[Sequence[Any]], Any] | Any = None,
    *,
    n: int = 4,
    seed: int = 0,
    parts: bool = False,
    enough: Callable[[Spread], bool] | None = None,
) -> Spread:
    """Run ``target`` on ``inputs`` under its legitimate float32 executions and measure each against float64.

    ``target`` is a module (run without grad, its buffers restored after each execution) or any function of the
    inputs returning a pytree of tensors, such as a whole training step (forward, backward, the buffers it
    updates) that builds its own fresh state each time it is called; with ``parts`` it returns a mapping of named
    parts (``output``, ``gradient``, ``buffer``), whose tensors are named as judge names them under each part's
    label. Each execution wraps the whole call: under :class:`Reordered` the backward's contractions and
    reductions are reordered too.

    ``reference`` is the float64 outputs for ``inputs``, or a function of the inputs giving them; for a module
    by default :func:`~esper.numerics.parity.float64_reference` (a function must be given a reference). The
    executions, each named:

    - ``eager``: the target as it is (canonical, always first);
    - ``rounded-<i>``: under :class:`Rounded` with seed ``seed + i``, ``i <`` :data:`ROUNDED`;
    - ``threads-<k>``: on another thread count (1, or 2 where torch runs on one), restored after;
    - ``reorder-<i>``: under :class:`Reordered` with seed ``seed + i``, ``i < n``;
    - ``sdpa-math``, ``sdpa-math-reorder``: where the target met the fused attention kernel, the math
      backend instead (:func:`torch.nn.attention.sdpa_kernel`), as is and reordered;
    - ``batch-reversed``, ``batch-halves``: the batch in reverse order, or in two halves, reassembled; only
      where every input and output leads with one batch size and the float64 function (a module's float64
      copy, or a reference given as a function) gives the same result that way (a train-mode BatchNorm's halves
      see other statistics; a step's parameter gradients sum over the batch: skipped, with the reason).

    Every execution runs from the same RNG seed (and for a module without grad, from the same buffers), in the
    order above (the cheapest first). ``enough``: a test of the spread measured so far, asked after each
    execution; the spread stops at the first it passes (e.g. once a case's calibrated yardstick admits it:
    more executions only widen it).
    """
    args = list(inputs)
    if not isinstance(target, torch.nn.Module) and reference is None:
        raise ValueError("spread of a function needs its float64 reference (outputs, or a function of inputs)")

    def run(a: Sequence[Any]) -> Any:
        return _run(target, a, seed) if isinstance(target, torch.nn.Module) else _run_step(target, a, seed)

    exact_of: Callable[[Sequence[Any]], Any] | None = None
    if callable(reference):
        exact_of = reference
    elif isinstance(target, torch.nn.Module):
        module = target
        exact_of = lambda a: float64_reference(module, a)  # noqa: E731
    own = None
    if reference is None or callable(reference):
        assert exact_of is not None
        own = exact_of(args)
        reference = own
    eager = run(args)
    runs: list[tuple[str, Any]] = [("eager", eager)]
    skipped: list[tuple[str, str]] = []

    def measured() -> Spread:
        executions = tuple(Execution(name, errors_of(out, reference, eager, parts=parts)) for name, out in runs)
        outputs = tuple(
            _output_spread(k, name, f, eager, executions, parts)
            for k, (name, f) in enumerate(_named_floats(reference, parts))
        )
        return Spread(executions, outputs, tuple(skipped), _overall(outputs))

    for name, out in _executions(run, args, eager, exact_of, own, n, seed, skipped):
        runs.append((name, out))
        if enough is not None and enough(measured()):
            break
    return measured()


def _executions(
    run: Callable[[Sequence[Any]], Any],
    args: list[Any],
    eager: Any,
    exact_of: Callable[[Sequence[Any]], Any] | None,
    own: Any,
    n: int,
    seed: int,
    skipped: list[tuple[str, str]],
) -> Iterator[tuple[str, Any]]:
    """:func:`spread`'s executions after eager, cheapest first, each run only when asked for (noting in
    ``skipped`` the ones that do not apply)."""
    # Each execution's mode (and thread count) is undone before it is yielded: the caller's own arithmetic runs
    # outside it.
    for i in range(ROUNDED):
        with Rounded(seed + i):
            out = run(args)
        yield f"rounded-{i}", out
    threads = 1 if torch.get_num_threads() > 1 else 2
    with _threads(threads):
        out = run(args)
    yield f"threads-{threads}", out
    seen: set[Any] = set()
    for i in range(n):
        mode = Reordered(seed + i)
        with mode:
            out = run(args)
        seen |= mode.seen
        yield f"reorder-{i}", out
    if seen & _FUSED_ATTENTION:
        with sdpa_kernel([SDPBackend.MATH]):
            out = run(args)
        yield "sdpa-math", out
        with sdpa_kernel([SDPBackend.MATH]), Reordered(seed + n):
            out = run(args)
        yield "sdpa-math-reorder", out
    else:
        skipped.append(("sdpa-math", "the module runs no fused attention kernel"))
    size = _leading(args)
    for name, (chunks, back) in _batch_plans(size or 0).items():
        if size is None or not _batched_outputs(eager, size):
            skipped.append((name, "inputs and outputs do not all lead with one batch size of 2 or more"))
            continue
        if exact_of is None:
            skipped.append((name, "no float64 function of the inputs to check the batch split against"))
            continue
        if own is None:
            own = exact_of(args)
        if not _same_function(_in_batches(exact_of, args, chunks, back), own):
            skipped.append((name, "the float64 module gives another result: its batch elements are coupled"))
            continue
        yield name, _in_batches(run, args, chunks, back)


def _overall(outputs: Sequence[OutputSpread]) -> Conditioning:
    verdicts = {o.conditioning for o in outputs}
    return next((c for c in (Conditioning.ILL, Conditioning.WELL) if c in verdicts), Conditioning.UNRESOLVED)


def _output_spread(
    k: int, name: str, exact: torch.Tensor, eager: Any, executions: Sequence[Execution], parts: bool = False
) -> OutputSpread:
    """The ``k``-th floating output's spread over ``executions``."""
    e = _named_floats(eager, parts)[k][1]
    keep = torch.isfinite(_as_real(e)) & torch.isfinite(_as_real(exact))
    rms = float(_as_real(exact).double()[keep].pow(2).mean().sqrt()) if bool(keep.any()) else 0.0
    rmse = tuple(x.errors[k].rmse for x in executions)
    figures = OutputSpread(
        name=name,
        numel=e.numel(),
        dtype=e.dtype,
        rms_exact=rms,
        floor=FLOOR_ULPS * torch.finfo(e.dtype).eps * rms,
        canonical_rmse=rmse[0],
        rmse=rmse,
        max_abs=max(x.errors[k].max_abs for x in executions),
        off_eager=max(x.errors[k].off_eager for x in executions),
        conditioning=Conditioning.WELL,
    )
    return replace(figures, conditioning=_conditioning(figures))


# ---------------------------------------------------------------------------------------------------------
# The yardstick.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowed:
    """The error one output may show: ``rmse`` (the multiplier rule on the spread's upper end, plus the floor)
    and ``max_abs`` (the largest absolute error of any legitimate execution, for the pointwise rule's widening)."""

    name: str
    rmse: float
    max_abs: float
    conditioning: Conditioning


@dataclass(frozen=True)
class Yardstick:
    """What a compiled output is judged against, one :class:`Allowed` per floating output."""

    outputs: tuple[Allowed, ...]

    def excess(self, errors: Sequence[OutputError]) -> str:
        """'' when every error is within its allowance, else the first output over it and by how much."""
        for a, e in zip(self.outputs, errors, strict=True):
            if e.rmse > a.rmse:
                return (
                    f"{a.name}: RMSE against float64 {e.rmse:.3g} exceeds {a.rmse:.3g}, the multiplier rule on "
                    f"the largest error of the legitimate executions ({a.conditioning})"
                )
        return ""

    def admits(self, errors: Sequence[OutputError]) -> bool:
        return not self.excess(errors)


def allowed_error(
    spread: Spread, multiplier: float | Callable[[int, torch.dtype], float] = parity.multiplier
) -> Yardstick:
    """The calibrated yardstick: per output, ``m * max RMSE of the legitimate executions + floor``, where ``m``
    is ``multiplier`` (a number, or a function of an output's element count and dtype: by default
    :func:`esper.numerics.parity.multiplier`, judge's own) and the floor is judge's (FLOOR_ULPS ulps of the
    reference's RMS). Eager's one sample is one of the executions, so this never allows less than judge does."""
    allowed = []
    for o in spread.outputs:
        m = multiplier(o.numel, o.dtype) if callable(multiplier) else float(multiplier)
        allowed.append(Allowed(o.name, m * o.rmse_max + o.floor, o.max_abs, o.conditioning))
    return Yardstick(tuple(allowed))


# ---------------------------------------------------------------------------------------------------------
# Judging a failed case again against the yardstick.
# ---------------------------------------------------------------------------------------------------------


def _rmse_broken(o: parity.OutputVerdict) -> bool:
    """Whether the RMSE rule applied to an output (the reference stands above eager's rounding) and broke."""
    return o.resolved and o.rmse_compiled > o.allowed_rmse


def _pointwise_broken(o: parity.OutputVerdict) -> bool:
    return o.worst_diff > o.allowed_abs


def _values_alone(o: parity.OutputVerdict) -> bool:
    """Whether an output failed on its values alone: its NaN/inf placement stood, and the RMSE rule or the
    pointwise rule broke (not its shape or dtype, whose figures are all 0)."""
    return o.nonfinite_ok and (_rmse_broken(o) or _pointwise_broken(o))


def calibratable(verdicts: Mapping[str, parity.ParityVerdict]) -> bool:
    """Whether a failed case may be judged again against the calibrated yardstick (:func:`calibrate`): it
    failed, and every failing output of every part failed on its finite values alone (a structural failure, or
    a NaN or inf where eager and float64 do not allow one, stands)."""
    failing = [v for v in verdicts.values() if not v.passed]
    return bool(failing) and all(
        any(not o.passed for o in v.outputs) and all(_values_alone(o) for o in v.outputs if not o.passed)
        for v in failing
    )


def _widened_abs(o: parity.OutputVerdict, bound: Allowed) -> float:
    """Judge's pointwise bound for ``o`` with eager's worst float64 error replaced by the worst of any legitimate
    execution (``bound.max_abs``, eager's among them): the bound rises by the same amount at every element, so
    the element closest to breaking it stays the one judge found."""
    return o.allowed_abs + o.slack * max(0.0, bound.max_abs - o.eager_max_error)


@dataclass(frozen=True)
class PartCalibration:
    """One part's judgement against the calibrated yardstick: whether its failing outputs are within it (else
    ``reason``: the first beyond), and what the legitimate executions said of the part (its worst spread ratio,
    its worst disagreement with eager in ulps, its conditioning)."""

    part: str
    admitted: bool
    reason: str
    spread_ratio: float
    disagreement_ulps: float
    conditioning: Conditioning


@dataclass(frozen=True)
class Calibrated:
    """A case judged again against the calibrated yardstick: the verdicts (the re-judged outputs passed, with the
    yardstick's RMSE bound as ``allowed_rmse``, where every failing one is within it; else as they were), and per
    re-judged part what the executions said."""

    verdicts: dict[str, parity.ParityVerdict]
    parts: tuple[PartCalibration, ...]

    @property
    def admitted(self) -> bool:
        return bool(self.parts) and all(p.admitted for p in self.parts)


def _scaled(factor: float) -> Callable[[int, torch.dtype], float]:
    """Judge's multiplier rule times ``factor``."""
    return lambda numel, dtype: parity.multiplier(numel, dtype) * factor


def calibrate(
    verdicts: Mapping[str, parity.ParityVerdict],
    spread: Spread,
    reductions: Mapping[str, float] | None = None,
) -> Calibrated:
    """``verdicts`` (one :func:`~esper.numerics.parity.judge` per part, e.g. a training step's ``output``,
    ``gradient``, ``buffer``) judged again where :func:`calibratable`: each failing output's RMSE against float64
    against :func:`allowed_error` of ``spread`` (the legitimate executions of the same call, its outputs named as
    judge names them), with the part's rule: judge's multiplier times ``reductions[part]`` (by default
    :func:`~esper.numerics.parity.reduction_of`, as judge applies it), and each one's worst element against
    judge's pointwise rule with the executions' worst float64 error in place of eager's. Each rule is widened
    only as far as the executions go; the case passes only if every failing output of every part is within
    both."""
    verdicts = dict(verdicts)
    if not calibratable(verdicts):
        return Calibrated(verdicts, ())
    out, parts = dict(verdicts), []
    for label, v in verdicts.items():
        if v.passed:
            continue
        mine = spread.part(label)
        factor = parity.reduction_of(label) if reductions is None else reductions.get(label, 1.0)
        allowed = {a.name: a for a in allowed_error(mine, _scaled(factor)).outputs}
        reason, outputs = "", []
        for o in v.outputs:
            bound = allowed.get(o.name)
            if o.passed:
                outputs.append(o)
            elif bound is None:
                reason = reason or f"{o.name}: no legitimate execution measured it"
            elif o.resolved and o.rmse_compiled > bound.rmse:
                reason = reason or (
                    f"{o.name}: RMSE against float64 {o.rmse_compiled:.3g} exceeds {bound.rmse:.3g}, the multiplier "
                    f"rule on the largest error of the legitimate executions ({bound.conditioning})"
                )
            elif o.worst_diff > (widened := _widened_abs(o, bound)):
                reason = reason or (
                    f"{o.name}: differs from eager by {o.worst_diff:.3g} at a finite element, beyond the pointwise "
                    f"rule on the worst element of the legitimate executions {widened:.3g} ({bound.conditioning})"
                )
            else:
                outputs.append(replace(o, passed=True, reason="", allowed_rmse=bound.rmse, allowed_abs=widened))
        parts.append(
            PartCalibration(
                label, not reason, reason, mine.worst_ratio, mine.worst_disagreement_ulps, mine.conditioning
            )
        )
        if not reason:
            out[label] = replace(v, passed=True, reason="", outputs=tuple(outputs))
    if any(not p.admitted for p in parts):
        return Calibrated(verdicts, tuple(parts))
    return Calibrated(out, tuple(parts))


__all__ = [
    "ILL_CONDITIONED_ULPS",
    "ROUNDED",
    "Allowed",
    "Calibrated",
    "Conditioning",
    "Execution",
    "OutputError",
    "OutputSpread",
    "PartCalibration",
    "Reordered",
    "Rounded",
    "Spread",
    "Yardstick",
    "allowed_error",
    "calibratable",
    "calibrate",
    "errors_of",
    "spread",
]
