"""Seeds: one blueprint's compiled code, many sets of weights.

Every seed grown from a blueprint has its own weights. A seed is bound to a kernel by a state dict or by
the seed's own module; its names, shapes and dtypes are checked against the artifact's weight schema first,
and a mismatch is a :class:`WeightSchemaError` naming the tensor. The bound kernel holds the seed's module as
its submodule ``seed`` (a state dict is copied into a fresh build of the blueprint): its state is in the
host's state dict under that name, and its mode follows the host's ``train()``/``eval()``.

Inference packages hold their weights as constants. All seeds bound from one kernel share one extra loaded
copy of the package (the base kernel's own copy keeps the builder's weights) and take turns in it: before a
call, the seed's tensors are handed to the loader, aliased rather than copied (``user_managed``), whenever
the package holds another seed's, or this seed's tensors changed since. A tensor in another layout than the
row-major one the code reads (a column-major view) is handed as a contiguous copy, made again whenever the
live tensor changes. Swapping costs ~0.1 ms; each seed holds only its own weights.

A bound kernel follows the seed module as it is at each call, never as it was at bind: the tensors handed
to the package are the module's current parameters and buffers. Each call checks that nothing that could
change an answer changed since the last call that was validated, with one function generated for the seed
(:func:`compile_watch`: the same submodule classes, attribute, parameter, buffer and child objects, no hooks;
the same data pointer, layout, shape and dtype of each tensor; the same version of each tensor whose value the
compiled code holds apart, a folded weight or a contiguous copy). Anything else (``load_state_dict`` with
``assign=True``, pruning, a replaced ``Parameter``, ``.data`` assigned, ``train()``, a hook or attribute set,
a class reassigned) validates the module again before the compiled code may run, and a shape change never
reaches it. An in-place step (an optimizer's) reaches the compiled code through its alias, unvalidated.

The rule for "the compiled code computes what this seed's module would" is structural, not proven
equivalence (:class:`~esper.kasmina.conformance.SeedForm`, against a fresh build of the blueprint in eval
mode): the same class at every submodule, no forward or backward hooks, every attribute besides the weights
equal to the blueprint's (LoRA's ``scaling``), every submodule in eval mode, and weights of the blueprint's
shapes and dtypes on the entry's device. A seed that differs in any of these runs its own module eagerly, with
one WARNING (``seed-form`` or ``weights-changed``) naming the difference, even where its answer would happen
to agree: proving that would mean running both. The same holds for a call under autocast or an active torch
function or dispatch mode (``mode``).

Inductor may fold a weight into the compiled code at compile time (it then leaves the package's constant
list). Such a weight cannot take a seed's value: a seed whose folded weight differs from the blueprint's
runs eager, with the WARNING that names the tensor. Which weights are constants, and their shapes, is read
from the loaded package itself, never from the row: a row whose recorded constants disagree with its package
(an unsigned row altered), or that claims weights a frozen package folded, makes that route eager for seeds,
with a WARNING naming the entry.
"""

from __future__ import annotations

import copy
import functools
import itertools
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from esper.artifacts.runtime import CompiledPackage
from esper.artifacts.tensors import TensorSpec, WeightSchemaError, schema_of
from esper.kasmina import telemetry
from esper.kasmina.conformance import HOOK_TABLES, MODULE_TABLES, SeedForm

if TYPE_CHECKING:
    from esper.kasmina.kernel import Kernel, Route
    from esper.urza import Entry

Weights = torch.nn.Module | Mapping[str, torch.Tensor]
# Why a seed's call runs eager: (telemetry code, detail).
Problem = tuple[str, str]


def state_of(weights: Weights) -> dict[str, torch.Tensor]:
    """A state dict from a module or a mapping (a ``WeightSchemaError`` for anything else)."""
    if isinstance(weights, torch.nn.Module):
        return dict(weights.state_dict())
    if isinstance(weights, Mapping):
        bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightSchemaError(f"seed weight {bad[0]!r} is a {type(weights[bad[0]]).__name__}, not a Tensor")
        return dict(weights)
    raise WeightSchemaError(f"seed weights must be an nn.Module or a state dict, not {type(weights).__name__}")


def check_weights(state: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec], *, against: str) -> None:
    """Raise :class:`WeightSchemaError` naming the first tensor that is missing, unknown, or of another
    shape or dtype than ``expected`` (the schema of ``against``, e.g. ``"artifact #3 of 'tiny_mlp'"``)."""
    for name, spec in expected.items():
        if name not in state:
            raise WeightSchemaError(f"seed weights lack {name!r} ({spec.describe()}), which {against} needs")
        got = TensorSpec.of(name, state[name])
        if got != spec:
            raise WeightSchemaError(f"seed weight {name!r} is {got.describe()}; {against} expects {spec.describe()}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise WeightSchemaError(
            f"seed weight {unknown[0]!r} is not a weight of {against} (it has: {', '.join(sorted(expected))})"
        )


def seed_module(
    weights: Weights, build: Callable[[], torch.nn.Module], expected: Mapping[str, TensorSpec], *, against: str
) -> torch.nn.Module:
    """The module that holds a seed's weights: ``weights`` itself when it is a module, else a fresh build of
    the blueprint with a copy of ``weights`` loaded (so the seed owns them). Checked against ``expected``."""
    check_weights(state_of(weights), expected, against=against)
    if isinstance(weights, torch.nn.Module):
        return weights
    module = build()
    with torch.no_grad():
        module.load_state_dict(dict(weights), strict=True)
    return module


# -- inference kernels bound to a seed's weights ---------------------------------------------------------

_serial = itertools.count(1)
# One extra loaded copy of a package per base package, shared by every seed bound from it.
_seed_packages: weakref.WeakKeyDictionary[CompiledPackage, CompiledPackage] = weakref.WeakKeyDictionary()


def _shared_package(base: CompiledPackage) -> CompiledPackage:
    pkg = _seed_packages.get(base)
    if pkg is None:
        pkg = base.reload()
        _seed_packages[base] = pkg
    return pkg


def _never() -> bool:
    return False


@functools.lru_cache(maxsize=64)
def _watch_factory(source: str) -> Callable[..., Callable[[], bool]]:
    namespace: dict[str, Any] = {}
    exec(compile(source, "<seed watch>", "exec"), namespace)
    return namespace["make"]


def compile_watch(
    holder: Mapping[str, object], seed: object, *, views: Collection[int], versions: Collection[int]
) -> Callable[[], bool]:
    """A function telling, at the cost of one Python call, whether ``holder["seed"]`` is still ``seed`` as it is
    now: the same object; at every submodule the same class, the same attribute objects (the number of entries
    in its ``__dict__`` and each attribute's identity), no hook, the same parameter, buffer and child objects;
    each tensor whose id is in ``views`` the same view (data pointer, contiguity or strides, shape, dtype), and
    each in ``versions`` at the same version. The caller keeps an alias of each watched view alive, so that no
    tensor made later can take its data pointer.

    Generated as straight-line code, one check per watched object, the objects bound as closure cells: no loop,
    no unpacking, no attribute lookup on a module. The source holds only indices and depends on the seed's
    structure alone, so seeds of one blueprint share one compiled factory."""
    objects: list[object] = []

    def ref(obj: object) -> str:
        objects.append(obj)
        return f"o{len(objects) - 1}"

    checks = [f"{ref(holder)}[{ref('seed')}] is not {ref(seed)}"]
    modules = {id(m): m for m in seed.modules(remove_duplicate=False)} if isinstance(seed, torch.nn.Module) else {}
    tensors: dict[int, torch.Tensor] = {}
    for m in modules.values():
        d = vars(m)
        dn = ref(d)
        checks.append(f"type({ref(m)}) is not {ref(type(m))} or len({dn}) != {ref(len(d))}")
        checks += [f"{dn}[{ref(k)}] is not {ref(v)}" for k, v in d.items() if k not in MODULE_TABLES]
        checks.append(" or ".join(f"{dn}[{ref(h)}]" for h in HOOK_TABLES))
        for table in (m._parameters, m._buffers, m._modules):
            tn = ref(table)
            checks.append(f"len({tn}) != {ref(len(table))}" if table else tn)  # an empty table: its truth
            checks += [f"{tn}[{ref(k)}] is not {ref(v)}" for k, v in table.items()]
            if table is not m._modules:
                tensors.update((id(t), t) for t in table.values() if isinstance(t, torch.Tensor))
    for t in tensors.values():
        if id(t) not in views:
            continue
        tn = ref(t)
        # An exact layout check costs less as contiguity than as strides; is_set_to costs more than all four.
        layout = f"not {tn}.is_contiguous()" if t.is_contiguous() else f"{tn}.stride() != {ref(t.stride())}"
        checks.append(
            f"{tn}.data_ptr() != {ref(t.data_ptr())} or {layout} or {tn}.shape != {ref(t.shape)} "
            f"or {tn}.dtype is not {ref(t.dtype)}"
        )
        if id(t) in versions:
            checks.append(f"{tn}._version != {ref(t._version)}")
    source = "\n".join(
        [
            f"def make({', '.join(f'o{i}' for i in range(len(objects)))}):",
            "    def unchanged():",
            "        try:",
            *(f"            if {c}:\n                return False" for c in checks),
            "        except Exception:  # an entry removed and another added: a KeyError",
            "            return False",
            "        return True",
            "    return unchanged",
        ]
    )
    return _watch_factory(source)(*objects)


@dataclass(frozen=True)
class SeedPlan:
    """What one compiled route reads of a seed: its package's constants (name, shape, dtype, as the package
    declares them) and the floating-point weights it folded (which must keep the blueprint's values)."""

    entry: Entry
    constants: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    folded: tuple[str, ...]


def plan_route(entry: Entry, package: object, builder: Mapping[str, torch.Tensor]) -> SeedPlan | Problem:
    """How ``entry``'s loaded ``package`` takes a seed's weights, or why it cannot (the row is checked against
    the package, never trusted over it). A route that calls anything but a loaded package is a TypeError."""
    where = f"entry #{entry.id} (variant {entry.variant!r})"
    if not entry.meta.get("swappable", True):
        return telemetry.UNBINDABLE, f"{where} folds the weights into its compiled code"
    if not isinstance(package, CompiledPackage):
        raise TypeError(
            f"entry #{entry.id}'s route calls a {type(package).__name__}, not a loaded package: "
            "only a kernel Kasmina loaded can be bound to seeds"
        )
    specs = package.constant_specs()
    if specs is None:
        return telemetry.UNBINDABLE, f"{where}: its package's constant shapes cannot be read"
    recorded = entry.meta.get("constants") or {}
    try:
        row = {n: TensorSpec.from_dict(n, s) for n, s in recorded.items()}
    except (KeyError, TypeError, ValueError):
        row = {}
    actual = {n: TensorSpec(n, shape, str(dtype).removeprefix("torch.")) for n, (shape, dtype) in specs.items()}
    if row != actual:
        return telemetry.FORMAT, (
            f"{where}'s recorded constants {sorted(s.describe() + ' ' + n for n, s in row.items())} disagree "
            f"with its package's {sorted(s.describe() + ' ' + n for n, s in actual.items())}"
        )
    for name, spec in actual.items():
        mine = builder.get(name)
        if mine is None or TensorSpec.of(name, mine) != spec:
            have = "lacks it" if mine is None else f"has {TensorSpec.of(name, mine).describe()}"
            return telemetry.UNBINDABLE, f"{where}'s package reads {name!r} as {spec.describe()}; the blueprint {have}"
    folded = tuple(n for n, t in builder.items() if n not in specs and t.is_floating_point())
    return SeedPlan(entry, tuple((n, shape, dtype) for n, (shape, dtype) in specs.items()), folded)


class SeedBinding:
    """A seed module bound to compiled routes: validates it, hands each route its current tensors, and keeps a
    watch that tells, cheaply on every call, whether anything changed since the last validation.

    ``holder`` is the bound kernel's submodule table (the seed is ``holder["seed"]``, which the user may
    replace); ``plans`` the routes' :class:`SeedPlan`; ``builder`` the blueprint's own weights (what folded
    weights must equal); ``form`` the blueprint's :class:`SeedForm`; ``device`` the entries' device type.
    """

    def __init__(
        self,
        holder: dict[str, torch.nn.Module],
        plans: Sequence[SeedPlan],
        *,
        builder: Mapping[str, torch.Tensor],
        form: SeedForm,
        device: str,
    ):
        self._holder = holder
        self.plans = tuple(plans)
        self._builder = builder
        self._form = form
        self._device = device
        self._expected = schema_of(builder)
        self._folded = frozenset(n for plan in self.plans for n in plan.folded)
        self._taken = frozenset(n for plan in self.plans for n, _, _ in plan.constants)
        # Whether the seed is exactly as at the last validation (see compile_watch); every tensor of it then.
        self.unchanged: Callable[[], bool] = _never
        self._tensors: tuple[torch.Tensor, ...] = ()
        self._aliases: tuple[torch.Tensor, ...] = ()
        self.generation = 0
        self.problem: Problem | None = None
        self.route_problems: list[Problem | None] = [None] * len(self.plans)
        self.handed: list[dict[str, torch.Tensor]] = [{} for _ in self.plans]
        self.validate()

    def requires_grad(self) -> bool:
        """Whether any of the seed's tensors (as at the last validation) requires grad."""
        return any(t.requires_grad for t in self._tensors)

    def validate(self) -> Problem | None:
        """Check the seed as it is now, hand each route its tensors, and watch from here; the problem that
        sends every route eager (``None``: none does; :attr:`route_problems` has each route's own)."""
        seed = self._holder.get("seed")
        self.generation += 1
        live: dict[str, torch.Tensor] = {}
        if isinstance(seed, torch.nn.Module):
            live.update(seed.named_parameters(remove_duplicate=False))
            live.update(seed.named_buffers(remove_duplicate=False))
        # Only what can change an answer is watched (the seed's form aside). The compiled code reads a taken
        # tensor through an alias, so an in-place change reaches it, but a new view (``.data =``) does not; it
        # reads a contiguous copy of a taken tensor in another layout, and a folded weight's value, which both
        # an in-place change leaves stale. An integer tensor that no route takes (``num_batches_tracked``)
        # changes no answer of an eval-mode seed and is not compared when validating: only its object is.
        views = {id(t): t for n, t in live.items() if n in self._taken or t.is_floating_point()}
        versions = {id(t) for n, t in live.items() if n in self._folded or (n in self._taken and not t.is_contiguous())}
        self.unchanged = compile_watch(self._holder, seed, views=views.keys(), versions=versions)
        self._tensors = tuple({id(t): t for t in live.values()}.values())
        self._aliases = tuple(t.detach() for t in views.values())
        self.problem = self._check(seed, live)
        return self.problem

    def _check(self, seed: torch.nn.Module | None, live: Mapping[str, torch.Tensor]) -> Problem | None:
        if not isinstance(seed, torch.nn.Module):
            return telemetry.SEED_FORM, f"the bound kernel's seed is a {type(seed).__name__}, not a module"
        form = self._form.problem(seed, training=False)
        if form is not None:
            return telemetry.SEED_FORM, f"the seed module's form is not the blueprint's: {form}"
        for name, spec in self._expected.items():
            t = live.get(name)
            if t is None:
                return telemetry.WEIGHTS_CHANGED, f"the seed module has no weight {name!r} now"
            got = TensorSpec.of(name, t)
            if got != spec or t.device.type != self._device or t.layout != torch.strided:
                return telemetry.WEIGHTS_CHANGED, (
                    f"seed weight {name!r} is now {got.describe()} ({t.layout}) on {t.device}; the compiled "
                    f"code reads {spec.describe()} on {self._device}"
                )
        for i, plan in enumerate(self.plans):
            self.route_problems[i] = None
            differs = [n for n in plan.folded if not torch.equal(live[n].detach().cpu(), self._builder[n].cpu())]
            if differs:
                detail = f"weight {differs[0]!r} was folded into the compiled code of entry #{plan.entry.id}"
                self.route_problems[i] = (telemetry.UNBINDABLE, f"{detail}, and this seed's differs")
            # A layout the compiled code cannot read is handed as a contiguous copy, made again when it changes.
            self.handed[i] = {n: live[n].detach().contiguous() for n, _, _ in plan.constants}
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> SeedBinding:
        # A copy follows its own seed (the copied module, through the copied holder): the watch and the tensors
        # handed are this seed's, so the copy validates at its first call.
        new = copy.copy(self)
        memo[id(self)] = new
        new._holder = copy.deepcopy(self._holder, memo)
        new.unchanged, new._tensors, new._aliases = _never, (), ()
        new.route_problems = list(self.route_problems)
        new.handed = [{} for _ in self.plans]
        return new


class BoundPackage:
    """A shared package called with one seed's current tensors as its constants (see the module docstring)."""

    def __init__(self, package: CompiledPackage, binding: SeedBinding, index: int):
        self._package = package
        self._binding = binding
        self._index = index
        self._serial = next(_serial)

    def problem(self) -> Problem | None:
        """Why this call may not run compiled (``None``: it may): the seed is validated again first if anything
        changed since the last call. Cheap while the seed is unchanged."""
        b = self._binding
        problem = b.problem if b.unchanged() else b.validate()
        return problem or b.route_problems[self._index]

    def seed_requires_grad(self) -> bool:
        """Whether any of the seed's tensors requires grad (a call with grad on then needs eager's graph), the
        tensors as :meth:`problem` last saw them: call it first."""
        return self._binding.requires_grad()

    def _constants(self) -> dict[str, torch.Tensor]:
        return self._binding.handed[self._index]

    def __call__(self, args: Sequence[torch.Tensor]) -> Any:
        return self._package.run_with_constants((self._serial, self._binding.generation), self._constants, args)

    def __deepcopy__(self, memo: dict[int, Any]) -> BoundPackage:
        # A copy is another seed in the same shared package: its own serial, so it never serves this one's tensors.
        return BoundPackage(self._package, copy.deepcopy(self._binding, memo), self._index)

    def metadata(self) -> dict[str, str]:
        return self._package.metadata()

    def constant_names(self) -> list[str]:
        return [n for n, _, _ in self._binding.plans[self._index].constants]


def bind(kernel: Kernel, weights: Weights) -> tuple[torch.nn.Module, Callable[[dict[str, torch.nn.Module]], Any]]:
    """The seed module for ``weights`` and how to wire it: ``wire(holder)`` returns the routes of a kernel
    running ``kernel``'s compiled code with the seed's weights, ``holder`` being that kernel's submodule table
    (where the seed will be ``holder["seed"]``).

    ``weights`` is the seed's module (used as is, also as the eager path) or a state dict (copied into a
    fresh build of the blueprint). Names, shapes and dtypes must match the blueprint's state dict, else
    :class:`WeightSchemaError` names the tensor. A route whose package cannot take the seed's weights runs
    eager for every seed, with a WARNING saying why; a route a seed cannot use as it is now runs eager for
    that seed's calls, with a WARNING (see the module docstring).
    """
    base = kernel.origin
    own = base.eager_module()
    expected = schema_of(own.state_dict())
    # What a package may read of the seed: its state dict, and the non-persistent buffers no state dict holds
    # (the seed's own, made by its build as the blueprint's are).
    builder = {**dict(own.named_buffers()), **own.state_dict()}

    def build() -> torch.nn.Module:
        return base.build_eager().eval()

    module = seed_module(weights, build, expected, against=f"blueprint {base.blueprint!r}")
    form = base.__dict__.get("_seed_form")
    if form is None:
        form = SeedForm.of(build())
        base.__dict__["_seed_form"] = form

    def wire(holder: dict[str, torch.nn.Module]) -> list[Route]:
        routes: list[Route] = []
        plans: list[SeedPlan] = []
        slots: list[tuple[int, CompiledPackage]] = []
        for r in base.routes:
            if r.package is None:
                routes.append(r)
                continue
            plan = plan_route(r.entry, r.package, builder)
            if isinstance(plan, SeedPlan):
                assert isinstance(r.package, CompiledPackage)
                slots.append((len(routes), r.package))
                plans.append(plan)
            else:
                # Once per origin kernel and reason, not once per seed: a hundred seeds are one problem.
                code, detail = plan
                base.warn_once(code, f"{detail}; profile {r.entry.profile} runs eager for seeds")
                r = r.with_package(None)
            routes.append(r)
        if plans:
            device = plans[0].entry.compat.device_type
            binding = SeedBinding(holder, plans, builder=builder, form=form, device=device)
            for i, (at, package) in enumerate(slots):
                routes[at] = routes[at].with_package(BoundPackage(_shared_package(package), binding, i))
        return routes

    return module, wire
