"""Tezzeret's pipeline for one blueprint: build, export, guards, AOTInductor package, pre-warm, measure, store.

A failure at any stage after the module is built stores an eager fallback entry (the weights, as
safetensors) with the failure reason, so a catalog run always goes on to the next blueprint.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper import compat
from esper.bench import measure
from esper.blueprint import Blueprint
from esper.context import machine_context
from esper.guards import GuardSchema
from esper.inputs import example_inputs
from esper.kasmina.runtime import CompiledPackage
from esper.parity import max_errors
from esper.profiles import contains
from esper.tezzeret.aoti import compile_package, use_persistent_cache
from esper.tezzeret.content import content_hash
from esper.tezzeret.export import export_blueprint, guards_from_export
from esper.urza import DEFAULT_PROFILE, ArtifactError, Entry, Urza
from esper.variants import EAGER_ROUTE, VARIANTS, Variant
from esper.weights import save_state

log = logging.getLogger("esper.tezzeret")
MAX_REASON = 4000


@dataclass(frozen=True)
class CompileOutcome:
    """What :meth:`Tezzeret.compile` did: the entry, whether an existing one was reused, and wall time."""

    entry: Entry
    reused: bool
    seconds: float


class StageError(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        self.stage = stage
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        super().__init__(f"{stage} failed: {detail}"[:MAX_REASON])


def _stage(name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:
        raise StageError(name, e) from e


def _device_index(device: torch.device) -> int:
    return -1 if device.type == "cpu" else (device.index or 0)


def reusable(
    urza: Urza,
    bp: Blueprint,
    digest: str,
    key: compat.CompatKey,
    *,
    profile: str,
    variant: str,
    artifact: str = "inference",
) -> Entry | None:
    """The newest entry with this identity whose artifact still verifies, or ``None`` (compile again)."""
    existing = urza.find(bp.name, bp.version, digest, key, profile=profile, variant=variant, artifact=artifact)
    if existing is None:
        return None
    try:
        urza.store.verify(existing.checksum, existing.artifact_size)
    except ArtifactError as e:
        log.warning("%s: entry #%s unusable (%s); compiling again", bp.name, existing.id, e)
        return None
    log.info("%s: reusing Urza entry #%s (%s)", bp.name, existing.id, existing.status)
    return existing


def new_entry(bp: Blueprint, digest: str, key: compat.CompatKey, *, profile: str, variant: str) -> Entry:
    """A not-yet-stored compiled entry of ``bp``: identity filled in, artifact and evidence to come."""
    return Entry(
        blueprint=bp.name,
        blueprint_version=bp.version,
        content_hash=digest,
        compat=key,
        kind="aoti",
        status="compiled",
        checksum="",
        artifact_size=0,
        guards=None,
        profile=profile,
        variant=variant,
    )


def store_weights(urza: Urza, bp: Blueprint, module: torch.nn.Module, tmp: Path) -> tuple[str, int]:
    """The module's weights as a safetensors artifact in the store: ``(sha256, size)``."""
    path = tmp / "weights.safetensors"
    save_state(module, path, blueprint=bp.name, version=bp.version)
    return urza.store.add(path)


class Tezzeret:
    """Compiles blueprints into ``urza``. Sets a persistent Inductor cache beside Urza unless one is set."""

    def __init__(self, urza: Urza, *, device: str = "cpu"):
        self.urza = urza
        self.device = torch.device(device)
        self.cache_dir = use_persistent_cache(urza.path.parent / "inductor-cache")

    def compile(
        self,
        bp: Blueprint,
        *,
        variant: Variant = VARIANTS["default"],
        profile: str = DEFAULT_PROFILE,
        force: bool = False,
    ) -> CompileOutcome:
        """Compile one shape profile of ``bp`` under one variant (or reuse the entry with the same content
        hash and compatibility key). The entry is written once, complete, after its artifact is stored.
        """
        started = time.perf_counter()
        ranges = bp.profiles()[profile]
        key = compat.current(self.device)
        module = bp.build().to(self.device).eval()
        digest = content_hash(bp, module, settings=variant.settings, ranges=ranges, device=self.device.type)
        existing = None if force else reusable(self.urza, bp, digest, key, profile=profile, variant=variant.name)
        if existing is not None:
            return CompileOutcome(existing, True, time.perf_counter() - started)
        base = new_entry(bp, digest, key, profile=profile, variant=variant.name)
        meta: dict[str, Any] = {
            "source": bp.source,
            "description": bp.description,
            "settings": dict(variant.settings),
            "ranges": {k: list(v) for k, v in ranges.items()},
            "context": machine_context(),
            "inductor_cache": str(self.cache_dir),
            "representative": [r for r in bp.representative if contains(ranges, r)],
            "profiles": list(bp.profiles()),
            "swappable": variant.swappable,
        }
        with tempfile.TemporaryDirectory(prefix="tezzeret-") as tmp, warnings.catch_warnings(record=True) as caught:
            # torch's compiler warns about its own internals; keep what it said as evidence, never fail on it.
            warnings.simplefilter("always")
            try:
                entry = self._compile_aoti(bp, module, base, meta, ranges, variant, Path(tmp))
            except StageError as e:
                log.warning("%s: %s; storing eager fallback", bp.name, e)
                meta["failed_stage"] = e.stage
                entry = self._store_fallback(bp, module, base, meta, str(e), Path(tmp))
        seconds = time.perf_counter() - started
        said = sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:20]
        entry = self.urza.publish(
            entry.with_(meta={**entry.meta, "compile_seconds": round(seconds, 3), "compile_warnings": said})
        )
        return CompileOutcome(entry, False, seconds)

    def compile_candidates(self, bp: Blueprint, *, force: bool = False) -> list[CompileOutcome]:
        """Every shape profile of ``bp`` under every variant it allows; a fallback never stops the run."""
        return [
            self.compile(bp, variant=VARIANTS[v], profile=p, force=force) for p in bp.profiles() for v in bp.variants
        ]

    def store_eager_route(self, bp: Blueprint, profile: str, guards: GuardSchema, evidence: dict[str, Any]) -> Entry:
        """A ``certified`` eager entry for a profile where no variant beats eager: routing it to compiled code
        would only make it slower. Its artifact is the weights, like a fallback's."""
        module = bp.build().to(self.device).eval()
        ranges = bp.profiles()[profile]
        digest = content_hash(bp, module, settings={"route": EAGER_ROUTE}, ranges=ranges, device=self.device.type)
        with tempfile.TemporaryDirectory(prefix="tezzeret-") as tmp:
            checksum, size = store_weights(self.urza, bp, module, Path(tmp))
        return self.urza.publish(
            Entry(
                blueprint=bp.name,
                blueprint_version=bp.version,
                content_hash=digest,
                compat=compat.current(self.device),
                kind="eager",
                status="certified",
                checksum=checksum,
                artifact_size=size,
                guards=guards,
                profile=profile,
                variant=EAGER_ROUTE,
                parity=evidence.get("parity", {}),
                performance=evidence.get("performance", {}),
                meta={
                    "source": bp.source,
                    "ranges": {k: list(v) for k, v in ranges.items()},
                    "representative": [r for r in bp.representative if contains(ranges, r)],
                    "profiles": list(bp.profiles()),
                    **evidence.get("meta", {}),
                },
            )
        )

    def _compile_aoti(
        self,
        bp: Blueprint,
        module: torch.nn.Module,
        base: Entry,
        meta: dict[str, Any],
        ranges: dict[str, tuple[int, int]],
        variant: Variant,
        tmp: Path,
    ) -> Entry:
        t0 = time.perf_counter()
        ep = _stage("export", lambda: export_blueprint(bp, module, ranges=ranges, device=self.device))
        guards = _stage("guards", lambda: guards_from_export(ep, bp, ranges=ranges))
        t1 = time.perf_counter()
        package = _stage("compile", lambda: compile_package(ep, tmp / "model.pt2", variant.settings))
        t2 = time.perf_counter()
        loaded = _stage("load", lambda: CompiledPackage(package, device_index=_device_index(self.device)))
        latency: dict[str, Any] = {}
        parity: dict[str, Any] = {}
        with torch.no_grad():
            for sizes in meta["representative"]:
                label = Blueprint.shape_label(sizes)
                args = example_inputs(bp, sizes, device=self.device)
                got = _stage("pre-warm", lambda args=args: loaded(args))
                want = module(*args)
                abs_err, rel_err = max_errors(got, want)
                parity[label] = {"max_abs": abs_err, "max_rel": rel_err}
                latency[label] = {
                    "compiled": measure(lambda args=args: loaded(args)).to_dict(),
                    "eager": measure(lambda args=args: module(*args)).to_dict(),
                }
        meta.update(
            export_seconds=round(t1 - t0, 3),
            aoti_seconds=round(t2 - t1, 3),
            package_metadata=loaded.metadata(),
            constants=_constant_schema(module, loaded),
            folded_constants=_folded_constants(ep, loaded),
        )
        checksum, size = self.urza.store.add(package)
        entry = base.with_(
            checksum=checksum,
            artifact_size=size,
            guards=guards,
            meta=meta,
            parity={"representative": parity},
            performance={"tezzeret": latency},
        )
        return entry

    def _store_fallback(
        self,
        bp: Blueprint,
        module: torch.nn.Module,
        base: Entry,
        meta: dict[str, Any],
        reason: str,
        tmp: Path,
    ) -> Entry:
        checksum, size = store_weights(self.urza, bp, module, tmp)
        entry = base.with_(
            kind="eager",
            status="fallback",
            checksum=checksum,
            artifact_size=size,
            meta=meta,
            failure_reason=reason,
            failed_check="compile",
        )
        return entry


def _constant_schema(module: torch.nn.Module, loaded: CompiledPackage) -> dict[str, dict[str, Any]]:
    """Name, shape and dtype of each weight the package holds (what a seed's own weights must match)."""
    state = module.state_dict()
    return {
        name: {"shape": list(state[name].shape), "dtype": str(state[name].dtype).removeprefix("torch.")}
        for name in sorted(loaded.constant_names())
        if name in state
    }


def _folded_constants(ep: Any, loaded: CompiledPackage) -> list[str]:
    """Weights the exported graph uses that Inductor folded into the compiled code (they are no package
    constants): a seed bound to this artifact must keep their values (see esper.kasmina.seeds)."""
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    used = {names[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in names and n.users}
    return sorted(used - set(loaded.constant_names()))
