"""Tezzeret's training compile: a blueprint's forward and backward, ahead of time, with the weights as inputs.

The module (in ``train()`` mode) is traced into partitioned forward and backward graphs
(:mod:`esper.tezzeret.joint`). Each graph is wrapped in a small module and exported with ``torch.export``
(the declared dims as named ``Dim``s; a saved activation's compound size such as ``batch*seq`` as
``Dim.AUTO``), then compiled to its own AOTInductor package:

- the forward package takes the parameters, buffers and inputs and returns the buffers' new values (what
  training mutates, e.g. BatchNorm's running statistics), the outputs and the activations the backward needs;
- the backward package takes a zero-size tensor whose dims carry the dynamic sizes, the saved activations
  (inputs and weights among them are passed again rather than copied) and the upstream gradients, and
  returns the gradients of the inputs and of every trainable parameter.

Both go into one zip with the manifest (:mod:`esper.kasmina.training_artifact`), published as an Urza entry
of variant ``"train"``, with guards read from the forward export exactly as for inference, and gradient
parity and step latency at the representative shapes as evidence. A blueprint whose training graph draws
random numbers (dropout: exact parity with eager is impossible), or that fails at any stage, gets an eager
training route: an entry of kind ``"eager"`` with the reason in ``failure_reason``.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, ExportedProgram, export
from torch.utils import _pytree as pytree

from esper import compat
from esper.bench import measure
from esper.blueprint import Blueprint
from esper.blueprint import Dim as DeclaredDim
from esper.context import machine_context
from esper.coverage import edge_sizes
from esper.gradients import exact_gradients, gradients, step, tolerance, upstream
from esper.guards import GuardSchema
from esper.inputs import example_inputs
from esper.kasmina.runtime import CompiledPackage
from esper.kasmina.seeds import TensorSpec
from esper.kasmina.training import TrainingKernel, TrainingProgram, _Shared
from esper.kasmina.training_artifact import TRAIN_VARIANT, TrainingManifest, write_artifact
from esper.parity import assert_parity, max_errors
from esper.tezzeret.aoti import compile_package, use_persistent_cache
from esper.tezzeret.compiler import new_entry, reusable, store_weights
from esper.tezzeret.content import content_hash
from esper.tezzeret.export import export_sizes, guards_from_values
from esper.tezzeret.joint import JointGraphs, evaluate_size, trace_joint
from esper.urza import DEFAULT_PROFILE, Entry, Urza

log = logging.getLogger("esper.tezzeret")

# Bump when the training compile gives another result for the same input (the content hash covers it).
TRAINING_PIPELINE = "tezzeret-training/2"
COMPILE_CHECK = "train_compile"
MAX_REASON = 4000


class EagerTrainingRoute(Exception):
    """This blueprint trains eager, for the reason given (a decision, e.g. randomness, not a crash)."""


class TrainingStageError(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        self.stage = stage
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        super().__init__(f"training {stage} failed: {detail}"[:MAX_REASON])


def _stage(name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except EagerTrainingRoute:
        raise
    except Exception as e:
        raise TrainingStageError(name, e) from e


class TrainingOutcome:
    """What :func:`compile_training` did: the entry, whether an existing one was reused, and wall time."""

    def __init__(self, entry: Entry, reused: bool, seconds: float):
        self.entry, self.reused, self.seconds = entry, reused, seconds

    @property
    def route(self) -> str:
        return "compiled" if self.entry.kind == "aoti" else "eager"


def dynamic_dims(bp: Blueprint) -> list[list[int]]:
    """Per input, the positions of its dynamic dims."""
    return [[d for d, s in enumerate(i.shape) if isinstance(s, DeclaredDim)] for i in bp.inputs]


def trace_sizes(bp: Blueprint, ranges: Mapping[str, tuple[int, int]], module: torch.nn.Module) -> dict[str, int]:
    """Example sizes for tracing and export: export's choice, moved where needed so that no dynamic dim
    equals another, a fixed input dim or a weight dim (a coincidence export could mistake for a relation,
    specializing the dim), and none is 0 or 1 (which export specializes)."""
    taken = {0, 1}
    taken |= {s for i in bp.inputs for s in i.shape if isinstance(s, int)}
    taken |= {s for t in module.state_dict().values() for s in t.shape}
    chosen: dict[str, int] = {}
    for name, start in export_sizes(bp, ranges).items():
        lo, hi = ranges[name]
        options = [start, *range(start + 1, hi + 1), *range(start - 1, lo - 1, -1)]
        chosen[name] = next((v for v in options if v not in taken), start)
        taken.add(chosen[name])
    return chosen


def compile_training(
    urza: Urza,
    bp: Blueprint,
    *,
    device: str = "cpu",
    settings: Mapping[str, Any] | None = None,
    force: bool = False,
) -> TrainingOutcome:
    """Compile ``bp``'s training artifact into ``urza`` (or reuse the entry with the same content hash and
    compatibility key); a blueprint the path cannot serve gets its eager training route stored instead."""
    started = time.perf_counter()
    dev = torch.device(device)
    cache_dir = use_persistent_cache(urza.path.parent / "inductor-cache")
    settings = dict(settings or {})
    ranges = {n: (d.min, d.max) for n, d in bp.dims.items()}
    key = compat.current(dev)
    module = bp.build().to(dev)
    digest = content_hash(
        bp, module, settings={"training": TRAINING_PIPELINE, **settings}, ranges=ranges, device=dev.type
    )
    existing = (
        None
        if force
        else reusable(urza, bp, digest, key, profile=DEFAULT_PROFILE, variant=TRAIN_VARIANT, artifact="training")
    )
    if existing is not None:
        return TrainingOutcome(existing, True, time.perf_counter() - started)
    base = new_entry(bp, digest, key, profile=DEFAULT_PROFILE, variant=TRAIN_VARIANT).with_(artifact="training")
    meta: dict[str, Any] = {
        "source": bp.source,
        "description": bp.description,
        "settings": settings,
        "ranges": {k: list(v) for k, v in ranges.items()},
        "context": machine_context(),
        "inductor_cache": str(cache_dir),
        "representative": [dict(r) for r in bp.representative],
        "profiles": [DEFAULT_PROFILE],
    }
    with tempfile.TemporaryDirectory(prefix="tezzeret-train-") as tmp, warnings.catch_warnings(record=True) as caught:
        # torch's compiler warns about its own internals; keep what it said as evidence, never fail on it.
        warnings.simplefilter("always")
        try:
            entry = _compile(bp, module, base, meta, ranges, settings, dev, urza, Path(tmp))
        except (EagerTrainingRoute, TrainingStageError) as e:
            log.warning("%s: %s; storing the eager training route", bp.name, e)
            meta["training"] = {"route": "eager", "reason": str(e)}
            if isinstance(e, TrainingStageError):
                meta["failed_stage"] = e.stage
            entry = _store_eager_route(bp, module, base, meta, str(e), urza, Path(tmp))
    seconds = time.perf_counter() - started
    said = sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:20]
    entry = urza.publish(
        entry.with_(meta={**entry.meta, "compile_seconds": round(seconds, 3), "compile_warnings": said})
    )
    return TrainingOutcome(entry, False, seconds)


def _store_eager_route(
    bp: Blueprint, module: torch.nn.Module, base: Entry, meta: dict[str, Any], reason: str, urza: Urza, tmp: Path
) -> Entry:
    checksum, size = store_weights(urza, bp, module, tmp)
    return base.with_(
        kind="eager",
        status="fallback",
        checksum=checksum,
        artifact_size=size,
        meta=meta,
        failure_reason=reason,
        failed_check=COMPILE_CHECK,
    )


def store_eager_training_route(
    urza: Urza,
    bp: Blueprint,
    reason: str,
    *,
    device: str = "cpu",
    status: str = "certified",
    evidence: Mapping[str, Any] | None = None,
) -> Entry:
    """Publish an eager training route for ``bp`` (certification measured eager faster): an entry of kind
    ``"eager"`` whose artifact is the weights, with ``reason`` in ``meta["training"]``."""
    dev = torch.device(device)
    module = bp.build().to(dev)
    ranges = {n: (d.min, d.max) for n, d in bp.dims.items()}
    settings = {"training": TRAINING_PIPELINE, "route": "eager"}
    digest = content_hash(bp, module, settings=settings, ranges=ranges, device=dev.type)
    evidence = dict(evidence or {})
    with tempfile.TemporaryDirectory(prefix="tezzeret-train-") as tmp:
        checksum, size = store_weights(urza, bp, module, Path(tmp))
    return urza.publish(
        Entry(
            blueprint=bp.name,
            blueprint_version=bp.version,
            content_hash=digest,
            compat=compat.current(dev),
            kind="eager",
            status=status,
            checksum=checksum,
            artifact_size=size,
            guards=None,
            profile=DEFAULT_PROFILE,
            variant=TRAIN_VARIANT,
            artifact="training",
            parity=dict(evidence.get("parity", {})),
            performance=dict(evidence.get("performance", {})),
            meta={
                **dict(evidence.get("meta", {})),
                "source": bp.source,
                "ranges": {k: list(v) for k, v in ranges.items()},
                "training": {"route": "eager", "reason": reason},
            },
        )
    )


# -- the two graphs as exportable modules -------------------------------------------------------------------


class _Forward(torch.nn.Module):
    """The forward graph, returning only what the runtime keeps (``keep``: graph output positions)."""

    def __init__(self, gm: torch.fx.GraphModule, keep: list[int]):
        super().__init__()
        self.gm = gm
        self.keep = keep

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.gm(*args)
        return tuple(outs[i] for i in self.keep)


class _Backward(torch.nn.Module):
    """The backward graph; its size arguments are computed from the dims of the first input (the carrier,
    whose dim i is the size symbol ``symbols[i]``)."""

    def __init__(self, gm: torch.fx.GraphModule, layout: list[tuple[str, Any]], symbols: list[str]):
        super().__init__()
        self.gm = gm
        self.layout = layout
        self.symbols = symbols

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = {sym: tensors[0].shape[i] for i, sym in enumerate(self.symbols)}
        args = [evaluate_size(ref, values) if kind == "size" else tensors[ref] for kind, ref in self.layout]
        return tuple(g for g in self.gm(*args) if g is not None)


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _named_dims(bp: Blueprint, ranges: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    return {n: Dim(n, min=lo, max=hi) for n, (lo, hi) in ranges.items()}


def _compile(
    bp: Blueprint,
    module: torch.nn.Module,
    base: Entry,
    meta: dict[str, Any],
    ranges: dict[str, tuple[int, int]],
    settings: dict[str, Any],
    device: torch.device,
    urza: Urza,
    tmp: Path,
) -> Entry:
    t0 = time.perf_counter()
    module.train()
    traced = trace_sizes(bp, ranges, module)
    meta["traced_at"] = traced
    examples = example_inputs(bp, traced, device=device)
    reference = copy.deepcopy(module)  # tracing may touch buffers; evidence compares against untouched weights
    graphs: JointGraphs = _stage("trace", lambda: trace_joint(module, examples, dynamic_dims(bp)))
    if graphs.random_ops:
        raise EagerTrainingRoute(
            f"the training graph draws random numbers ({', '.join(graphs.random_ops)}): compiled and eager "
            "cannot draw the same ones, so gradient parity cannot be certified; training runs eager"
        )
    dims = _named_dims(bp, ranges)
    symbol_dim = {sym: bp.inputs[k].shape[d].name for sym, (k, d) in graphs.symbols.items()}  # type: ignore[union-attr]
    state = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}

    # Forward: keep mutations, outputs and saved activations that are not forward inputs (deduplicated).
    fw_nodes = list(next(n for n in graphs.forward.graph.nodes if n.op == "output").args[0])
    fw_ph = _placeholders(graphs.forward)
    ph_index = {n.name: i for i, n in enumerate(fw_ph)}
    keep: list[int] = []
    kept_by_node: dict[str, int] = {}
    fw_out_slots: list[tuple[Any, ...]] = []
    saved_ref: dict[str, tuple[str, int]] = {}
    for j, (node, slot) in enumerate(zip(fw_nodes, graphs.forward_outputs, strict=True)):
        if slot[0] == "saved_size":
            continue
        if slot[0] == "saved" and node.name in ph_index:
            saved_ref[slot[1]] = ("forward_input", ph_index[node.name])
            continue
        if node.name in kept_by_node and slot[0] == "saved":
            saved_ref[slot[1]] = ("forward_output", kept_by_node[node.name])
            continue
        kept_by_node.setdefault(node.name, len(keep))
        if slot[0] == "saved":
            saved_ref[slot[1]] = ("forward_output", len(keep))
            fw_out_slots.append(("saved",))
        else:
            fw_out_slots.append(tuple(slot))
        keep.append(j)
    fw_args = []
    fw_dynamic: list[Any] = []
    for slot in graphs.forward_inputs:
        if slot[0] == "input":
            k = slot[1]
            fw_args.append(examples[k])
            fw_dynamic.append(
                {d: dims[s.name] for d, s in enumerate(bp.inputs[k].shape) if isinstance(s, DeclaredDim)} or None
            )
        else:
            fw_args.append(state[slot[1]].detach().clone())
            fw_dynamic.append(None)
    forward = _Forward(graphs.forward, keep)
    fw_ep: ExportedProgram = _stage(
        "export forward", lambda: export(forward, tuple(fw_args), dynamic_shapes=(tuple(fw_dynamic),), strict=False)
    )
    guards = _stage("guards", lambda: _guards(fw_ep, bp, ranges, graphs))
    with torch.no_grad():
        fw_outs = forward(*[a.clone() for a in fw_args])

    # Backward: carrier first (when sizes are needed), then saved values and tangents in graph order.
    used_symbols = graphs.size_symbols()
    layout: list[tuple[str, Any]] = []
    bw_slots: list[tuple[Any, ...]] = [("sizes",)] if used_symbols else []
    bw_args: list[torch.Tensor] = []
    bw_dynamic: list[Any] = []
    if used_symbols:
        sizes = [examples[graphs.symbols[s][0]].shape[graphs.symbols[s][1]] for s in used_symbols]
        bw_args.append(torch.empty((*sizes, 0), device=device))
        bw_dynamic.append({i: dims[symbol_dim[s]] for i, s in enumerate(used_symbols)})
    outputs = {slot[1]: fw_outs[i] for i, slot in enumerate(fw_out_slots) if slot[0] == "output"}
    tangent_values = dict(zip(sorted(outputs), upstream([outputs[k] for k in sorted(outputs)]), strict=True))
    for node, slot in zip(_placeholders(graphs.backward), graphs.backward_inputs, strict=True):
        if slot[0] == "size":
            layout.append(("size", graphs.size_exprs[slot[1]]))
            continue
        if slot[0] == "saved":
            ref = saved_ref[slot[1]]
            value = fw_args[ref[1]] if ref[0] == "forward_input" else fw_outs[ref[1]]
            bw_slots.append(ref)
        else:
            value = tangent_values[slot[1]]
            bw_slots.append(tuple(slot))
        layout.append(("tensor", len(bw_args)))
        bw_args.append(value.detach())
        bw_dynamic.append(_dynamic_of(graphs, node.name, dims, symbol_dim))
    backward = _Backward(graphs.backward, layout, used_symbols)
    bw_ep: ExportedProgram = _stage(
        "export backward", lambda: export(backward, tuple(bw_args), dynamic_shapes=(tuple(bw_dynamic),), strict=False)
    )
    t1 = time.perf_counter()
    fw_pkg = _stage("compile forward", lambda: compile_package(fw_ep, tmp / "forward.pt2", settings))
    bw_pkg = _stage("compile backward", lambda: compile_package(bw_ep, tmp / "backward.pt2", settings))
    t2 = time.perf_counter()

    trainable = [s[1] for s in graphs.backward_outputs if s[0] == "param"]
    persistent = reference.state_dict()
    manifest = TrainingManifest(
        blueprint=bp.name,
        params=tuple(TensorSpec.of(n, p) for n, p in reference.named_parameters()),
        trainable=tuple(trainable),
        buffers=tuple(TensorSpec.of(n, b) for n, b in reference.named_buffers() if n in persistent),
        forward_inputs=tuple(tuple(s) for s in graphs.forward_inputs),
        forward_outputs=tuple(fw_out_slots),
        backward_inputs=tuple(bw_slots),
        backward_outputs=tuple(tuple(s) for s in graphs.backward_outputs if s[0] != "none"),
        sizes=tuple(graphs.symbols[s] for s in used_symbols),
        n_inputs=len(bp.inputs),
        n_outputs=len(outputs),
        differentiable=tuple(sorted(s[1] for s in graphs.backward_inputs if s[0] == "tangent")),
        out_spec=pytree.treespec_dumps(graphs.out_spec),
    )
    unknown = [s[1] for s in manifest.forward_inputs if s[0] == "buffer" and s[1] not in persistent]
    if unknown:
        raise TrainingStageError("manifest", ValueError(f"non-persistent buffers {unknown} are not supported"))
    index = -1 if device.type == "cpu" else (device.index or 0)
    program = _stage(
        "load",
        lambda: TrainingProgram(
            manifest, CompiledPackage(fw_pkg, device_index=index), CompiledPackage(bw_pkg, device_index=index)
        ),
    )
    parity, latency = _stage(
        "verify",
        lambda: _evidence(bp, reference, program, base.with_(guards=guards), meta["representative"], traced, device),
    )
    artifact = write_artifact(tmp / "training.zip", fw_pkg, bw_pkg, manifest)
    checksum, size = urza.store.add(artifact)
    meta.update(
        training={
            "route": "compiled",
            "format": manifest.to_dict()["format"],
            "trainable": list(trainable),
            "mutated_buffers": manifest.mutated(),
            "saved_tensors": sum(1 for s in fw_out_slots if s[0] == "saved"),
            "symbolic_sizes": [list(s) for s in manifest.sizes],
        },
        export_seconds=round(t1 - t0, 3),
        aoti_seconds=round(t2 - t1, 3),
        constants={s.name: s.to_dict() for s in (*manifest.params, *manifest.buffers)},
    )
    return base.with_(
        checksum=checksum,
        artifact_size=size,
        guards=guards,
        meta=meta,
        parity={"representative": parity},
        performance={"tezzeret": latency},
    )


def _dynamic_of(
    graphs: JointGraphs, node_name: str, dims: Mapping[str, Any], symbol_dim: Mapping[str, str]
) -> dict[int, Any] | None:
    """Export's dynamic spec for one backward input: declared dims by name, compound sizes as ``Dim.AUTO``."""
    node = next(n for n in graphs.backward.graph.nodes if n.op == "placeholder" and n.name == node_name)
    spec: dict[int, Any] = {}
    for d, (size, symbol) in enumerate(zip(node.meta["val"].shape, graphs.symbolic_dims(node_name), strict=True)):
        if symbol is not None and symbol in symbol_dim:
            spec[d] = dims[symbol_dim[symbol]]
        elif not isinstance(size, int):
            spec[d] = Dim.AUTO
    return spec or None


def _guards(
    ep: ExportedProgram, bp: Blueprint, ranges: Mapping[str, tuple[int, int]], graphs: JointGraphs
) -> GuardSchema:
    """The inputs' guard schema read back from the forward export (as inference reads it from its export)."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    positions = {slot[1]: i for i, slot in enumerate(graphs.forward_inputs) if slot[0] == "input"}
    values = [placeholders[positions[k]].meta["val"] for k in range(len(bp.inputs))]
    return guards_from_values(ep, bp, values, ranges=ranges)


# Tezzeret routes a blueprint eager when compiled and eager disagree by more than this many tolerances at a
# verified shape: compiled code that is plainly wrong there (certification then checks at the tolerance).
GROSS = 10.0


def _evidence(
    bp: Blueprint,
    reference: torch.nn.Module,
    program: TrainingProgram,
    entry: Entry,
    representative: list[dict[str, int]],
    traced: dict[str, int],
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gradient parity at the representative shapes and every dim's edges, and training-step latency at the
    representative shapes, compiled against eager.

    Inductor may specialize a dim that export kept dynamic (its conv backward guards on the input's strides,
    pinning height and width to the example's), and a package ignores such guards at run time: a compiled
    step that fails or is plainly wrong at an edge shape raises, so the blueprint trains eager.
    """
    shared = _Shared(bp.name, program=program, entry=entry, reason="tezzeret", build=lambda: reference, inference=None)
    ranges = {n: (d.min, d.max) for n, d in bp.dims.items()}
    shapes = [dict(r) for r in representative]
    shapes += [e for e in edge_sizes(ranges) if e not in shapes]
    tol = bp.tolerance
    parity: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    for sizes in shapes:
        label = Blueprint.shape_label(sizes)
        args = example_inputs(bp, sizes, device=device)
        kernel = TrainingKernel(shared, copy.deepcopy(reference))
        eager = copy.deepcopy(reference).train()
        try:
            got_out, got = gradients(kernel, args, weights=kernel.seed)
        except Exception as e:
            raise RuntimeError(
                f"the compiled training step fails at {label} (traced at {Blueprint.shape_label(traced)}: Inductor "
                f"may have specialized a dim export kept dynamic): {type(e).__name__}: {e}"
            ) from e
        exact_out, exact = exact_gradients(eager, args)
        want_out, want = gradients(eager, args)
        if kernel.last_path != "compiled":
            raise RuntimeError(f"the training kernel ran {kernel.last_path} at {label}: {kernel.check(*args)}")
        pairs = [("output", got_out, want_out, exact_out)]
        pairs += [(f"gradient of {n}", got[n], want[n], exact[n]) for n in want]
        for what, g, w, x in pairs:
            atol, rtol = tolerance(tol.atol, tol.rtol, w, x)
            assert_parity(g, w, atol=atol * GROSS, rtol=rtol * GROSS, context=f"{what} at {label}")
        errors = [max_errors(g, w) for _, g, w, _ in pairs]
        parity[label] = {"max_abs": max(e[0] for e in errors), "max_rel": max(e[1] for e in errors)}
        if sizes not in representative:
            continue
        timed = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
        with torch.no_grad():
            flat = [t for t in pytree.tree_leaves(eager(*args)) if isinstance(t, torch.Tensor)]
        grads = upstream(flat)
        latency[label] = {
            "compiled": measure(lambda k=kernel, a=timed, g=grads: step(k, a, g)).to_dict(),
            "eager": measure(lambda m=eager, a=timed, g=grads: step(m, a, g)).to_dict(),
        }
    return parity, latency
