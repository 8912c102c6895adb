"""Kasmina in training: a seed's kernel that runs its forward and backward as compiled code.

A :class:`TrainingKernel` is an ``nn.Module`` holding the seed's own module (``kernel.seed``), so its
``parameters()`` and its state dict are the seed's and an optimizer steps them in place. In ``train()`` mode
each call whose inputs the guards accept runs the training artifact's forward package through a
``torch.autograd.Function`` whose backward runs the backward package; the weights are inputs of both, so
optimizer steps take effect without rebinding, and buffers the forward mutates (BatchNorm's running statistics
and batch counter) are updated from the package's outputs, as eager updates them. In ``eval()`` mode it runs
the certified inference kernel bound to the seed's weights (see :mod:`esper.kasmina.seeds`), or eager.

The compiled step is the blueprint's forward traced in train mode, so a call takes it only while eager would
compute the same thing; otherwise the seed's own module runs it, with one WARNING per distinct refusal:

- the guards refuse the inputs (``outside-guards``);
- the calling thread's dispatch state changes what eager computes: autocast, a ``TorchFunctionMode`` or
  ``TorchDispatchMode``, a process-wide forward hook (``mode``, :func:`esper.kasmina.conformance.mode_problem`);
- the seed module's form is not the blueprint's: another class at some submodule, a forward or backward hook
  (``torch.nn.utils.prune`` adds one), a changed attribute such as LoRA's ``scaling``, a submodule not in
  train mode (``seed-form``, :class:`esper.kasmina.conformance.SeedForm`). The rule is structural: a seed that
  differs in form is refused even where its computation would agree, since proving that means running both;
- a weight the call would hand the compiled code has another dtype, shape or device than the artifact's, is
  no parameter any more, or requires grad where the artifact froze it (``weights-changed``).

The kernel follows the seed module at each call: the tensors it hands the packages are the module's current
parameters and buffers, found again by name whenever the module changed (``load_state_dict(assign=True)``, a
replaced ``Parameter`` or submodule). The full form check runs at binding and again only when a per-call
identity comparison (every submodule's class, hook tables, attributes, children, parameters and buffers)
sees a change. A parameter that is not contiguous (a column-major view) is handed to the compiled code as a
contiguous copy made in the call, through autograd, so its gradient reaches the user's parameter.

A double backward (``torch.autograd.grad(..., create_graph=True)`` then a backward through that gradient:
gradient penalties) cannot run through the backward package, whose gradients are not differentiable. Such a
backward recomputes that step eagerly, with ``torch.func.functional_call`` on a private build of the blueprint
from the step's own inputs, parameters and buffers as they were before the step (buffers cloned, nothing
mutated twice), and returns differentiable gradients, with one WARNING (``double-backward``). The first-order
backward keeps the compiled package.

``copy.deepcopy`` copies the seed module and shares the loaded program (read-only); the copy follows its own
weights. Pickling (``torch.save`` of a host) stores the kernel's ``source`` (how Kasmina loads it again) and
the seed module, never native code; unpickling loads the kernel again and binds the seed. A kernel without a
source cannot be pickled (``TypeError``).

Every seed of a blueprint shares one loaded :class:`TrainingProgram` (the packages and the manifest); each
holds only its own weights. Nothing here compiles or imports the compiler; loading from Urza is
:mod:`esper.kasmina.loader`'s job.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from operator import is_
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from esper.artifacts.guards import compile_check
from esper.artifacts.runtime import CompiledPackage
from esper.artifacts.servable import serving_problem
from esper.artifacts.tensors import TensorSpec, WeightSchemaError, schema_of
from esper.artifacts.training_manifest import TrainingManifest
from esper.kasmina import telemetry
from esper.kasmina.base import COMPILED, EAGER, KernelBase
from esper.kasmina.conformance import HOOK_TABLES, MODULE_TABLES, SeedForm, mode_problem
from esper.kasmina.regions import region_lookup
from esper.kasmina.seeds import Weights, seed_module
from esper.urza import Entry

if TYPE_CHECKING:
    from esper.kasmina.kernel import Kernel

__all__ = [
    "COMPILED",
    "EAGER",
    "TrainingKernel",
    "TrainingProgram",
    "manifest_problem",
    "restore_training_kernel",
    "same_weights",
]


class TrainingProgram:
    """A training artifact's two programs wired by its manifest: built from the manifest and the two loaded
    packages, by Kasmina's loader from a verified artifact or by Tezzeret from the packages it just compiled."""

    def __init__(self, manifest: TrainingManifest, forward: CompiledPackage, backward: CompiledPackage):
        self.manifest = m = manifest
        self._forward = forward
        self._backward = backward
        # The CUDA device both packages run on (-1: CPU, or a stand-in program without a device).
        self.device_index: int = getattr(forward, "device_index", -1)
        params = {s.name: i for i, s in enumerate(m.params)}
        buffers = {s.name: i for i, s in enumerate(m.buffers)}
        index = {"input": (0, None), "param": (1, params), "buffer": (2, buffers)}
        self._fw_in = []
        for source, key in m.forward_inputs:
            which, table = index[source]
            self._fw_in.append((which, key if table is None else table[key]))
        self._mutations = [(j, buffers[s[1]]) for j, s in enumerate(m.forward_outputs) if s[0] == "mutation"]
        # The buffers the forward updates (indices into ``manifest.buffers``).
        self.mutated_buffers = tuple(b for _, b in self._mutations)
        self._outputs = [0] * m.n_outputs
        for j, s in enumerate(m.forward_outputs):
            if s[0] == "output":
                self._outputs[s[1]] = j
        refs = [tuple(s) for s in m.backward_inputs if s[0] in ("forward_input", "forward_output")]
        self._saved = list(dict.fromkeys(refs))
        position = {ref: i for i, ref in enumerate(self._saved)}
        # Each backward input: ("sizes",), ("saved", i) or ("tangent", k).
        self._bw_in = [("saved", position[tuple(s)]) if tuple(s) in position else tuple(s) for s in m.backward_inputs]
        self._bw_out = [
            (0 if s[0] == "input" else 1, s[1] if s[0] == "input" else params[s[1]]) for s in m.backward_outputs
        ]
        self._sizes = m.sizes
        self._out_spec = pytree.treespec_loads(m.out_spec)

    def __deepcopy__(self, memo: dict[int, Any]) -> TrainingProgram:
        # Loaded compiled code, read-only once built: every copy of a kernel shares it.
        return self

    def __reduce__(self) -> Any:
        raise TypeError("a loaded training program cannot be pickled: pickle what loads it again (its kernel's source)")

    def forward(
        self, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, ...]]:
        """Run the forward package; apply buffer mutations. Returns the outputs, what the backward needs,
        and the dynamic sizes."""
        groups = (inputs, params, buffers)
        args = [groups[which][i] for which, i in self._fw_in]
        outs = self._forward(args)
        with torch.no_grad():
            for j, b in self._mutations:
                buffers[b].copy_(outs[j])
        saved = [args[i] if source == "forward_input" else outs[i] for source, i in self._saved]
        sizes = tuple(inputs[k].shape[d] for k, d in self._sizes)
        return [outs[j] for j in self._outputs], saved, sizes

    def backward(
        self, sizes: tuple[int, ...], saved: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Run the backward package: gradients per input and per parameter (``None`` where there is none)."""
        args = []
        for slot in self._bw_in:
            if slot[0] == "saved":
                args.append(saved[slot[1]])
            elif slot[0] == "tangent":
                args.append(grads[slot[1]].contiguous())
            else:
                args.append(torch.empty((*sizes, 0), device=grads[0].device))
        outs = self._backward(args)
        input_grads: list[torch.Tensor | None] = [None] * self.manifest.n_inputs
        param_grads: list[torch.Tensor | None] = [None] * len(self.manifest.params)
        for g, (which, i) in zip(outs, self._bw_out, strict=True):
            (input_grads if which == 0 else param_grads)[i] = g
        return input_grads, param_grads

    def unflatten(self, outputs: Sequence[torch.Tensor]) -> Any:
        return pytree.tree_unflatten(list(outputs), self._out_spec)


class _CompiledStep(torch.autograd.Function):
    """Forward package in ``forward``, backward package in ``backward``; buffers ride along untracked.

    The step's inputs and parameters are saved too, and the buffers as they were before the forward (the
    mutated ones cloned), so that a backward with ``create_graph=True`` can recompute the step eagerly."""

    @staticmethod
    def forward(
        ctx: Any,
        shared: _Shared,
        warn: Callable[[str, str], None],
        buffers: list[torch.Tensor],
        n_inputs: int,
        *tensors: Any,
    ) -> Any:
        program = shared.program
        assert program is not None
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        before = list(buffers)
        for b in program.mutated_buffers:
            before[b] = buffers[b].clone()
        outputs, saved, sizes = program.forward(inputs, params, buffers)
        ctx.shared, ctx.warn, ctx.sizes, ctx.n_inputs, ctx.n_saved = shared, warn, sizes, n_inputs, len(saved)
        ctx.buffers = before
        ctx.save_for_backward(*saved, *tensors)
        differentiable = set(program.manifest.differentiable)
        ctx.mark_non_differentiable(*(o for k, o in enumerate(outputs) if k not in differentiable))
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        stored = ctx.saved_tensors
        saved, tensors = stored[: ctx.n_saved], stored[ctx.n_saved :]
        if torch.is_grad_enabled():
            # create_graph=True: the backward package's gradients are constants to autograd; recompute eagerly.
            ctx.warn(
                telemetry.DOUBLE_BACKWARD,
                "a backward with create_graph=True (a double backward, e.g. a gradient penalty) cannot run "
                "through the compiled backward; such steps' gradients are recomputed eagerly",
            )
            return (None, None, None, None, *ctx.shared.recompute(ctx.n_inputs, tensors, ctx.buffers, grads))
        input_grads, param_grads = ctx.shared.program.backward(ctx.sizes, saved, grads)
        return (None, None, None, None, *input_grads, *param_grads)


class _Watch:
    """The seed module as its form and tensors were last checked in full, and the verdict.

    A call compares, by identity, every watched value (each submodule's attributes, mode, children,
    parameters and buffers, and the kernel's ``seed``), whether any hook table holds a hook, and every
    submodule's class with what they were then: three C-level passes, no Python loop per item. Any
    difference sends the call through the full check again (:meth:`TrainingKernel._rewatch`). Mutating an
    attribute's value in place (not rebinding it) is not seen."""

    __slots__ = ("buffers", "dicts", "hooked", "hooks", "keys", "modules", "params", "problem", "types", "values")

    def __init__(self, kernel: TrainingKernel) -> None:
        seed = kernel.seed
        modules = [m for _, m in seed.named_modules(remove_duplicate=False)]
        dicts: list[dict[str, Any]] = [kernel._modules]
        keys: list[str] = ["seed"]
        for m in modules:
            own = m.__dict__
            dicts += [own] * sum(1 for k in own if k not in MODULE_TABLES)
            keys += [k for k in own if k not in MODULE_TABLES]
            for table in (m._modules, m._parameters, m._buffers):
                dicts += [table] * len(table)
                keys += list(table)
        self.dicts, self.keys = dicts, keys
        self.values = list(map(dict.get, dicts, keys))
        self.hooks = [getattr(m, h) for m in modules for h in HOOK_TABLES]
        self.hooked = any(self.hooks)
        self.modules = modules
        self.types = list(map(type, modules))
        self.problem: tuple[str, str] | None = None
        self.params: list[tuple[torch.Tensor, str, torch.dtype, tuple[int, ...], bool]] = []
        self.buffers: list[tuple[torch.Tensor, str, torch.dtype, tuple[int, ...]]] = []

    def unchanged(self) -> bool:
        return (
            all(map(is_, map(dict.get, self.dicts, self.keys), self.values))
            and any(self.hooks) is self.hooked
            and all(map(is_, map(type, self.modules), self.types))
        )


def _tensor(module: torch.nn.Module, name: str, table: str) -> torch.Tensor | None:
    """The parameter or buffer ``name`` of ``module`` as it is now (``None``: it is not one any more)."""
    prefix, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(prefix) if prefix else module
    except AttributeError:
        return None
    t = getattr(owner, table).get(attr)
    return t if isinstance(t, torch.Tensor) else None


def _check_nonpersistent(module: torch.nn.Module, manifest: TrainingManifest, *, against: str) -> None:
    """Raise :class:`WeightSchemaError` when the seed's module lacks a tensor the artifact reads, or a
    non-persistent buffer of it has another shape or dtype than the artifact's: the weight schema a seed is
    checked against at binding covers its state dict, which does not hold these (a seed bound as a module
    brings its own)."""
    for spec, table in [*((s, "_parameters") for s in manifest.params), *((s, "_buffers") for s in manifest.buffers)]:
        t = _tensor(module, spec.name, table)
        if t is None:
            raise WeightSchemaError(f"the seed's module has no {table.strip('_')[:-1]} {spec.name!r}")
        if spec.name in manifest.nonpersistent:
            got = TensorSpec.of(spec.name, t)
            if got != spec:
                raise WeightSchemaError(
                    f"the seed's non-persistent buffer {spec.name!r} is {got.describe()}; {against} expects "
                    f"{spec.describe()}"
                )


def manifest_problem(manifest: TrainingManifest, reference: torch.nn.Module) -> str | None:
    """Why a training artifact's manifest disagrees with the blueprint's module ``reference`` (a fresh build):
    a tensor it names that the module lacks or holds with another shape or dtype, or a parameter or buffer of
    the module it does not name (the compiled step would ignore the seed's value of it). ``None``: they
    agree. Urza's content, never the caller's: a kernel with such an artifact trains eager."""
    tensors = {
        **dict(reference.named_parameters(remove_duplicate=False)),
        **dict(reference.named_buffers(remove_duplicate=False)),
    }
    missing = [s.name for s in (*manifest.params, *manifest.buffers) if s.name not in tensors]
    if missing:
        return f"reads {missing}, which the blueprint's module lacks"
    for spec in (*manifest.params, *manifest.buffers):
        have = TensorSpec.of(spec.name, tensors[spec.name])
        if have != spec:
            return f"names {spec.name!r} as {spec.describe()}; the blueprint's module holds {have.describe()}"
    named = {s.name for s in (*manifest.params, *manifest.buffers)}
    unread = sorted({n for n, _ in (*reference.named_parameters(), *reference.named_buffers())} - named)
    if unread:
        return f"does not read the blueprint's tensor {unread[0]!r}"
    return None


class _Shared:
    """What every seed of one blueprint shares: the program, the guards, the blueprint's form and weight
    schema, and how to build and serve eval."""

    def __init__(
        self,
        blueprint: str,
        *,
        program: TrainingProgram | None,
        entry: Entry | None,
        reason: str,
        build: Callable[[], torch.nn.Module],
        inference: Callable[[], Kernel | None] | None,
    ):
        self.blueprint = blueprint
        self.program = program
        self.entry = entry
        self.reason = reason
        self.build = build
        index = program.device_index if program is not None and program.device_index >= 0 else None
        self.check = (
            compile_check(entry.guards, device_index=index) if program is not None and entry and entry.guards else None
        )
        self.device = entry.guards.device if entry is not None and entry.guards is not None else "cpu"
        # The entry's route by region: the compiled step serves only the cells certification measured it
        # faster in (None: everywhere the guards accept).
        self.table, self.compiled_at = region_lookup(entry) if program is not None and entry else (None, None)
        # The CUDA index the program runs on (-1: the CPU).
        self.device_index = program.device_index if program is not None and self.device != "cpu" else -1
        self._inference = inference
        self._inference_kernel: Kernel | None = None
        self._lock = threading.Lock()
        self._schema: dict[str, TensorSpec] | None = None
        self._form: SeedForm | None = None
        # A private build in train mode: the module a double backward recomputes a compiled step with.
        self._trainer: torch.nn.Module | None = None
        # Specializations of the whole range (exact sizes of some dims, see esper.profiles): each call whose
        # inputs one's guards accept runs its program; every other call this route.
        self.specializations: tuple[_Shared, ...] = ()

    @property
    def weights_program(self) -> TrainingProgram | None:
        """The program whose manifest names the tensors a seed hands compiled code (every route's manifest names
        the same ones; see :func:`same_weights`)."""
        if self.program is not None:
            return self.program
        return self.specializations[0].program if self.specializations else None

    def serving(self, args: Sequence[Any]) -> _Shared:
        """The route of a call: the first specialization whose guards accept ``args``, else this one."""
        for s in self.specializations:
            if s.check is not None and s.check(args) is None:
                return s
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self  # the program, guards and blueprint are read-only: copies of a kernel share them

    def inference_kernel(self) -> Kernel | None:
        with self._lock:
            if self._inference_kernel is None and self._inference is not None:
                self._inference_kernel = self._inference()
                self._inference = None
            return self._inference_kernel

    def _reference(self) -> None:
        reference = self.build()
        self._schema = schema_of(reference.state_dict())
        self._form = SeedForm.of(reference)

    def schema(self) -> dict[str, TensorSpec]:
        """The blueprint's weight schema: what a seed's weights must match (the artifact was checked against
        the blueprint when it loaded)."""
        if self._schema is None:
            self._reference()
        assert self._schema is not None
        return self._schema

    def form(self) -> SeedForm:
        if self._form is None:
            self._reference()
        assert self._form is not None
        return self._form

    def seed(self, weights: Weights | None) -> torch.nn.Module:
        """The module holding a seed's weights (a fresh build when ``None``), checked against the schema."""
        if weights is None:
            return self.build()
        return seed_module(weights, self.build, self.schema(), against=f"blueprint {self.blueprint!r}")

    def recompute(
        self,
        n_inputs: int,
        tensors: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
    ) -> list[torch.Tensor | None]:
        """Differentiable gradients of one compiled step, recomputed eagerly: the blueprint's module, in train
        mode, called with the step's ``tensors`` (inputs, then parameters) and clones of its ``buffers`` as
        they were before the step, differentiated with ``create_graph=True``."""
        from torch.func import functional_call

        program = self.program
        assert program is not None
        m = program.manifest
        state: dict[str, torch.Tensor] = {s.name: p for s, p in zip(m.params, tensors[n_inputs:], strict=True)}
        state.update({s.name: b.clone() for s, b in zip(m.buffers, buffers, strict=True)})
        with self._lock:  # functional_call swaps the module's tensors while it runs
            if self._trainer is None:
                self._trainer = self.build().train()
            out = functional_call(self._trainer, state, tuple(tensors[:n_inputs]))
        flat = pytree.tree_leaves(out)
        pairs = [(o, g) for o, g in zip(flat, grads, strict=True) if isinstance(o, torch.Tensor) and o.requires_grad]
        wrt = [i for i, t in enumerate(tensors) if t.requires_grad]
        result: list[torch.Tensor | None] = [None] * len(tensors)
        if pairs and wrt:
            got = torch.autograd.grad(
                [o for o, _ in pairs],
                [tensors[i] for i in wrt],
                [g for _, g in pairs],
                create_graph=True,
                allow_unused=True,
            )
            for i, g in zip(wrt, got, strict=True):
                result[i] = g
        return result


class TrainingKernel(KernelBase):
    """A seed's training kernel (see the module docstring). ``kernel.seed`` is the seed's module.

    ``route`` is ``"compiled"`` when a training program is loaded, else ``"eager"``, and ``reason`` says why.
    Build one with :meth:`create` (Kasmina's loader) or :meth:`for_program` (a program not loaded from Urza,
    e.g. Tezzeret's compile-time evidence); :meth:`bind` gives another seed the same program.
    """

    def __init__(self, shared: _Shared, seed: torch.nn.Module):
        super().__init__(shared.blueprint, reason=shared.reason)
        self._shared = shared
        self.seed = seed
        self._eval_kernel: Kernel | None = None
        program = shared.weights_program
        if program is not None:
            _check_nonpersistent(seed, program.manifest, against=f"the training artifact of {shared.blueprint!r}")
        self.train()
        self.__dict__["_watch"] = None
        if program is not None:
            problem = self._rewatch().problem
            if problem is not None:
                self.warn_once(problem[0], f"{problem[1]}; this training call runs eager")

    @classmethod
    def create(
        cls,
        blueprint: str,
        *,
        program: TrainingProgram | None,
        entry: Entry | None,
        reason: str,
        build: Callable[[], torch.nn.Module],
        inference: Callable[[], Kernel | None] | None = None,
        weights: Weights | None = None,
        specializations: Sequence[tuple[TrainingProgram, Entry]] = (),
    ) -> TrainingKernel:
        """A kernel for a seed holding ``weights`` (the seed's module, used as is, or a state dict, copied into
        ``build()``; a fresh ``build()`` when ``None``), checked against the blueprint's weight schema.

        ``program`` is ``None`` for an eager kernel; ``entry`` is the Urza entry it came from (its guards
        gate compiled calls); ``inference`` builds, on first use in ``eval()`` mode, the inference kernel to
        bind this seed's weights to (``None``: eval runs eager). ``specializations``: programs serving exact
        sizes of the range (their entries' guards), tried first; every other call takes ``program`` (or eager,
        the whole range's route). Each must name the same weights as ``program`` (:func:`same_weights`).
        """
        shared = _Shared(blueprint, program=program, entry=entry, reason=reason, build=build, inference=inference)
        shared.specializations = tuple(
            _Shared(
                blueprint,
                program=p,
                entry=e,
                reason=f"training specialization entry #{e.id} ({e.profile})",
                build=build,
                inference=None,
            )
            for p, e in specializations
        )
        return cls(shared, shared.seed(weights))

    @classmethod
    def for_program(
        cls,
        blueprint: str,
        *,
        program: TrainingProgram,
        entry: Entry,
        build: Callable[[], torch.nn.Module],
        seed: torch.nn.Module,
    ) -> TrainingKernel:
        """A compiled kernel running ``program`` for ``seed`` (a module, used as is), gated by ``entry``'s
        guards, with no inference kernel for ``eval()``: what Tezzeret measures before anything is stored."""
        return cls.create(
            blueprint,
            program=program,
            entry=entry,
            reason=f"training program for entry #{entry.id}" if entry.id is not None else "training program",
            build=build,
            weights=seed,
        )

    @property
    def entry(self) -> Entry | None:
        return self._shared.entry

    @property
    def program(self) -> TrainingProgram | None:
        """The loaded training program every seed of this kernel shares (``None`` when eager)."""
        return self._shared.program

    @property
    def route(self) -> str:
        return COMPILED if self._shared.weights_program is not None else EAGER

    @property
    def specializations(self) -> tuple[Entry, ...]:
        """The entries of the specializations routed before the whole range (exact sizes of some dims)."""
        return tuple(s.entry for s in self._shared.specializations if s.entry is not None)

    def bind(self, weights: Weights) -> TrainingKernel:
        """A kernel for another seed of the same blueprint: same compiled code, ``weights`` its own (a module,
        used as is, or a state dict, copied into a fresh build). Checked against the blueprint's schema."""
        kernel = TrainingKernel(self._shared, self._shared.seed(weights))
        kernel.source = self.source
        return kernel

    def check(self, *args: Any) -> str | None:
        """Why the compiled training path would refuse this call (``None``: it accepts it)."""
        shared = self._shared.serving(args)
        if shared.check is None:
            return shared.reason
        why = shared.check(args) or mode_problem()
        if why is None:
            problem = self._seed_problem()
            why = problem[1] if problem is not None else None
        return why

    def _rewatch(self) -> _Watch:
        """Check the seed module in full (form, then every tensor the artifact reads, found by name) and
        watch it as it is now."""
        shared = self._shared
        program = shared.weights_program
        assert program is not None
        watch = _Watch(self)
        why = shared.form().problem(self.seed, training=True)
        if why is not None:
            watch.problem = (telemetry.SEED_FORM, f"the seed module's form is not the blueprint's: {why}")
        trainable = set(program.manifest.trainable)
        index = shared.device_index if shared.device_index >= 0 else None
        for s in program.manifest.params:
            p = _tensor(self.seed, s.name, "_parameters")
            if p is None and watch.problem is None:
                watch.problem = (telemetry.WEIGHTS_CHANGED, f"{s.name!r} is no parameter of the seed's module now")
            watch.params.append((p, s.name, s.torch_dtype, s.shape, s.name in trainable))  # type: ignore[arg-type]
        for s in program.manifest.buffers:
            b = _tensor(self.seed, s.name, "_buffers")
            if b is None and watch.problem is None:
                watch.problem = (telemetry.WEIGHTS_CHANGED, f"{s.name!r} is no buffer of the seed's module now")
            watch.buffers.append((b, s.name, s.torch_dtype, s.shape))  # type: ignore[arg-type]
        # A tensor swapped in (torch.func.functional_call under grad or vmap, a forward-AD dual, a subclass)
        # that compiled code cannot read: identities change whenever one is, so this runs only then.
        for t, name, *_ in (*watch.params, *watch.buffers):
            problem = serving_problem(t, shared.device, index) if watch.problem is None else None
            if problem is not None:
                watch.problem = (telemetry.WEIGHTS_CHANGED, f"the seed's tensor {name!r} {problem}")
        self.__dict__["_watch"] = watch
        return watch

    def _seed_problem(self) -> tuple[str, str] | None:
        """Why the seed module cannot run the compiled step now (reason code, detail), ``None`` when it can."""
        watch = self.__dict__["_watch"]
        if watch is None or not watch.unchanged():
            watch = self._rewatch()
        if watch.problem is not None:
            return watch.problem
        # One condition per tensor on the accepting path; the explanation only for a refusal.
        cpu, index = self._shared.device == "cpu", self._shared.device_index
        for p, _, dtype, shape, trainable in watch.params:
            if (
                p.dtype is not dtype
                or p.shape != shape
                or not (p.is_cpu if cpu else p.get_device() == index)
                or (p.requires_grad and not trainable)
            ):
                return self._tensor_refusal()
        for b, _, dtype, shape in watch.buffers:
            if b.dtype is not dtype or b.shape != shape or not (b.is_cpu if cpu else b.get_device() == index):
                return self._tensor_refusal()
            if not b.is_contiguous():
                return self._tensor_refusal()
        return None

    def _tensor_refusal(self) -> tuple[str, str]:
        """Why a parameter or buffer of the seed cannot be handed to the compiled code (after the accepting
        path's condition refused one)."""
        watch = self.__dict__["_watch"]
        where = self._shared.device if self._shared.device_index < 0 else f"cuda:{self._shared.device_index}"
        for t, name, dtype, shape, *trainable in (*watch.params, *watch.buffers):
            role = "parameter" if trainable else "buffer"
            now = f"{t.dtype} {tuple(t.shape)} on {t.device}"
            device_ok = t.is_cpu if where == "cpu" else t.get_device() == self._shared.device_index
            if t.dtype is not dtype or t.shape != shape or not device_ok:
                return (
                    telemetry.WEIGHTS_CHANGED,
                    f"{role} {name!r} is now {now}; the artifact has {dtype} {shape} on {where}",
                )
            if trainable and t.requires_grad and not trainable[0]:
                return (
                    telemetry.WEIGHTS_CHANGED,
                    f"parameter {name!r} requires grad, but the artifact was compiled with it frozen",
                )
            if not trainable and not t.is_contiguous():
                return (
                    telemetry.WEIGHTS_CHANGED,
                    f"buffer {name!r} is not contiguous (the compiled step updates it in place)",
                )
        return telemetry.WEIGHTS_CHANGED, "a weight changed"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            entry = self._shared.entry
            positional = self.positional(entry.guards if entry is not None else None, args, kwargs)
            if positional is None:
                self.took(EAGER)
                return self.seed(*args, **kwargs)
            args = positional
        if not self.training:
            return self._evaluate(args)
        shared = self._shared.serving(args)
        if shared.program is not None:
            why = shared.check(args) if shared.check is not None else "no guard schema"
            code = telemetry.OUTSIDE_GUARDS
            if why is None and shared.compiled_at is not None and not shared.compiled_at(args):
                self.took(EAGER)  # eager by evidence in this region: no WARNING
                return self.seed(*args)
            if why is None:
                why, code = mode_problem(), telemetry.MODE
            if why is None:
                problem = self._seed_problem()
                if problem is None:
                    if self._inputs_only(args):
                        self.took(EAGER)
                        if telemetry.FROZEN_WEIGHTS not in self._warned:  # said once per kernel, as a refusal is
                            self._warned.add(telemetry.FROZEN_WEIGHTS)
                            telemetry.frozen_weights(self.blueprint)
                        return self.seed(*args)
                    self.took(COMPILED)
                    return self._compiled(shared, args)
                code, why = problem
            self.warn_once(code, f"{why}; this training call runs eager")
        self.took(EAGER)
        return self.seed(*args)

    def _inputs_only(self, args: Sequence[Any]) -> bool:
        """Whether this call wants its inputs' gradients alone: grad on, an input requiring grad, and every
        parameter the artifact trains frozen now (a fossilized seed in a host that still trains). The compiled
        step computes every trained parameter's gradient with the inputs' and certification timed it so; here
        it would do the weights' work eager skips (a frozen linear layer's backward is one matmul, not two),
        at a cost nothing measured: eager serves the call."""
        if not torch.is_grad_enabled():
            return False
        frozen = False
        for p, _, _, _, trainable in self.__dict__["_watch"].params:
            if trainable:
                if p.requires_grad:  # the common call (a seed that trains) stops at its first trained weight
                    return False
                frozen = True
        return frozen and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)

    def _compiled(self, shared: _Shared, args: Sequence[torch.Tensor]) -> Any:
        program = shared.program
        assert program is not None
        watch = self.__dict__["_watch"]
        inputs = [a if a.is_contiguous() else a.contiguous() for a in args]
        # A non-contiguous parameter (a column-major view) is read through a contiguous copy made here, in the
        # autograd graph: its gradient flows back to the parameter itself.
        params = [p if p.is_contiguous() else p.contiguous() for p, *_ in watch.params]
        buffers = [b for b, *_ in watch.buffers]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *params)):
            outputs = _CompiledStep.apply(shared, self.warn_once, buffers, len(inputs), *inputs, *params)
        else:
            with torch.no_grad():
                outputs, _, _ = program.forward(inputs, params, buffers)
        return program.unflatten(outputs)

    def _evaluate(self, args: Sequence[Any]) -> Any:
        """Eval mode: the certified inference kernel bound to this seed, or eager."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.seed.parameters()):
            # The inference artifact has no backward: a graph through the weights needs eager.
            self.took(EAGER)
            return self.seed(*args)
        kernel = self._eval_kernel
        if kernel is None:
            base = self._shared.inference_kernel()
            try:
                kernel = base.bind(self.seed) if base is not None else None
            except WeightSchemaError as e:
                # The seed's state dict no longer has the blueprint's names (a pruned module holds weight_orig
                # and weight_mask): its own forward serves eval, and binding is tried again at the next call.
                self.warn_once(telemetry.WEIGHTS_CHANGED, f"the seed cannot be bound for eval ({e}); eval runs eager")
                self.took(EAGER)
                return self.seed(*args)
            # Set past nn.Module.__setattr__: the bound kernel holds the seed's module, a submodule already.
            object.__setattr__(self, "_eval_kernel", kernel)
        if kernel is None:
            self.took(EAGER)
            return self.seed(*args)
        out = kernel(*args)
        self.took(kernel.last_path or EAGER)
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> TrainingKernel:
        """A copy holding a deep copy of the seed module and sharing the loaded program (read-only): it
        follows its own weights. EMA and checkpoint utilities copy modules this way."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        if self.source is not None:
            memo.setdefault(id(self.source), self.source)  # a recipe, not state: shared like the program
        for key, value in self.__dict__.items():
            if key in ("_eval_kernel", "_watch"):
                new.__dict__[key] = None  # bound to this kernel's seed: built again for the copy's
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __copy__(self) -> TrainingKernel:
        """A shallow copy, as ``nn.Module`` makes one (the same seed module and tables), without the state
        bound to this kernel's seed check; pickling's ``__reduce_ex__`` is not the way to it."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(_eval_kernel=None, _watch=None, _warned=set(self._warned))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled as its ``source`` (how Kasmina loads it again) and its seed, never native code.

        A seed of the blueprint's form is pickled as its state (parameters with their ``requires_grad``,
        persistent buffers) and its modes, and rebuilt from the blueprint when it loads: a blueprint's class
        lives in a module the catalog imports from a file, which pickle cannot import by name. Any other seed
        module is pickled as itself."""
        if self.source is None:
            raise TypeError(
                f"this training kernel of {self.blueprint!r} was not loaded by Kasmina (it has no source to load "
                "it again), so it cannot be pickled: pickle its seed module (kernel.seed) instead"
            )
        seed = self.seed
        modes = [m.training for m in seed.modules()]
        weights: Weights = seed
        if self._shared.form().problem(seed, training=seed.training) is None:
            weights = seed.state_dict(keep_vars=True)
        return restore_training_kernel, (self.source, weights, self.training, modes)

    @property
    def regional(self) -> bool:
        """Whether the compiled step serves only some regions of the profile (eager elsewhere, by evidence)."""
        return self._shared.program is not None and self._shared.compiled_at is not None

    def ignore_route_tables(self) -> None:
        """Serve the compiled step wherever the guards accept, whatever the route table says: what
        certification measures. Every seed bound from this kernel shares the change."""
        self._shared.table, self._shared.compiled_at = None, None

    def extra_repr(self) -> str:
        entry = f"entry=#{self.entry.id}, " if self.entry is not None else ""
        table = self._shared.table
        regions = f"{table.describe()}, " if self.regional and table is not None else ""
        return f"{self.blueprint!r}, route={self.route}, {entry}{regions}reason={self.reason!r}"


def same_weights(a: TrainingManifest, b: TrainingManifest) -> bool:
    """Whether two training manifests name the same parameters, buffers and trainable set (a specialization of
    a blueprint's training step and its whole-range step do): one seed module serves both."""
    return (a.params, a.buffers, a.trainable, a.nonpersistent) == (b.params, b.buffers, b.trainable, b.nonpersistent)


def restore_training_kernel(
    source: Callable[[], KernelBase], weights: Weights, training: bool, modes: Sequence[bool]
) -> TrainingKernel:
    """What a pickled :class:`TrainingKernel` loads as: ``source()`` (Kasmina's whole load path again, so a
    process that cannot use the artifact trains eager with its WARNING) bound to the unpickled seed module, or
    to a fresh build holding the unpickled state (parameters keep their ``requires_grad``), in the modes it
    was pickled in."""
    loaded = source()
    if not isinstance(loaded, TrainingKernel):
        raise TypeError(f"a training kernel's source loaded a {type(loaded).__name__}")
    kernel = loaded.bind(weights)
    if not isinstance(weights, torch.nn.Module):
        for name, p in kernel.seed.named_parameters():
            given = weights.get(name)
            if given is not None:
                p.requires_grad_(given.requires_grad)
    kernel.training = training
    for m, mode in zip(kernel.seed.modules(), modes, strict=False):
        m.training = mode
    return kernel
