"""Kasmina in training: a seed's kernel that runs its forward and backward as compiled code.

A :class:`TrainingKernel` is an ``nn.Module`` holding the seed's own module (``kernel.seed``), so its
``parameters()`` are the seed's and an optimizer steps them in place. In ``train()`` mode each call whose
inputs the guards accept runs the training artifact's forward package through a ``torch.autograd.Function``
whose backward runs the backward package; the weights are inputs of both, so optimizer steps take effect
without rebinding, and buffers the forward mutates (BatchNorm's running statistics and batch counter) are
updated from the package's outputs, as eager updates them. A call the guards refuse, or weights that no
longer match the artifact (another dtype, a frozen parameter made trainable), runs the seed's eager module,
with one WARNING per reason. In ``eval()`` mode it runs the certified inference kernel bound to the seed's
weights (see :mod:`esper.kasmina.seeds`), or eager.

Every seed of a blueprint shares one loaded :class:`TrainingProgram` (the packages and the manifest); each
holds only its own weights. Nothing here compiles or imports the compiler.
"""

from __future__ import annotations

import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from esper import compat
from esper.guards import compile_check
from esper.kasmina import telemetry
from esper.kasmina.runtime import CompiledPackage, PackageLoadError
from esper.kasmina.seeds import TensorSpec, Weights, WeightSchemaError, schema_of, seed_module
from esper.kasmina.training_artifact import ArtifactFormatError, TrainingManifest, is_training_entry, open_artifact
from esper.urza import Entry, Urza, UrzaError

if TYPE_CHECKING:
    from esper.kasmina.kernel import Kernel
    from esper.kasmina.loader import Kasmina

COMPILED = "compiled"
EAGER = "eager"
# Telemetry reason codes of the training path (the inference ones live in telemetry.py).
NO_TRAINING_ARTIFACT = "no-training-artifact"
WEIGHTS_CHANGED = "weights-changed"


class TrainingProgram:
    """A loaded training artifact: the forward and backward packages wired by the manifest."""

    def __init__(self, manifest: TrainingManifest, forward: CompiledPackage, backward: CompiledPackage):
        self.manifest = m = manifest
        self._forward = forward
        self._backward = backward
        params = {s.name: i for i, s in enumerate(m.params)}
        buffers = {s.name: i for i, s in enumerate(m.buffers)}
        index = {"input": (0, None), "param": (1, params), "buffer": (2, buffers)}
        self._fw_in = []
        for kind, key in m.forward_inputs:
            which, table = index[kind]
            self._fw_in.append((which, key if table is None else table[key]))
        self._mutations = [(j, buffers[s[1]]) for j, s in enumerate(m.forward_outputs) if s[0] == "mutation"]
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
        saved = [args[i] if kind == "forward_input" else outs[i] for kind, i in self._saved]
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
    """Forward package in ``forward``, backward package in ``backward``; buffers ride along untracked."""

    @staticmethod
    def forward(ctx: Any, program: TrainingProgram, buffers: list[torch.Tensor], n_inputs: int, *tensors: Any) -> Any:
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        outputs, saved, sizes = program.forward(inputs, params, buffers)
        ctx.program, ctx.sizes, ctx.n_inputs = program, sizes, n_inputs
        ctx.save_for_backward(*saved)
        differentiable = set(program.manifest.differentiable)
        ctx.mark_non_differentiable(*(o for k, o in enumerate(outputs) if k not in differentiable))
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        input_grads, param_grads = ctx.program.backward(ctx.sizes, ctx.saved_tensors, grads)
        return (None, None, None, *input_grads, *param_grads)


def _slots(module: torch.nn.Module, names: Sequence[str], table: str) -> list[tuple[dict[str, Any], str]]:
    """(owner's parameter or buffer table, attribute) per name: a call reads the live objects through them."""
    out = []
    for name in names:
        prefix, _, attr = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        tables = getattr(owner, table)
        if attr not in tables:
            raise WeightSchemaError(f"the seed's module has no {table.strip('_')[:-1]} {name!r}")
        out.append((tables, attr))
    return out


class _Shared:
    """What every seed of one blueprint shares: the program, the guards, and how to build and serve eval."""

    def __init__(
        self,
        blueprint: str,
        *,
        program: TrainingProgram | None,
        entry: Entry | None,
        reason: str,
        build: Callable[[], torch.nn.Module],
        inference: Callable[[], Kernel] | None,
    ):
        self.blueprint = blueprint
        self.program = program
        self.entry = entry
        self.reason = reason
        self.build = build
        self.check = compile_check(entry.guards) if program is not None and entry and entry.guards else None
        self._inference = inference
        self._inference_kernel: Kernel | None = None
        self._schema: dict[str, TensorSpec] | None = None

    def inference_kernel(self) -> Kernel | None:
        if self._inference_kernel is None and self._inference is not None:
            self._inference_kernel = self._inference()
            self._inference = None
        return self._inference_kernel

    def schema(self) -> dict[str, TensorSpec]:
        if self.program is not None:
            return self.program.manifest.weights()
        if self._schema is None:
            self._schema = schema_of(self.build().state_dict())
        return self._schema


class TrainingKernel(torch.nn.Module):
    """A seed's training kernel (see the module docstring). ``kernel.seed`` is the seed's module.

    ``route`` is ``"compiled"`` when a certified training artifact is loaded, else ``"eager"``, and ``reason``
    says why; after each call ``last_path`` says which path it took and ``calls`` counts both.
    """

    def __init__(self, shared: _Shared, seed: torch.nn.Module):
        super().__init__()
        self._shared = shared
        self.seed = seed
        self.last_path: str | None = None
        self.calls: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._eval_kernels: dict[str, Kernel] = {}
        program = shared.program
        if program is not None:
            m = program.manifest
            self._param_slots = _slots(seed, [s.name for s in m.params], "_parameters")
            self._buffer_slots = _slots(seed, [s.name for s in m.buffers], "_buffers")
            trainable = set(m.trainable)
            self._param_specs = [(s.name, getattr(torch, s.dtype), s.shape, s.name in trainable) for s in m.params]
            self._device = entry_device(shared.entry)
        self.train()

    @property
    def blueprint(self) -> str:
        return self._shared.blueprint

    @property
    def entry(self) -> Entry | None:
        return self._shared.entry

    @property
    def reason(self) -> str:
        return self._shared.reason

    @property
    def route(self) -> str:
        return COMPILED if self._shared.program is not None else EAGER

    def bind(self, weights: Weights) -> TrainingKernel:
        """A kernel for another seed of the same blueprint: same compiled code, ``weights`` its own (a module,
        used as is, or a state dict, copied into a fresh build). Checked against the artifact's schema."""
        return TrainingKernel(self._shared, _seed(self._shared, weights))

    def check(self, *args: Any) -> str | None:
        """Why the compiled training path would refuse this call (``None``: it accepts it)."""
        if self._shared.check is None:
            return self.reason
        return self._shared.check(args) or self._weights_problem()

    def _weights_problem(self) -> str | None:
        for (table, attr), (name, dtype, shape, trainable) in zip(self._param_slots, self._param_specs, strict=True):
            p = table[attr]
            if p.dtype != dtype or tuple(p.shape) != shape or p.device.type != self._device:
                now = f"{p.dtype} {tuple(p.shape)} on {p.device}"
                return f"parameter {name!r} is now {now}; the artifact has {dtype} {shape} on {self._device}"
            if p.requires_grad and not trainable:
                return f"parameter {name!r} requires grad, but the artifact was compiled with it frozen"
            if not p.is_contiguous():
                return f"parameter {name!r} is not contiguous"
        return None

    def forward(self, *args: Any) -> Any:
        if not self.training:
            return self._evaluate(args)
        program = self._shared.program
        if program is not None:
            why = self._shared.check(args) if self._shared.check is not None else "no guard schema"
            code = telemetry.OUTSIDE_GUARDS
            if why is None:
                why, code = self._weights_problem(), WEIGHTS_CHANGED
            if why is None:
                self.last_path = COMPILED
                self.calls[COMPILED] += 1
                return self._compiled(program, args)
            self._warn_once(code, f"{why}; this training call runs eager")
        self.last_path = EAGER
        self.calls[EAGER] += 1
        return self.seed(*args)

    def _compiled(self, program: TrainingProgram, args: Sequence[torch.Tensor]) -> Any:
        inputs = [a if a.is_contiguous() else a.contiguous() for a in args]
        params = [table[attr] for table, attr in self._param_slots]
        buffers = [table[attr] for table, attr in self._buffer_slots]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *params)):
            outputs = _CompiledStep.apply(program, buffers, len(inputs), *inputs, *params)
        else:
            with torch.no_grad():
                outputs, _, _ = program.forward(inputs, params, buffers)
        return program.unflatten(outputs)

    def _evaluate(self, args: Sequence[Any]) -> Any:
        """Eval mode: the certified inference kernel bound to this seed, or eager."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.seed.parameters()):
            # The inference artifact has no backward: a graph through the weights needs eager.
            self.last_path = EAGER
            self.calls[EAGER] += 1
            return self.seed(*args)
        kernel = self._eval_kernels.get("bound")
        if kernel is None:
            base = self._shared.inference_kernel()
            kernel = base.bind(self.seed) if base is not None else None
            if kernel is not None:
                self._eval_kernels["bound"] = kernel
        if kernel is None:
            self.last_path = EAGER
            self.calls[EAGER] += 1
            return self.seed(*args)
        out = kernel(*args)
        self.last_path = kernel.last_path
        self.calls[kernel.last_path or EAGER] += 1
        return out

    def _warn_once(self, code: str, detail: str) -> None:
        if detail not in self._warned:
            self._warned.add(detail)
            telemetry.fallback(self.blueprint, code, detail)

    def extra_repr(self) -> str:
        entry = f"entry=#{self.entry.id}, " if self.entry is not None else ""
        return f"{self.blueprint!r}, route={self.route}, {entry}reason={self.reason!r}"


def entry_device(entry: Entry | None) -> str:
    return entry.guards.device if entry is not None and entry.guards is not None else "cpu"


def _seed(shared: _Shared, weights: Weights | None) -> torch.nn.Module:
    if weights is None:
        return shared.build()
    against = f"the training artifact of {shared.blueprint!r}" + (
        f" (Urza entry #{shared.entry.id})" if shared.entry is not None and shared.program is not None else ""
    )
    return seed_module(weights, shared.build, shared.schema(), against=against)


# -- loading -------------------------------------------------------------------------------------------


class _Unusable(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


def choose_training_entry(entries: Sequence[Entry], key: compat.CompatKey) -> Entry:
    """The newest certified training entry built for ``key`` among one blueprint's entries (newest first): a
    compiled artifact, or an eager route certification chose by measurement. Raises with the reason there is
    none; a blueprint's recorded eager training route (dropout, a failed export) names its reason."""
    training = [e for e in entries if is_training_entry(e)]
    if not training:
        raise _Unusable(NO_TRAINING_ARTIFACT, "Urza has no training artifact for it")
    certified = [e for e in training if e.status == "certified"]
    for e in certified:
        if key.mismatch(e.compat) is None:
            return e
    if certified:
        newest = certified[0]
        raise _Unusable(telemetry.INCOMPATIBLE, f"training entry #{newest.id}: {key.mismatch(newest.compat)}")
    newest = training[0]
    if newest.kind == "eager":
        raise _Unusable(NO_TRAINING_ARTIFACT, f"eager training route (entry #{newest.id}): {newest.failure_reason}")
    why = f": {newest.failure_reason}" if newest.failure_reason else ""
    raise _Unusable(
        NO_TRAINING_ARTIFACT, f"no certified training artifact (newest is #{newest.id}, {newest.status}{why})"
    )


def _pick(entries: Sequence[Entry], key: compat.CompatKey, entry_id: int | None) -> Entry:
    if entry_id is None:
        return choose_training_entry(entries, key)
    entry = next((e for e in entries if e.id == entry_id and is_training_entry(e) and e.kind == "aoti"), None)
    if entry is None:
        raise _Unusable(NO_TRAINING_ARTIFACT, f"entry #{entry_id} is not a compiled training artifact")
    mismatch = key.mismatch(entry.compat)
    if mismatch:
        raise _Unusable(telemetry.INCOMPATIBLE, f"training entry #{entry_id} is incompatible: {mismatch}")
    return entry


# Loaded programs by (artifact checksum, device index): every kernel of one artifact shares one.
_programs: weakref.WeakValueDictionary[tuple[str, int], TrainingProgram] = weakref.WeakValueDictionary()


def _program(path: Any, entry: Entry, device_index: int) -> TrainingProgram:
    cached = _programs.get((entry.checksum, device_index))
    if cached is not None:
        return cached
    try:
        manifest, forward, backward = open_artifact(path, device_index=device_index)
    except (ArtifactFormatError, PackageLoadError, ValueError) as e:
        raise _Unusable(telemetry.LOAD_FAILED, f"training entry #{entry.id}: {e}") from e
    program = TrainingProgram(manifest, forward, backward)
    _programs[(entry.checksum, device_index)] = program
    return program


def _prewarm(program: TrainingProgram, entry: Entry, module: torch.nn.Module, device: torch.device) -> None:
    """One forward and backward at the smallest accepted shape, on copies of the buffers (nothing moves)."""
    assert entry.guards is not None
    sizes = {n: lo for n, (lo, _) in entry.guards.dim_ranges().items()}
    args = [
        torch.zeros(s, dtype=getattr(torch, g.dtype), device=device)
        for s, g in zip(entry.guards.shapes(sizes), entry.guards.inputs, strict=True)
    ]
    m = program.manifest
    state = module.state_dict()
    params = [state[s.name].detach() for s in m.params]
    buffers = [state[s.name].detach().clone() for s in m.buffers]
    try:
        with torch.no_grad():
            outputs, saved, shape = program.forward(args, params, buffers)
            program.backward(shape, saved, [torch.zeros_like(o) for o in outputs])
    except Exception as e:
        raise _Unusable(telemetry.LOAD_FAILED, f"pre-warm of training entry #{entry.id} failed: {e}") from e


def load_training(
    kasmina: Kasmina, name: str, weights: Weights | None = None, *, entry_id: int | None = None
) -> TrainingKernel:
    """A :class:`TrainingKernel` for blueprint ``name`` bound to ``weights`` (the builder's when ``None``):
    compiled when Urza holds a certified training artifact for this process, else eager (with a WARNING,
    unless certification chose eager by measurement). ``entry_id`` loads that artifact whatever its status
    (certification tests an artifact through this very path before certifying it)."""
    started = time.perf_counter()
    device = kasmina.device
    index = -1 if device.type == "cpu" else (device.index or 0)

    def build() -> torch.nn.Module:
        return kasmina.catalog.get(name).build().to(device)

    def inference() -> Kernel:
        return kasmina.load_seeds(name)

    def eager(entry: Entry | None, reason: str) -> TrainingKernel:
        shared = _Shared(name, program=None, entry=entry, reason=reason, build=build, inference=inference)
        return TrainingKernel(shared, _seed(shared, weights))

    entry: Entry | None = None
    try:
        try:
            urza = Urza(kasmina.urza_path, readonly=True)
        except UrzaError as e:
            raise _Unusable(telemetry.URZA_UNAVAILABLE, str(e)) from e
        try:
            entry = _pick(urza.entries(name), kasmina.key, entry_id)
            if entry.kind == "eager":
                telemetry.eager_by_evidence(name, f"{entry.profile} (training)", entry.id)
                note = entry.meta.get("training", {}).get("reason", "measured faster than the compiled step")
                return eager(entry, f"certified to train eager (entry #{entry.id}): {note}")
            if entry.guards is None:
                raise _Unusable(telemetry.INTEGRITY, f"training entry #{entry.id} has no guard schema")
            path = _verified(kasmina, urza, entry)
        finally:
            urza.close()
        program = _program(path, entry, index)
        _prewarm(program, entry, build(), device)
    except _Unusable as u:
        telemetry.fallback(name, u.code, u.detail)
        return eager(entry, u.detail)
    shared = _Shared(
        name,
        program=program,
        entry=entry,
        reason=f"training entry #{entry.id} ({entry.status})",
        build=build,
        inference=inference,
    )
    kernel = TrainingKernel(shared, _seed(shared, weights))
    telemetry.loaded(name, [entry.id], time.perf_counter() - started)
    return kernel


def _verified(kasmina: Kasmina, urza: Urza, entry: Entry) -> Any:
    """The artifact's path once Kasmina's own checks (signature when configured, size and sha256) pass."""
    from esper.kasmina.loader import Unusable

    try:
        return kasmina._verified(urza, entry)
    except Unusable as u:
        raise _Unusable(u.code, u.detail) from u


__all__ = [
    "COMPILED",
    "EAGER",
    "TrainingKernel",
    "TrainingProgram",
    "choose_training_entry",
    "load_training",
]
