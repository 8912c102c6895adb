"""The inference artifact's stages: export -> guards -> one AOTInductor package -> pre-warm, parity, latency.

One shape profile under one variant (:mod:`esper.artifacts.variants`) per artifact: the module (in ``eval()`` mode) is
exported with the profile's ranges as named dims, the guard schema is read back from the export, and the
package's parity and latency against eager are measured at the profile's representative shapes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.export import ExportedProgram

from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.runtime import CompiledPackage, device_index
from esper.artifacts.variants import Variant
from esper.blueprint import Blueprint
from esper.numerics.bench import Latency, measure
from esper.numerics.inputs import example_inputs
from esper.numerics.parity import ParityVerdict, float64_reference, judge
from esper.tezzeret.aoti import compile_package
from esper.tezzeret.export import export_blueprint, export_sizes, guards_from_export
from esper.tezzeret.pipeline import Built, CompileJob, SpecPipeline, stage
from esper.urza.evidence import ShapeParity, ShapeTiming, Timing


@dataclass(frozen=True)
class InferencePipeline(SpecPipeline):
    """Forward only, weights inside the package: every shape profile under every variant (its spec's rule)."""

    kind: ArtifactKind = ArtifactKind.INFERENCE

    def build(self, bp: Blueprint, device: torch.device) -> torch.nn.Module:
        """The blueprint's module in eval mode."""
        return bp.build().to(device).eval()

    def meta(self, bp: Blueprint, variant: Variant) -> dict[str, Any]:
        """Every profile of the blueprint (Kasmina routes between them) and whether seeds may swap weights."""
        return {"profiles": list(self.spec.profiles(bp)), "swappable": variant.swappable}

    def eager_meta(self, reason: str | None) -> dict[str, Any]:
        """The reason, when one is given (a fallback's is also its ``failure_reason``)."""
        return {"eager_reason": reason} if reason else {}

    def run(self, job: CompileJob) -> Built:
        """Export, read the guards, compile one package, load it once and measure it against eager."""
        bp, module, device = job.bp, job.module, job.device
        t0 = time.perf_counter()
        ep = stage("export", lambda: export_blueprint(bp, module, ranges=job.ranges, device=device))
        guards = stage("guards", lambda: guards_from_export(ep, bp, ranges=job.ranges))
        t1 = time.perf_counter()
        package = stage("compile", lambda: compile_package(ep, job.tmp / "model.pt2", job.variant.settings))
        t2 = time.perf_counter()
        loaded = stage("load", lambda: CompiledPackage(package, device_index=device_index(device)))
        latency: dict[str, ShapeTiming] = {}
        parity: dict[str, ShapeParity] = {}
        tol = bp.tolerance
        with torch.no_grad():
            for sizes in job.representative:
                label = Blueprint.shape_label(sizes)
                args = example_inputs(bp, sizes, device=device)
                got = stage("pre-warm", partial(loaded, args))
                # Evidence only: certification judges every planned case by the same rule and decides.

                def verify(got: Any = got, args: tuple[torch.Tensor, ...] = args) -> ParityVerdict:
                    reference = float64_reference(module, args)
                    return judge(got, module(*args), reference, atol=tol.atol, rtol=tol.rtol)

                verdict = stage("verify", verify)
                figures = verdict.evidence()
                parity[label] = ShapeParity(verdict.max_abs, figures["rmse_ratio"], verdict.passed)
                latency[label] = ShapeTiming(
                    compiled=timing(measure(partial(loaded, args))),
                    eager=timing(measure(partial(module, *args))),
                )
        meta = {
            "export_seconds": round(t1 - t0, 3),
            "aoti_seconds": round(t2 - t1, 3),
            "package_metadata": loaded.metadata(),
            "constants": constant_schema(module, loaded),
            "folded_constants": folded_constants(ep, loaded),
        }
        return Built(path=package, guards=guards, meta=meta, parity=parity, performance=latency)

    def static_dims(self, job: CompileJob) -> list[str]:
        """Each dynamic dim in turn held at its export size, the others dynamic: the dims whose holding lets the
        module export and its guards read back (one export per dim of more than one size)."""
        found = []
        for dim, (lo, hi) in job.ranges.items():
            if lo == hi:
                continue
            size = export_sizes(job.bp, job.ranges)[dim]
            held = {**job.ranges, dim: (size, size)}
            try:
                ep = export_blueprint(job.bp, job.module, ranges=held, device=job.device)
                guards_from_export(ep, job.bp, ranges=held)
            except Exception:  # that dim was not the one, or export fails for another reason
                continue
            found.append(dim)
        return found


def timing(latency: Latency) -> Timing:
    """Evidence of one side's :func:`~esper.numerics.bench.measure`."""
    return Timing(latency.p50_ms, latency.p95_ms, {"n": latency.n})


def constant_schema(module: torch.nn.Module, loaded: CompiledPackage) -> dict[str, dict[str, Any]]:
    """Name, shape and dtype of each tensor the package holds (what a seed's own tensors must match): a weight or
    buffer of the state dict, or a non-persistent buffer, which no state dict holds but the compiled code may
    read all the same (a position table sliced to a dynamic length is no constant Inductor can fold)."""
    state = {**dict(module.named_buffers()), **module.state_dict()}
    return {
        name: {"shape": list(state[name].shape), "dtype": str(state[name].dtype).removeprefix("torch.")}
        for name in sorted(loaded.constant_names())
        if name in state
    }


def folded_constants(ep: ExportedProgram, loaded: CompiledPackage) -> list[str]:
    """Weights the exported graph uses that Inductor folded into the compiled code (they are no package
    constants): a seed bound to this artifact must keep their values (see esper.kasmina.seeds)."""
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    used = {names[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in names and n.users}
    return sorted(used - set(loaded.constant_names()))
