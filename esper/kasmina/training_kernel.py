"""Kasmina in training: a seed's kernel that runs its forward and backward as compiled code.

A :class:`TrainingKernel` is an ``nn.Module`` holding the seed's own module (``kernel.seed``), so its
``parameters()`` are the seed's and an optimizer steps them in place. In ``train()`` mode each call whose
inputs the guards accept runs the training artifact's forward package through a ``torch.autograd.Function``
whose backward runs the backward package; the weights are inputs of both, so optimizer steps take effect
without rebinding, and buffers the forward mutates (BatchNorm's running statistics and batch counter) are
updated from the package's outputs, as eager updates them. A call the guards refuse, or weights that no
longer match the artifact (another dtype, a frozen parameter made trainable), runs the seed's eager module,
with one WARNING per kind of refusal. In ``eval()`` mode it runs the certified inference kernel bound to the
seed's weights (see :mod:`esper.kasmina.seeds`), or eager.

Every seed of a blueprint shares one loaded :class:`TrainingProgram` (the packages and the manifest); each
holds only its own weights. Nothing here compiles or imports the compiler; loading from Urza is
:mod:`esper.kasmina.loader`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from esper.guards import compile_check
from esper.kasmina import telemetry
from esper.kasmina.base import COMPILED, EAGER, KernelBase
from esper.kasmina.runtime import CompiledPackage
from esper.kasmina.seeds import Weights, seed_module
from esper.kasmina.tensors import TensorSpec, WeightSchemaError, schema_of
from esper.kasmina.training_artifact import TrainingManifest
from esper.urza import Entry

if TYPE_CHECKING:
    from esper.kasmina.kernel import Kernel

__all__ = ["COMPILED", "EAGER", "TrainingKernel", "TrainingProgram"]


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


def _check_nonpersistent(
    slots: Sequence[tuple[dict[str, Any], str]], manifest: TrainingManifest, *, against: str
) -> None:
    """Raise :class:`WeightSchemaError` when a non-persistent buffer of the seed's module has another shape or
    dtype than the artifact's: the weight schema a seed is checked against at binding covers its state dict,
    which does not hold these (a seed bound as a module brings its own)."""
    for (table, attr), spec in zip(slots, manifest.buffers, strict=True):
        if spec.name not in manifest.nonpersistent:
            continue
        got = TensorSpec.of(spec.name, table[attr])
        if got != spec:
            raise WeightSchemaError(
                f"the seed's non-persistent buffer {spec.name!r} is {got.describe()}; {against} expects "
                f"{spec.describe()}"
            )


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

    def seed(self, weights: Weights | None) -> torch.nn.Module:
        """The module holding a seed's weights (a fresh build when ``None``), checked against the schema."""
        if weights is None:
            return self.build()
        against = f"the training artifact of {self.blueprint!r}" + (
            f" (Urza entry #{self.entry.id})" if self.entry is not None and self.program is not None else ""
        )
        return seed_module(weights, self.build, self.schema(), against=against)


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
        program = shared.program
        if program is not None:
            m = program.manifest
            self._param_slots = _slots(seed, [s.name for s in m.params], "_parameters")
            self._buffer_slots = _slots(seed, [s.name for s in m.buffers], "_buffers")
            _check_nonpersistent(self._buffer_slots, m, against=f"the training artifact of {shared.blueprint!r}")
            trainable = set(m.trainable)
            self._param_specs = [(s.name, s.torch_dtype, s.shape, s.name in trainable) for s in m.params]
            self._buffer_specs = [(s.name, s.torch_dtype, s.shape) for s in m.buffers]
            self._device = _entry_device(shared.entry)
        self.train()

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
    ) -> TrainingKernel:
        """A kernel for a seed holding ``weights`` (the seed's module, used as is, or a state dict, copied into
        ``build()``; a fresh ``build()`` when ``None``), checked against the program's weight schema.

        ``program`` is ``None`` for an eager kernel; ``entry`` is the Urza entry it came from (its guards
        gate compiled calls); ``inference`` builds, on first use in ``eval()`` mode, the inference kernel to
        bind this seed's weights to (``None``: eval runs eager).
        """
        shared = _Shared(blueprint, program=program, entry=entry, reason=reason, build=build, inference=inference)
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
        return COMPILED if self._shared.program is not None else EAGER

    def bind(self, weights: Weights) -> TrainingKernel:
        """A kernel for another seed of the same blueprint: same compiled code, ``weights`` its own (a module,
        used as is, or a state dict, copied into a fresh build). Checked against the artifact's schema."""
        return TrainingKernel(self._shared, self._shared.seed(weights))

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
        # A buffer replaced since binding (a resized mask) would reach the compiled code with another shape.
        for (table, attr), (name, dtype, shape) in zip(self._buffer_slots, self._buffer_specs, strict=True):
            b = table[attr]
            if b.dtype != dtype or tuple(b.shape) != shape or b.device.type != self._device:
                now = f"{b.dtype} {tuple(b.shape)} on {b.device}"
                return f"buffer {name!r} is now {now}; the artifact has {dtype} {shape} on {self._device}"
        return None

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
        program = self._shared.program
        if program is not None:
            why = self._shared.check(args) if self._shared.check is not None else "no guard schema"
            code = telemetry.OUTSIDE_GUARDS
            if why is None:
                why, code = self._weights_problem(), telemetry.WEIGHTS_CHANGED
            if why is None:
                self.took(COMPILED)
                return self._compiled(program, args)
            self.warn_once(code, f"{why}; this training call runs eager")
        self.took(EAGER)
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
            self.took(EAGER)
            return self.seed(*args)
        kernel = self._eval_kernel
        if kernel is None:
            base = self._shared.inference_kernel()
            kernel = base.bind(self.seed) if base is not None else None
            # Set past nn.Module.__setattr__: the bound kernel holds the seed's module, a submodule already.
            object.__setattr__(self, "_eval_kernel", kernel)
        if kernel is None:
            self.took(EAGER)
            return self.seed(*args)
        out = kernel(*args)
        self.took(kernel.last_path or EAGER)
        return out

    def extra_repr(self) -> str:
        entry = f"entry=#{self.entry.id}, " if self.entry is not None else ""
        return f"{self.blueprint!r}, route={self.route}, {entry}reason={self.reason!r}"


def _entry_device(entry: Entry | None) -> str:
    return entry.guards.device if entry is not None and entry.guards is not None else "cpu"
