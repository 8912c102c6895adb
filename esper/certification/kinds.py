"""What differs between certifying one artifact kind and another: a small interface, one class per kind.

:class:`~esper.certification.run.Certification` is the one skeleton (compile, parity, weights, repeated,
guards, latency, select, budgets, publish); it asks its :class:`KindChecks` only what a kind changes
(including how a seed with other weights is served: the loaded kernel's ``bind``, as Kasmina serves seeds):

- inference: the forward pass of a kernel loaded with ``Kasmina.load_entry``, judged under ``no_grad``
  against the eval-mode module and its float64 copy; the budget's p95 limits apply.
- training: one training step (forward and backward, weights as inputs) of a seed bound to the kernel that
  ``Kasmina.load_training`` loads, judged against eager autograd and the same step in float64
  (:func:`esper.numerics.gradients.exact_step`): the output, every input and parameter gradient, every floating
  buffer the step mutates; the budget's ratio cap applies, not its p95 limits (declared for the forward
  pass). ``ESPER_CERTIFY_TRAINING=0`` turns the training checks off.

The facts (which candidates, over which ranges, whether the kind can be turned off) are the kind's
:class:`~esper.artifacts.kinds.KindSpec`; a :class:`KindChecks` holds only how a kind is checked.

Both judge with :func:`esper.numerics.parity.judge` (see there for the rule); :meth:`KindChecks.expected` computes the
eager and float64 side of a case once, so that every candidate of a profile is judged against the same one.

The same compiled call that parity judges is also held to the rest of the contract with its caller
(:mod:`esper.certification.contract`): output metadata and aliasing against eager's output on the same
inputs, and mutation (the caller's inputs, and for training the seed's parameters and buffers, written only
where eager writes them, and then as eager does). Each side runs on its own copies of the case's inputs, so
the case's tensors are the state both calls started from.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils import _pytree as pytree

from esper.artifacts.guards import GuardSchema
from esper.artifacts.kinds import ArtifactKind, KindSpec, spec
from esper.artifacts.variants import VARIANTS
from esper.blueprint import Blueprint
from esper.catalog import Catalog
from esper.certification.contract import (
    ClauseResult,
    check_aliasing,
    check_metadata,
    check_mutation,
    named_state,
)
from esper.kasmina import Kasmina
from esper.numerics import executions
from esper.numerics.coverage import ValueCase
from esper.numerics.gradients import exact_step, floating_buffers, gradients, step, upstream
from esper.numerics.inputs import Regime
from esper.numerics.parity import (
    ParityVerdict,
    bitwise_equal,
    float64_copy,
    judge,
    nondeterministic,
    reduction_of,
    to_float64,
)
from esper.tezzeret.compiler import CompileOutcome, Tezzeret
from esper.urza import Entry, Urza

# The variable that turns training certification off (the training spec's opt-out).
TRAINING_ENV = str(spec(ArtifactKind.TRAINING).opt_out)


@dataclass(frozen=True)
class EagerCall:
    """Eager's side of the contract in one case: the inputs its call received (its own copies of the case's),
    and by :func:`~esper.certification.contract.named_state` names every tensor it could write after the call
    (inputs; for training the module's parameters and buffers), with the float64 step's buffers under the
    same names (training) to judge the updates eager makes."""

    args: tuple[Any, ...]
    after: Mapping[str, torch.Tensor]
    exact_after: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Expected:
    """What a parity case is judged against, computed once per case and reused for every candidate: eager's
    float32 result and the float64 reference (eager on float64 copies of the module and the inputs), each a
    dict ``{"output": ..., "gradient": {...}, "buffer": {...}}`` of the parts the kind compares, and eager's
    side of the contract (``None``: the contract is not judged in this case)."""

    eager: Mapping[str, Any]
    exact: Mapping[str, Any]
    call: EagerCall | None = None

    @property
    def nbytes(self) -> int:
        call = [] if self.call is None else [list(self.call.args), dict(self.call.after), dict(self.call.exact_after)]
        leaves = pytree.tree_leaves([dict(self.eager), dict(self.exact), *call])
        return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class Judged:
    """One compiled call of a parity case: the path it took, one verdict per part the kind compares, and the
    contract clauses judged on the same call (with how many tensors they looked at)."""

    path: str | None
    verdicts: dict[str, ParityVerdict]
    contract: tuple[ClauseResult, ...] = ()
    tensors: int = 0


def copies(args: Sequence[Any]) -> tuple[Any, ...]:
    """Fresh copies of a case's tensors (strides kept), so that a call cannot write into the case's own."""
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)


def nonfinite(args: Sequence[Any]) -> bool:
    """Whether a floating input holds NaN or an infinity (the non-finite value regime)."""
    return any(isinstance(a, torch.Tensor) and a.is_floating_point() and not bool(a.isfinite().all()) for a in args)


class Received:
    """The positional tensors a module's call received, caught by a forward pre-hook (a training step runs the
    module on copies it makes itself: these are the tensors the call could write into)."""

    def __init__(self, module: torch.nn.Module):
        self.args: tuple[Any, ...] = ()
        self._handle = module.register_forward_pre_hook(self._seen)

    def _seen(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not self.args:
            self.args = tuple(args)

    def __enter__(self) -> Received:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._handle.remove()


def _detached(x: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)


class KindChecks(ABC):
    """The checks of one artifact kind for one blueprint on one device (see the module docstring)."""

    artifact: ClassVar[ArtifactKind]

    def __init__(self, bp: Blueprint, urza_path: Path, device: str = "cpu"):
        self.bp, self.urza_path, self.device = bp, urza_path, device
        self._eager: torch.nn.Module | None = None
        self._float64: torch.nn.Module | None = None
        self._built: torch.nn.Module | None = None

    @property
    def spec(self) -> KindSpec:
        """The declarative facts of this kind (candidates, ranges, opt-out)."""
        return spec(self.artifact)

    @property
    def grad_enabled(self) -> bool:
        """Whether a timed call records autograd: the kind's compiled code serves the backward."""
        return self.spec.backward

    @property
    def shares_cells(self) -> bool:
        """Whether a profile's cells may be shared between candidates (the kind's runtime routes each call to
        the certified entry whose cell it is), or one candidate serves the whole profile."""
        return not self.spec.backward

    @property
    def p95_budget(self) -> bool:
        """Whether the blueprint's p95 limits (declared for the forward pass) apply to this kind's latency."""
        return not self.spec.backward

    def disabled(self) -> str | None:
        """Why this kind is not certified in this run (``None``: it is)."""
        return self.spec.disabled()

    def compile(self, *, profile: str, variant: str) -> CompileOutcome:
        """Compile one candidate with Tezzeret, or reuse the entry with the same content hash and key."""
        with Urza(self.urza_path) as urza:
            return Tezzeret(urza, device=self.device).compile(
                self.bp, artifact=self.artifact, variant=VARIANTS[variant], profile=profile
            )

    def stored(self, *, profile: str, variant: str) -> Entry | None:
        """The entry :meth:`compile` would reuse for this candidate (``None``: it would compile)."""
        with Urza(self.urza_path) as urza:
            return Tezzeret(urza, device=self.device).stored(
                self.bp, artifact=self.artifact, variant=VARIANTS[variant], profile=profile
            )

    def check_specialization(self, *, profile: str, variant: str) -> None:
        """Raise :class:`~esper.tezzeret.pipeline.NotSpecialized` unless the specialization ``profile`` would
        compile (its profile's entries are compiled or reused here; the specialization is not)."""
        with Urza(self.urza_path) as urza:
            Tezzeret(urza, device=self.device).check_specialization(
                self.bp, artifact=self.artifact, variant=VARIANTS[variant], profile=profile
            )

    def kasmina(self) -> Kasmina:
        """A Kasmina over this certification's Urza that knows only this blueprint."""
        return Kasmina(self.urza_path, catalog=Catalog({self.bp.name: self.bp}), device=self.device)

    @abstractmethod
    def load(self, entry_id: int) -> Any:
        """The entry loaded exactly as Kasmina loads it for a run (checksum, C++ loader, pre-warm, guards)."""

    def built(self) -> torch.nn.Module:
        """A fresh copy of the blueprint's module as its builder returns it: built once, then deep-copied
        (building seeds torch's RNG, which costs more than a small module's whole parity case)."""
        if self._built is None:
            self._built = self.bp.build().to(self.device)
        return copy.deepcopy(self._built)

    def eager(self) -> torch.nn.Module:
        """The timing reference: the blueprint's own module, built independently of any kernel."""
        if self._eager is None:
            self._eager = self.reference()
        return self._eager

    @abstractmethod
    def reference(self) -> torch.nn.Module:
        """A fresh module of the blueprint in the mode this kind runs it in."""

    def spread_module(self, state: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """The module whose legitimate float32 executions measure a case's conditioning (a fresh one in this
        kind's mode: the spread runs it several times), holding ``state`` (a seed's weight set; ``None``: the
        blueprint's own weights)."""
        return self.reference() if state is None else self.seed(state)

    @abstractmethod
    def spread_of(
        self,
        args: Sequence[torch.Tensor],
        expected: Expected,
        seed: int,
        state: Mapping[str, torch.Tensor] | None = None,
        enough: Callable[[executions.Spread], bool] | None = None,
    ) -> executions.Spread:
        """The legitimate float32 executions (:func:`esper.numerics.executions.spread`) of the call a case judges,
        on the module holding ``state`` (``None``: the blueprint's weights), against ``expected``'s float64
        reference, its outputs named as :meth:`judge` names each part's: what the calibrated yardstick of a
        case that failed on its values alone is drawn from (``enough``: see the spread's)."""

    def parity_regime(self, regime: Regime) -> Regime:
        """The value regime a drawn parity case runs in (a kind may exclude points where results are undefined)."""
        return regime

    def value_case(self, case: ValueCase) -> ValueCase:
        """The value case a planned parity case runs in (the same exclusions as :meth:`parity_regime`)."""
        return case

    @abstractmethod
    def expected(self, args: Sequence[torch.Tensor], seed: int) -> Expected:
        """Eager's float32 result and the float64 reference on ``args`` (``seed``: a training step's upstream
        gradient): computed once per case, reused for every candidate."""

    def judge(
        self, kernel: Any, args: Sequence[torch.Tensor], expected: Expected, seed: int
    ) -> tuple[str | None, dict[str, ParityVerdict]]:
        """Run one accepted parity case through ``kernel``: the path the compiled side took, and one
        :func:`~esper.numerics.parity.judge` per part the kind compares (``output``; ``gradient``, ``buffer``)."""
        judged = self.call(kernel, args, expected, seed)
        return judged.path, judged.verdicts

    @abstractmethod
    def call(self, kernel: Any, args: Sequence[torch.Tensor], expected: Expected, seed: int) -> Judged:
        """:meth:`judge`, with the contract clauses judged on the same compiled call (see the module docstring).
        The kernel runs on fresh copies of ``args``; ``args`` stay as the case drew them."""

    def contract(
        self,
        got: Any,
        received: Sequence[Any],
        before: Mapping[str, torch.Tensor],
        after: Mapping[str, torch.Tensor],
        expected: Expected,
        *,
        judge_updates: bool = True,
    ) -> tuple[tuple[ClauseResult, ...], int]:
        """The contract clauses of one compiled call, against eager's side in ``expected``: its output ``got``
        and the tensors its call ``received``; ``before`` and ``after`` the writable tensors by name (the
        case's own inputs stand for the state before). Without ``judge_updates`` the tensors eager updates
        are left out (their values are undefined in this case); the rest must still stay unchanged."""
        if expected.call is None:
            return (), 0
        tol = self.bp.tolerance
        eager_out = expected.eager["output"]
        if not judge_updates:
            eager_after = expected.call.after
            before = {n: t for n, t in before.items() if n in eager_after and bitwise_equal(eager_after[n].detach(), t)}
        clauses = (
            check_metadata(got, eager_out),
            check_aliasing(got, eager_out, received, expected.call.args),
            check_mutation(before, after, expected.call.after, expected.call.exact_after, atol=tol.atol, rtol=tol.rtol),
        )
        outputs = sum(1 for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor))
        return clauses, outputs + len(before)

    @abstractmethod
    def nondeterministic(self, args: Sequence[torch.Tensor]) -> bool:
        """Whether eager gives different results in two identical runs on ``args``."""

    def _judged(self, part: str, got: Any, expected: Expected) -> ParityVerdict:
        tol = self.bp.tolerance
        # Gradients and buffers are reductions of a whole step (see esper.numerics.parity.REDUCTION).
        reduction = reduction_of(part)
        return judge(
            got,
            expected.eager[part],
            expected.exact[part],
            atol=tol.atol,
            rtol=tol.rtol,
            label=part,
            reduction=reduction,
        )

    @abstractmethod
    def run_refused(self, kernel: Any, args: Sequence[torch.Tensor]) -> tuple[str | None, int]:
        """Call with inputs the guards refuse: the path the call took and how many compiled calls it made."""

    @abstractmethod
    def timed(self, module: Any, args: Sequence[torch.Tensor]) -> Callable[[], Any]:
        """The call to time: ``module`` (a kernel or :meth:`eager`) on ``args``."""

    # -- a seed's weights (the weights and repeated-calls checks) ----------------------------------------------

    def seed(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """A fresh module of the blueprint holding ``state`` (a weight set), in the mode this kind runs it in:
        a seed with those weights, built independently of any kernel."""
        module = self.reference()
        module.load_state_dict(dict(state))
        return module

    def folded(self, entry: Entry) -> tuple[bool, tuple[str, ...]]:
        """Whether ``entry``'s compiled code folded the weights in (it is then certified for the blueprint's
        own weights only: Kasmina runs any other seed eager), and the floating weights a swappable entry
        folded (a seed can hold only the blueprint's values there; every weight set keeps them)."""
        return False, ()

    @abstractmethod
    def serving(self, kernel: Any, state: Mapping[str, torch.Tensor] | None) -> Any:
        """What serves a seed holding ``state`` (``None``: the blueprint's own weights) through the path
        Kasmina serves seeds by: the kernel bound to a fresh module holding those weights."""

    @abstractmethod
    def expected_with(self, module: torch.nn.Module, args: Sequence[torch.Tensor], seed: int) -> Expected:
        """:meth:`expected` of ``module`` (a fresh seed module, which this may change) instead of the
        blueprint's own."""

    @abstractmethod
    def serve(self, served: Any, args: Sequence[torch.Tensor], seed: int) -> tuple[str | None, dict[str, Any]]:
        """One call of ``served`` (see :meth:`serving`) on ``args``: the path it took and the parts this kind
        compares (``output``; ``gradient``, ``buffer``), as :meth:`judge` compares them."""

    def judge_parts(self, got: Mapping[str, Any], expected: Expected) -> dict[str, ParityVerdict]:
        """The parts of ``got`` (from :meth:`serve`) judged against ``expected`` as :meth:`judge` judges them."""
        out = {}
        for part, value in got.items():
            want = expected.eager[part]
            if isinstance(value, Mapping) and isinstance(want, Mapping) and set(value) == set(want):
                value = {n: value[n] for n in want}  # by name, in eager's order
            out[part] = self._judged(part, value, expected)
        return out

    def store_eager_route(
        self, urza: Urza, *, profile: str, guards: GuardSchema | None, evidence: Mapping[str, Any], reason: str
    ) -> Entry:
        """A certified eager route for ``profile``: certification measured eager fastest there."""
        return Tezzeret(urza, device=self.device).store_eager_route(
            self.bp, artifact=self.artifact, profile=profile, guards=guards, evidence=dict(evidence), reason=reason
        )


class InferenceChecks(KindChecks):
    """The forward pass, under ``no_grad``, against the eval-mode module."""

    artifact = ArtifactKind.INFERENCE

    def load(self, entry_id: int) -> Any:
        return self.kasmina().load_entry(self.bp.name, entry_id)

    def reference(self) -> torch.nn.Module:
        return self.built().eval()

    def _double(self) -> torch.nn.Module:
        if self._float64 is None:
            self._float64 = float64_copy(self.eager())
        return self._float64

    def expected(self, args: Sequence[torch.Tensor], seed: int) -> Expected:
        with torch.no_grad():
            exact = self._double()(*to_float64(args))
            mine = copies(args)
            out = self.eager()(*mine)
        return Expected({"output": out}, {"output": exact}, EagerCall(mine, named_state(mine)))

    def call(self, kernel: Any, args: Sequence[torch.Tensor], expected: Expected, seed: int) -> Judged:
        mine = copies(args)
        with torch.no_grad():
            got = kernel(*mine)
        clauses, tensors = self.contract(got, mine, named_state(args), named_state(mine), expected)
        return Judged(kernel.last_path, {"output": self._judged("output", got, expected)}, clauses, tensors)

    def nondeterministic(self, args: Sequence[torch.Tensor]) -> bool:
        with torch.no_grad():
            return nondeterministic(lambda: self.eager()(*args))

    def run_refused(self, kernel: Any, args: Sequence[torch.Tensor]) -> tuple[str | None, int]:
        before = kernel.compiled_calls
        # Eager may rightly reject these inputs; what matters is the path the call took.
        with torch.no_grad(), contextlib.suppress(Exception):
            kernel(*args)
        return kernel.last_path, kernel.compiled_calls - before

    def timed(self, module: Any, args: Sequence[torch.Tensor]) -> Callable[[], Any]:
        return lambda: module(*args)

    def folded(self, entry: Entry) -> tuple[bool, tuple[str, ...]]:
        if not entry.meta.get("swappable", True):
            return True, ()
        constants = entry.meta.get("constants")
        if not isinstance(constants, Mapping):
            return False, ()  # Kasmina cannot plan a seed for such a row: binding runs eager, and the check says so
        own = self.built().state_dict()
        return False, tuple(n for n, t in own.items() if t.is_floating_point() and n not in constants)

    def serving(self, kernel: Any, state: Mapping[str, torch.Tensor] | None) -> Any:
        return kernel if state is None else kernel.bind(self.seed(state))

    def expected_with(self, module: torch.nn.Module, args: Sequence[torch.Tensor], seed: int) -> Expected:
        with torch.no_grad():
            return Expected({"output": module(*args)}, {"output": float64_copy(module)(*to_float64(args))})

    def serve(self, served: Any, args: Sequence[torch.Tensor], seed: int) -> tuple[str | None, dict[str, Any]]:
        with torch.no_grad():
            out = served(*args)
        return served.last_path, {"output": out}

    def spread_of(
        self,
        args: Sequence[torch.Tensor],
        expected: Expected,
        seed: int,
        state: Mapping[str, torch.Tensor] | None = None,
        enough: Callable[[executions.Spread], bool] | None = None,
    ) -> executions.Spread:
        return executions.spread(self.spread_module(state), args, expected.exact["output"], seed=seed, enough=enough)


class TrainingChecks(KindChecks):
    """One training step of a seed bound to the kernel, against eager autograd on a fresh module."""

    artifact = ArtifactKind.TRAINING

    def load(self, entry_id: int) -> Any:
        return self.kasmina().load_training(self.bp.name, entry_id=entry_id)

    def reference(self) -> torch.nn.Module:
        return self.built().train()

    def parity_regime(self, regime: Regime) -> Regime:
        # An all-zero input puts e.g. a zero-bias BatchNorm's output exactly on ReLU's kink, where the gradient
        # is implementation-defined: compare gradients at differentiable points only.
        return replace(regime, zeros="some") if regime.zeros == "all" else regime

    def value_case(self, case: ValueCase) -> ValueCase:
        return replace(case, regime="some-zeros") if case.regime == "all-zeros" else case

    def _eager_step(self, module: torch.nn.Module, args: Sequence[torch.Tensor], seed: int) -> dict[str, Any]:
        out, grads = gradients(module, args, seed=seed)
        return {"output": _detached(out), "gradient": grads, "buffer": floating_buffers(module)}

    def expected(self, args: Sequence[torch.Tensor], seed: int) -> Expected:
        # Fresh modules: a step mutates buffers (BatchNorm statistics) that later cases would read.
        fresh = self.reference()
        out, grads, buffers = exact_step(fresh, args, seed=seed)  # a float64 copy: `fresh` is untouched
        exact = {"output": _detached(out), "gradient": grads, "buffer": buffers}
        with Received(fresh) as received:
            eager = self._eager_step(fresh, args, seed)
        after = named_state(received.args, fresh)
        call = EagerCall(received.args, after, {f"buffer[{n!r}]": b for n, b in buffers.items()})
        if nonfinite(args):
            # With NaN or inf among the inputs, gradients and the statistics a step accumulates are not
            # defined by the function alone: a subgradient at NaN (relu's backward masks by `x > 0` or by
            # `x <= 0`), a variance of inf (inf - inf, or Welford's update) differ between equally correct
            # implementations. The forward output still has one answer, and is judged.
            return Expected({"output": eager["output"]}, {"output": exact["output"]}, call)
        return Expected(eager, exact, call)

    def call(self, kernel: Any, args: Sequence[torch.Tensor], expected: Expected, seed: int) -> Judged:
        bound = kernel.bind(self.built())
        before = named_state(args) | {n: t.detach().clone() for n, t in named_state((), bound.seed).items()}
        with Received(bound) as received:
            out, grads = gradients(bound, args, seed=seed, weights=bound.seed)
        path = bound.last_path
        want = expected.eager.get("gradient", {})
        # Gradients by name, in eager's order; a name missing on either side is a structural failure.
        got_grads = {n: grads.get(n) for n in want} if set(grads) == set(want) else grads
        got = {"output": _detached(out), "gradient": got_grads, "buffer": floating_buffers(bound.seed)}
        verdicts = {part: self._judged(part, got[part], expected) for part in expected.eager}
        after = named_state(received.args, bound.seed)
        clauses, tensors = self.contract(
            got["output"], received.args, before, after, expected, judge_updates="buffer" in expected.eager
        )
        return Judged(path, verdicts, clauses, tensors)

    def nondeterministic(self, args: Sequence[torch.Tensor]) -> bool:
        return nondeterministic(lambda: self._eager_step(self.reference(), args, 0))

    def run_refused(self, kernel: Any, args: Sequence[torch.Tensor]) -> tuple[str | None, int]:
        seed = kernel.bind(self.built())
        # Eager may rightly reject these inputs; what matters is the path the call took.
        with contextlib.suppress(Exception):
            seed(*args)
        return seed.last_path, seed.compiled_calls

    def timed(self, module: Any, args: Sequence[torch.Tensor]) -> Callable[[], Any]:
        inputs = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
        with torch.no_grad():
            flat = [t for t in pytree.tree_leaves(self.eager()(*inputs)) if isinstance(t, torch.Tensor)]
        grads = upstream(flat)
        return lambda: step(module, inputs, grads)

    def serving(self, kernel: Any, state: Mapping[str, torch.Tensor] | None) -> Any:
        return kernel.bind(self.built().train() if state is None else self.seed(state))

    def expected_with(self, module: torch.nn.Module, args: Sequence[torch.Tensor], seed: int) -> Expected:
        out, grads, buffers = exact_step(module, args, seed=seed)  # a float64 copy: `module` is untouched
        exact = {"output": _detached(out), "gradient": grads, "buffer": buffers}
        return Expected(self._eager_step(module, args, seed), exact)

    def serve(self, served: Any, args: Sequence[torch.Tensor], seed: int) -> tuple[str | None, dict[str, Any]]:
        out, grads = gradients(served, args, seed=seed, weights=served.seed)
        return served.last_path, {"output": _detached(out), "gradient": grads, "buffer": floating_buffers(served.seed)}

    def spread_of(
        self,
        args: Sequence[torch.Tensor],
        expected: Expected,
        seed: int,
        state: Mapping[str, torch.Tensor] | None = None,
        enough: Callable[[executions.Spread], bool] | None = None,
    ) -> executions.Spread:
        # The whole step is each execution: forward, backward, the buffers it updates, each time on a fresh copy
        # of one module (a step mutates its buffers), with the parts the case judges.
        template, parts = self.spread_module(state), tuple(expected.exact)

        def run(inputs: Sequence[Any]) -> dict[str, Any]:
            got = self._eager_step(copy.deepcopy(template), inputs, seed)
            return {part: got[part] for part in parts}

        return executions.spread(run, args, dict(expected.exact), seed=seed, parts=True, enough=enough)


KINDS: dict[ArtifactKind, type[KindChecks]] = {
    ArtifactKind.INFERENCE: InferenceChecks,
    ArtifactKind.TRAINING: TrainingChecks,
}
