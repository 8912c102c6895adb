"""The training artifact's stages: a blueprint's forward and backward, ahead of time, with the weights as inputs.

trace -> plan -> export forward/backward -> two AOTInductor packages -> load -> verify, in one artifact:

- the module (in ``train()`` mode) is traced into partitioned forward and backward graphs
  (:mod:`esper.tezzeret.joint`), and :func:`esper.tezzeret.joint_plan.plan_artifact` decides their layout;
- each graph is wrapped in a small module and exported with ``torch.export`` (the declared dims as named
  ``Dim``s; a saved activation's compound size such as ``batch*seq`` as ``Dim.AUTO``), then compiled to its own
  package. The forward takes the parameters, buffers and inputs and returns the buffers' new values (what
  training mutates, e.g. BatchNorm's running statistics), the outputs and the activations the backward
  needs; the backward takes the size carrier, the saved activations and the upstream gradients and returns
  the gradients of the inputs and of every trainable parameter;
- both go into one zip with the manifest (:mod:`esper.artifacts.training_manifest`), with guards read from the
  forward export exactly as for inference, and gradient parity and step latency as evidence.

A blueprint whose training graph draws random numbers (dropout: exact parity with eager is impossible) is
routed eager (:class:`~esper.tezzeret.pipeline.EagerRoute`); a failing stage gets an eager fallback.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.export import Dim, ExportedProgram, export
from torch.utils import _pytree as pytree

from esper.artifacts.guards import GuardSchema
from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.runtime import CompiledPackage, device_index
from esper.artifacts.tensors import TensorSpec
from esper.artifacts.training_manifest import TrainingManifest, write_artifact
from esper.artifacts.variants import Variant
from esper.blueprint import Blueprint
from esper.kasmina.training_kernel import TrainingKernel, TrainingProgram
from esper.numerics.bench import measure
from esper.numerics.coverage import edge_sizes
from esper.numerics.gradients import exact_gradients, gradients, step, upstream
from esper.numerics.inputs import example_inputs
from esper.numerics.parity import POINTWISE_SLACK, REDUCTION, ParityVerdict, judge
from esper.tezzeret.aoti import compile_package
from esper.tezzeret.export import guards_from_values
from esper.tezzeret.inference import timing
from esper.tezzeret.joint import JointGraphs, evaluate_size, trace_joint
from esper.tezzeret.joint_plan import (
    COMPOUND,
    DynamicSpec,
    JointPlan,
    Linear,
    dynamic_dims,
    plan_artifact,
    trace_sizes,
)
from esper.tezzeret.pipeline import VERIFY_SHAPES, Built, CompileJob, EagerRoute, SpecPipeline, StageError, stage
from esper.urza import Entry
from esper.urza.evidence import ShapeParity, ShapeTiming

# Tezzeret routes a blueprint eager when compiled and eager disagree at a verified shape by more than this many
# times what certification's rule (esper.numerics.parity.judge) allows: compiled code that is plainly wrong there
# (certification then judges every planned case at the rule's own bounds).
GROSS = 10.0


@dataclass(frozen=True)
class TrainingPipeline(SpecPipeline):
    """Forward + backward with the weights as inputs: the whole declared range, the default variant only
    (its spec's rule: Inductor settings that fold weights into the code cannot apply to weights passed in)."""

    kind: ArtifactKind = ArtifactKind.TRAINING

    def build(self, bp: Blueprint, device: torch.device) -> torch.nn.Module:
        """The blueprint's module as built (it is traced in train mode)."""
        return bp.build().to(device)

    def meta(self, bp: Blueprint, variant: Variant) -> dict[str, Any]:
        """One profile: a training artifact serves the whole range."""
        return {"profiles": list(self.spec.profiles(bp))}

    def eager_meta(self, reason: str | None) -> dict[str, Any]:
        """The training route and its reason (Kasmina's training kernel reports it)."""
        return {"training": {"route": "eager", "reason": reason}}

    def run(self, job: CompileJob) -> Built:
        """Trace, plan, export and compile both graphs, then verify the loaded program against eager."""
        bp, device = job.bp, job.device
        t0 = time.perf_counter()
        module = job.module.train()
        traced = trace_sizes(bp, job.ranges, module)
        job.meta["traced_at"] = traced
        # A specialization's held dims (a range of one size) are traced and exported static.
        held = [n for n, (lo, hi) in job.ranges.items() if lo == hi]
        examples = example_inputs(bp, traced, device=device)
        reference = copy.deepcopy(module)  # tracing may touch buffers; evidence compares against untouched weights
        graphs = stage("trace", lambda: trace_joint(module, examples, dynamic_dims(bp, held)))
        if graphs.random_ops:
            raise EagerRoute(
                f"the training graph draws random numbers ({', '.join(graphs.random_ops)}): compiled and eager "
                "cannot draw the same ones, so gradient parity cannot be certified; training runs eager"
            )
        plan = stage("plan", lambda: plan_artifact(graphs, bp, held))
        manifest = stage("manifest", lambda: training_manifest(bp, graphs, plan, reference))
        dims = {n: Dim(n, min=lo, max=hi) for n, (lo, hi) in job.ranges.items() if lo < hi}
        state = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
        fw_args = [examples[s[1]] if s[0] == "input" else state[s[1]].detach().clone() for s in graphs.forward_inputs]
        forward = ForwardGraph(graphs.forward, plan.keep)
        fw_ep: ExportedProgram = stage(
            "export forward", lambda: export_graph(forward, fw_args, plan.forward_dynamic, dims)
        )
        guards = stage("guards", lambda: forward_guards(fw_ep, bp, job.ranges, graphs))
        with torch.no_grad():
            fw_outs = forward(*[a.clone() for a in fw_args])
        bw_args = backward_arguments(plan, examples, fw_args, fw_outs, device)
        backward = BackwardGraph(graphs, plan)
        bw_ep: ExportedProgram = stage(
            "export backward", lambda: export_graph(backward, bw_args, plan.backward_dynamic, dims)
        )
        t1 = time.perf_counter()
        fw_pkg = stage("compile forward", lambda: compile_package(fw_ep, job.tmp / "forward.pt2", job.variant.settings))
        bw_pkg = stage(
            "compile backward", lambda: compile_package(bw_ep, job.tmp / "backward.pt2", job.variant.settings)
        )
        t2 = time.perf_counter()
        index = device_index(device)
        program = stage(
            "load",
            lambda: TrainingProgram(
                manifest, CompiledPackage(fw_pkg, device_index=index), CompiledPackage(bw_pkg, device_index=index)
            ),
        )
        # Kasmina gates a kernel by its entry's guards: the entry being made, with the guards just read.
        entry = job.base.with_(guards=guards)
        try:
            parity, latency = evidence(
                bp, reference, program, entry, list(job.representative), traced, device, job.ranges
            )
        except HeldDims as e:
            # What the fallback records and its specializations compile by (see static_dims).
            job.meta[HELD] = list(e.dims)
            raise StageError(VERIFY_SHAPES, e) from e
        except Exception as e:
            raise StageError("verify", e) from e
        artifact = write_artifact(job.tmp / "training.zip", fw_pkg, bw_pkg, manifest)
        meta = {
            "training": {
                "route": "compiled",
                "format": manifest.to_dict()["format"],
                "trainable": list(plan.trainable),
                "mutated_buffers": manifest.mutated(),
                "saved_tensors": sum(1 for s in plan.forward_outputs if s[0] == "saved"),
                "symbolic_sizes": [list(s) for s in manifest.sizes],
            },
            "export_seconds": round(t1 - t0, 3),
            "aoti_seconds": round(t2 - t1, 3),
            # The seed weight schema: what a seed's state dict holds (non-persistent buffers are the build's).
            "constants": {name: spec.to_dict() for name, spec in manifest.weights().items()},
        }
        return Built(path=artifact, guards=guards, meta=meta, parity=parity, performance=latency)

    def static_dims(self, job: CompileJob) -> list[str]:
        """The dims a specialization holds: those the compiled step was seen to serve only at their traced sizes
        (:class:`HeldDims`, recorded by :meth:`run` when it failed there), with the dims that share their
        inputs' layout (:func:`layout_dims`), so that the first specialization compiled already holds what its
        own compile will pin."""
        return layout_dims(job.bp, job.meta.get(HELD) or (), job.ranges)

    def serves(self, exact: Collection[str], held: Collection[str]) -> bool:
        """The dims a compiled step cannot keep dynamic fail together: a specialization holds exactly them."""
        return bool(held) and set(exact) == set(held)


# The meta key of the dims a failed training compile's step served only at their traced sizes.
HELD = "held_dims"


class HeldDims(RuntimeError):
    """The compiled step fails at a shape, yet runs at its traced sizes: it serves ``dims`` only as traced
    (Inductor specialized them though export kept them dynamic, e.g. a convolution backward's strides)."""

    def __init__(self, dims: Sequence[str], message: str):
        super().__init__(message)
        self.dims = tuple(dims)


def layout_dims(bp: Blueprint, held: Collection[str], ranges: Mapping[str, tuple[int, int]]) -> list[str]:
    """``held`` with every dynamic dim (of ``ranges``) that shares a contiguous input's strides with one of them,
    in declaration order: wherever a held dim is not an input's leading dim, every other non-leading dim of that
    input is held too, and so on for the dims this adds (so a held set holds each layout all or none, the rule
    :meth:`~esper.artifacts.kinds.KindSpec.specializations` may list candidates by).

    Why: what makes a compiled step serve a dim only as traced is Inductor specializing on sizes that export kept
    dynamic, such as a convolution backward's strides. A contiguous input's strides are products of its
    non-leading dims (the leading one enters none), so once one of them is held, a new compile folds it into
    those products and specializes the rest with it: a step that serves width only as traced, compiled with
    width held, serves height only as traced. The probe (:func:`held_dims`) cannot see that, as it runs the
    compile it was given, where the held dim was still dynamic; holding the whole layout at once costs one
    compile per held combination instead of one per dim discovered. A dim whose holding does not pin more is
    then held needlessly (its specialization serves one size of it rather than its range), which is what a
    specialization serving its representative shape's own sizes asks of it anyway; a compile that still pins
    more is caught as before (its specialization falls back naming it)."""
    wanted, grown = set(held), True
    while grown:  # a dim held for one input's layout is held in every input it shares a layout with
        grown = False
        for layout in bp.layouts():
            if layout & wanted and not layout <= wanted:
                wanted |= layout
                grown = True
    return [d for d, (lo, hi) in ranges.items() if d in wanted and lo < hi]


# -- the two graphs as exportable modules -------------------------------------------------------------------


class ForwardGraph(torch.nn.Module):
    """The forward graph, returning only what the runtime keeps (``keep``: graph output positions)."""

    def __init__(self, gm: torch.fx.GraphModule, keep: Sequence[int]):
        super().__init__()
        self.gm = gm
        self.keep = list(keep)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.gm(*args)
        return tuple(outs[i] for i in self.keep)


class BackwardGraph(torch.nn.Module):
    """The backward graph; its size arguments are computed from the dims of the first input (the carrier,
    whose dim i is the size symbol ``plan.size_symbols[i]``)."""

    def __init__(self, graphs: JointGraphs, plan: JointPlan):
        super().__init__()
        self.gm = graphs.backward
        self.layout = [
            ("size", graphs.size_exprs[ref]) if slot == "size" else (slot, ref) for slot, ref in plan.backward_layout
        ]
        self.symbols = list(plan.size_symbols)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = {sym: tensors[0].shape[i] for i, sym in enumerate(self.symbols)}
        args = [evaluate_size(ref, values) if slot == "size" else tensors[ref] for slot, ref in self.layout]
        return tuple(g for g in self.gm(*args) if g is not None)


def export_dim(ref: str | Linear, dims: Mapping[str, Any]) -> Any:
    """What export is given for one dynamic dim of the plan: a declared dim's named ``Dim``, a :class:`Linear`
    size as the derived dim ``scale * Dim + offset``, another compound size as ``Dim.AUTO``."""
    if not isinstance(ref, Linear):
        return Dim.AUTO if ref == COMPOUND else dims[ref]
    derived = dims[ref.dim]
    if ref.scale != 1:
        derived = derived * ref.scale
    return derived + ref.offset if ref.offset else derived


def export_graph(
    module: torch.nn.Module, args: Sequence[torch.Tensor], dynamic: Sequence[DynamicSpec], dims: Mapping[str, Any]
) -> ExportedProgram:
    """Export a graph module with the plan's dynamic dims (see :func:`export_dim`)."""
    shapes = tuple(None if spec is None else {d: export_dim(ref, dims) for d, ref in spec} for spec in dynamic)
    return export(module, tuple(args), dynamic_shapes=(shapes,), strict=False)


def backward_arguments(
    plan: JointPlan,
    examples: Sequence[torch.Tensor],
    fw_args: Sequence[torch.Tensor],
    fw_outs: Sequence[torch.Tensor],
    device: torch.device,
) -> list[torch.Tensor]:
    """Example inputs of the backward package, by the plan's slots: the carrier, saved values, tangents."""
    outputs = {slot[1]: fw_outs[i] for i, slot in enumerate(plan.forward_outputs) if slot[0] == "output"}
    tangents = dict(zip(sorted(outputs), upstream([outputs[k] for k in sorted(outputs)]), strict=True))
    args: list[torch.Tensor] = []
    for slot in plan.backward_inputs:
        if slot[0] == "sizes":
            sizes = [examples[k].shape[d] for k, d in plan.sizes]
            args.append(torch.empty((*sizes, 0), device=device))
        elif slot[0] == "forward_input":
            args.append(fw_args[slot[1]].detach())
        elif slot[0] == "forward_output":
            args.append(fw_outs[slot[1]].detach())
        else:
            args.append(tangents[slot[1]].detach())
    return args


def training_manifest(bp: Blueprint, graphs: JointGraphs, plan: JointPlan, module: torch.nn.Module) -> TrainingManifest:
    """The manifest that wires the two packages. A buffer missing from ``module.state_dict()`` is marked
    non-persistent: part of the module as ``bp.build()`` makes it (a rotary ``inv_freq``, a causal mask), not
    of a seed's weights, so a seed's state dict need not hold it and the runtime reads it from the seed's
    module. One the forward updates is updated there, per seed, as eager updates it."""
    persistent = module.state_dict()
    buffers = list(module.named_buffers())
    return TrainingManifest(
        blueprint=bp.name,
        params=tuple(TensorSpec.of(n, p) for n, p in module.named_parameters()),
        trainable=plan.trainable,
        buffers=tuple(TensorSpec.of(n, b) for n, b in buffers),
        nonpersistent=tuple(n for n, _ in buffers if n not in persistent),
        forward_inputs=tuple(tuple(s) for s in graphs.forward_inputs),
        forward_outputs=plan.forward_outputs,
        backward_inputs=plan.backward_inputs,
        backward_outputs=plan.backward_outputs,
        sizes=plan.sizes,
        n_inputs=len(bp.inputs),
        n_outputs=plan.n_outputs,
        differentiable=plan.differentiable,
        out_spec=pytree.treespec_dumps(graphs.out_spec),
    )


def forward_guards(
    ep: ExportedProgram, bp: Blueprint, ranges: Mapping[str, tuple[int, int]], graphs: JointGraphs
) -> GuardSchema:
    """The inputs' guard schema read back from the forward export (as inference reads it from its export)."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    positions = {slot[1]: i for i, slot in enumerate(graphs.forward_inputs) if slot[0] == "input"}
    values = [placeholders[positions[k]].meta["val"] for k in range(len(bp.inputs))]
    return guards_from_values(ep, bp, values, ranges=ranges)


def evidence(
    bp: Blueprint,
    reference: torch.nn.Module,
    program: TrainingProgram,
    entry: Entry,
    representative: list[dict[str, int]],
    traced: dict[str, int],
    device: torch.device,
    ranges: Mapping[str, tuple[int, int]],
) -> tuple[dict[str, ShapeParity], dict[str, ShapeTiming]]:
    """Gradient parity at the representative shapes and the edges of every dim of ``ranges``, and training-step
    latency at the representative shapes, compiled against eager.

    Inductor may specialize a dim that export kept dynamic (its conv backward guards on the input's strides,
    pinning height and width to the example's), and a package ignores such guards at run time: a compiled
    step that fails or is plainly wrong at a shape while it is right at its traced sizes raises
    :class:`HeldDims`, naming the dims it serves only as traced (see :func:`held_dims`); one that fails
    otherwise raises.
    """
    shapes = [dict(r) for r in representative]
    shapes += [e for e in edge_sizes(dict(ranges)) if e not in shapes]
    parity: dict[str, ShapeParity] = {}
    latency: dict[str, ShapeTiming] = {}
    for sizes in shapes:
        label = Blueprint.shape_label(sizes)
        run = one_step(bp, reference, program, entry, device, sizes)
        if run.problem is not None:
            message = f"the compiled training step {run.problem} (traced at {Blueprint.shape_label(traced)})"
            right = partial(step_is_right, bp, reference, program, entry, device)
            dims = held_dims(right, traced, sizes, ranges)
            if dims:
                raise HeldDims(dims, f"{message}; it serves {', '.join(dims)} only as traced")
            raise RuntimeError(message)
        ratios = [r for r in (v.evidence()["rmse_ratio"] for v in run.verdicts) if r is not None]
        parity[label] = ShapeParity(max(v.max_abs for v in run.verdicts), max(ratios) if ratios else None, True)
        if sizes not in representative:
            continue
        timed = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in run.args]
        with torch.no_grad():
            flat = [t for t in pytree.tree_leaves(run.eager(*run.args)) if isinstance(t, torch.Tensor)]
        grads = upstream(flat)
        latency[label] = ShapeTiming(
            compiled=timing(measure(partial(step, run.kernel, timed, grads))),
            eager=timing(measure(partial(step, run.eager, timed, grads))),
        )
    return parity, latency


@dataclass(frozen=True)
class StepRun:
    """One compiled training step at some sizes, judged against eager at :data:`GROSS` times the parity rule's
    bounds: ``problem`` says how it failed or is plainly wrong (``None``: it ran compiled and agrees)."""

    problem: str | None
    verdicts: tuple[ParityVerdict, ...]
    kernel: TrainingKernel
    eager: torch.nn.Module
    args: tuple[torch.Tensor, ...]


def one_step(
    bp: Blueprint,
    reference: torch.nn.Module,
    program: TrainingProgram,
    entry: Entry,
    device: torch.device,
    sizes: Mapping[str, int],
) -> StepRun:
    """Run one compiled step (forward and backward) at ``sizes`` and judge it against eager (see :class:`StepRun`)."""
    label = Blueprint.shape_label(sizes)
    args = tuple(example_inputs(bp, dict(sizes), device=device))
    kernel = TrainingKernel.for_program(
        bp.name, program=program, entry=entry, build=lambda: reference, seed=copy.deepcopy(reference)
    )
    eager = copy.deepcopy(reference).train()
    try:
        got_out, got = gradients(kernel, args, weights=kernel.seed)
    except Exception as e:  # the failure is the finding: the caller locates it or falls back
        return StepRun(f"fails at {label}: {type(e).__name__}: {e}", (), kernel, eager, args)
    if kernel.last_path != "compiled":
        return StepRun(f"ran {kernel.last_path} at {label}: {kernel.check(*args)}", (), kernel, eager, args)
    exact_out, exact = exact_gradients(eager, args)
    want_out, want = gradients(eager, args)
    tol = bp.tolerance
    loose = dict(atol=tol.atol * GROSS, rtol=tol.rtol * GROSS, slack=POINTWISE_SLACK * GROSS)
    verdicts = (
        judge(got_out, want_out, exact_out, label="output", reduction=GROSS, **loose),
        # Gradients are reductions of a whole step (see esper.numerics.parity.REDUCTION).
        judge(got, want, exact, label="gradient", reduction=REDUCTION * GROSS, **loose),
    )
    wrong = next((v for v in verdicts if not v.passed), None)
    problem = None
    if wrong is not None:
        problem = f"is plainly wrong at {label} (beyond {GROSS:g} times the parity rule's bounds): {wrong.reason}"
    return StepRun(problem, verdicts, kernel, eager, args)


def step_is_right(
    bp: Blueprint,
    reference: torch.nn.Module,
    program: TrainingProgram,
    entry: Entry,
    device: torch.device,
    sizes: Mapping[str, int],
) -> bool:
    """Whether one compiled step at ``sizes`` runs compiled and agrees with eager (see :func:`one_step`)."""
    return one_step(bp, reference, program, entry, device, sizes).problem is None


def held_dims(
    right: Callable[[Mapping[str, int]], bool],
    traced: Mapping[str, int],
    failing: Mapping[str, int],
    ranges: Mapping[str, tuple[int, int]],
) -> list[str]:
    """The dims a compiled step serves only at their traced sizes, given that it fails (or is wrong) at
    ``failing``, in declaration order: none when it is wrong at its traced sizes too (no shape failure).

    A dim is freed only jointly: in declaration order, a dim joins the free ones when the step is right with
    all of them moved together (the others at their traced sizes) to the failing sizes, to the low ends and to
    the high ends of their ranges; every other dim is held. So two dims that fail only together are never both
    freed, and the failing shape itself, its held dims put back, is one the step was seen right at.
    ``right`` runs one step at some sizes."""
    if not right(traced):
        return []
    dynamic = [d for d, (lo, hi) in ranges.items() if lo < hi]

    def far(d: str) -> int:
        # A dim the failing shape leaves put moves to the far end of its range instead.
        lo, hi = ranges[d]
        if failing.get(d, traced[d]) != traced[d]:
            return failing[d]
        return lo if traced[d] - lo > hi - traced[d] else hi

    def moves(dims: Sequence[str]) -> list[dict[str, int]]:
        out = []
        for at in (far, lambda d: ranges[d][0], lambda d: ranges[d][1]):
            sizes = {**traced, **{d: at(d) for d in dims}}
            if sizes != dict(traced) and sizes not in out:
                out.append(sizes)
        return out

    free: list[str] = []
    for d in dynamic:
        if all(right(s) for s in moves([*free, d])):
            free.append(d)
    return [d for d in dynamic if d not in free]
