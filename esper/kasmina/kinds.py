"""The per-kind half of Kasmina's one load path.

:class:`~esper.kasmina.loader.Kasmina` runs the same steps for every artifact kind: choose the entries to
route to, verify each artifact (signature, size, sha256) before anything reads it, load it, pre-warm it, and
build the kernel; any step that fails leaves an eager kernel and a WARNING with the step's reason code. What
differs per kind is behind :class:`ArtifactLoader`: which entries to choose, how to open and pre-warm an
artifact, and which kernel to build. :class:`InferenceLoader` loads one package per shape profile into a
:class:`~esper.kasmina.kernel.Kernel`; :class:`TrainingLoader` loads a forward and a backward program into a
:class:`~esper.kasmina.training_kernel.TrainingKernel`.

First use: a kind may defer entries (:meth:`ArtifactLoader.deferred_ids`). Inference defers every compiled
route but the first: such a route is checked at load (guards, staleness) and takes the remaining steps,
in the same order (signature, size and sha256, load, pre-warm), on the first call its guards accept; a step
that fails then makes that route eager with one WARNING (:class:`~esper.kasmina.kernel.DeferredPackage`).
Digests already verified by this process are not hashed again (:meth:`esper.urza.store.ArtifactStore.verify`).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from esper.artifacts.compat import CompatKey
from esper.artifacts.kinds import ArtifactKind, KindSpec, spec
from esper.artifacts.runtime import CompiledPackage, PackageLoadError, device_index
from esper.artifacts.tensors import torch_dtype
from esper.artifacts.training_manifest import ArtifactFormatError, open_artifact
from esper.kasmina import telemetry
from esper.kasmina.base import KernelBase
from esper.kasmina.kernel import DeferredPackage, Kernel, Route
from esper.kasmina.seeds import Weights
from esper.kasmina.training_kernel import TrainingKernel, TrainingProgram, manifest_problem, same_weights
from esper.kasmina.unusable import Unusable, removed_profiles
from esper.profiles import is_specialization
from esper.urza import Entry
from esper.urza.schema import EntryMeta

Chooser = Callable[[Sequence[Entry], CompatKey], list[Entry]]
# The kernel type a kind's loader builds.
K = TypeVar("K", bound=KernelBase, covariant=True)


@dataclass(frozen=True)
class Loaded:
    """One chosen entry that passed every step: its loaded artifact, or ``None`` for an eager route
    (certification measured eager faster, so there is nothing to load)."""

    entry: Entry
    artifact: Any | None


@dataclass(frozen=True)
class LoadResult:
    """What the shared steps produced for one blueprint, for :meth:`ArtifactLoader.kernel` to build from."""

    name: str
    entries: list[Entry]
    chosen: list[Entry]
    loaded: list[Loaded]
    problems: list[Unusable]


class ArtifactLoader(ABC, Generic[K]):
    """How Kasmina chooses, opens, pre-warms and serves one artifact kind.

    ``open`` and ``prewarm`` raise :class:`Unusable` (reason ``load-failed``) for an artifact that verified
    but cannot run; ``kernel`` never raises for Urza's content.
    """

    kind: ArtifactKind

    def __init__(self, choose: Chooser, device: torch.device):
        self._choose = choose
        self.device = device

    @property
    def spec(self) -> KindSpec:
        """The declarative facts of this loader's kind."""
        return spec(self.kind)

    @property
    def noun(self) -> str:
        """How messages name an entry of this kind (``"training entry #3"``)."""
        return self.spec.noun

    @property
    def guarded_eager(self) -> bool:
        """Whether an eager entry is a route for the inputs its guards accept (so it needs a guard schema),
        rather than for every call."""
        return self.spec.guarded_eager

    def choose(self, entries: Sequence[Entry], key: CompatKey) -> list[Entry]:
        """The entries to route to, newest first; :class:`Unusable` says why there are none."""
        return self._choose(entries, key)

    def evidence_label(self, entry: Entry) -> str:
        """How the INFO record for an eager route chosen by measurement names what runs eager."""
        return entry.profile

    def deferred_ids(self, chosen: Sequence[Entry]) -> frozenset[int]:
        """The chosen entries whose artifact is verified, loaded and pre-warmed on first use rather than at
        load (see :meth:`defer`); none by default."""
        return frozenset()

    def defer(self, entry: Entry, load: Callable[[], Any]) -> Any:
        """What stands for ``entry``'s artifact until first use; ``load()`` verifies, opens and pre-warms it
        (raising :class:`Unusable`). Only called for :meth:`deferred_ids`."""
        raise NotImplementedError(f"{type(self).__name__} loads every artifact at load")

    @abstractmethod
    def open(self, path: Path, entry: Entry) -> Any:
        """Load the verified artifact at ``path``."""

    @abstractmethod
    def prewarm(self, artifact: Any, entry: Entry) -> None:
        """Run the loaded artifact once at its smallest or representative shape, changing nothing."""

    @abstractmethod
    def kernel(self, result: LoadResult) -> K:
        """The kernel for ``result``: compiled where something loaded, else eager with the first problem."""

    def _zeros(self, entry: Entry, sizes: dict[str, int]) -> list[torch.Tensor]:
        """Zero inputs of ``entry``'s guard schema at ``sizes`` (a guard's dtype is one of a fixed list)."""
        assert entry.guards is not None
        return [
            torch.zeros(s, dtype=torch_dtype(g.dtype), device=self.device)
            for s, g in zip(entry.guards.shapes(sizes), entry.guards.inputs, strict=True)
        ]


class InferenceLoader(ArtifactLoader[Kernel]):
    """Inference: one package per chosen shape profile; eager routes where certification measured eager."""

    kind = ArtifactKind.INFERENCE

    def __init__(
        self,
        choose: Chooser,
        device: torch.device,
        *,
        eager_module: Callable[[str, Entry | None], torch.nn.Module],
        own_tables: bool = False,
    ):
        super().__init__(choose, device)
        self._eager_module = eager_module
        # Seeds route each entry by the cells it won on its own: the entries a profile's cells were shared
        # with may fold the weights into their code, and then are not among a seed's routes.
        self._own_tables = own_tables

    def deferred_ids(self, chosen: Sequence[Entry]) -> frozenset[int]:
        """Every compiled route but the first: it loads at load (a single-route blueprint is served as soon
        as it is loaded), the others on the first call their guards accept (:class:`DeferredPackage`)."""
        return frozenset(e.id for e in [e for e in chosen if e.engine == "aoti"][1:] if e.id is not None)

    def defer(self, entry: Entry, load: Callable[[], Any]) -> DeferredPackage:
        return DeferredPackage(load, f"entry #{entry.id}")

    def open(self, path: Path, entry: Entry) -> CompiledPackage:
        try:
            return CompiledPackage(path, device_index=device_index(self.device))
        except PackageLoadError as e:
            raise Unusable(telemetry.LOAD_FAILED, str(e)) from e

    def prewarm(self, artifact: Any, entry: Entry) -> None:
        assert entry.guards is not None
        # Rows are validated before they get here (EntryMeta), so the sizes are inside the guards.
        reps = EntryMeta.from_entry(entry).representative_sizes()
        args = self._zeros(entry, reps[0] if reps else {n: lo for n, (lo, _) in entry.guards.dim_ranges().items()})
        try:
            artifact(args)
        except Exception as e:
            raise Unusable(telemetry.LOAD_FAILED, f"pre-warm of entry #{entry.id} failed: {e}") from e

    def kernel(self, result: LoadResult) -> Kernel:
        index = device_index(self.device) if self.device.type == "cuda" else None
        routes = [Route.of(x.entry, x.artifact, device_index=index, own=self._own_tables) for x in result.loaded]
        if not self._own_tables:
            routes = busiest_first(routes)
        # An eager entry stores the builder's weights: the eager module loads them when versions match.
        weights = next((e for e in result.entries if e.engine == "eager"), None)

        def eager_factory() -> torch.nn.Module:
            return self._eager_module(result.name, weights)

        if not any(r.package is not None for r in routes):
            reason = result.problems[0].detail if result.problems else "certification measured eager as fastest"
        else:
            reason = "certified entries " + ", ".join(f"#{r.entry.id}" for r in routes)
        refused = removed_profiles(result.problems, (r.entry.profile for r in routes))
        return Kernel(result.name, eager_factory=eager_factory, routes=routes, reason=reason, refused=refused)


def busiest_first(routes: Sequence[Route]) -> list[Route]:
    """``routes`` with those sharing one profile's cells in the order of how many cells each serves, most first
    (their cells are disjoint, so the order changes no answer: a call into the largest share then costs one
    region lookup, as on a profile served alone); every profile keeps its place."""
    place: dict[str, int] = {}
    for i, r in enumerate(routes):
        place.setdefault(r.entry.profile, i)
    return sorted(
        routes,
        key=lambda r: (place[r.entry.profile], -(r.table.compiled_cells() if r.regional and r.table else 0)),
    )


# Loaded programs by (artifact checksum, device index): every kernel of one artifact shares one.
_programs: weakref.WeakValueDictionary[tuple[str, int], TrainingProgram] = weakref.WeakValueDictionary()


class TrainingLoader(ArtifactLoader[TrainingKernel]):
    """Training: one forward-and-backward program, or the eager route certification chose by measurement;
    the kernel holds a seed built from ``build`` with ``weights``, and serves ``eval()`` through
    ``inference`` (the seed-routing inference kernel, built on first use)."""

    kind = ArtifactKind.TRAINING

    def __init__(
        self,
        choose: Chooser,
        device: torch.device,
        *,
        build: Callable[[], torch.nn.Module],
        inference: Callable[[], Kernel | None],
        weights: Weights | None,
    ):
        super().__init__(choose, device)
        self._build = build
        self._inference = inference
        self._weights = weights

    def evidence_label(self, entry: Entry) -> str:
        return f"{entry.profile} (training)"

    def open(self, path: Path, entry: Entry) -> TrainingProgram:
        index = device_index(self.device)
        cached = _programs.get((entry.checksum, index))
        if cached is not None:
            return cached
        try:
            manifest, forward, backward = open_artifact(path, device_index=index)
        except (ArtifactFormatError, PackageLoadError, ValueError) as e:
            raise Unusable(telemetry.LOAD_FAILED, f"training entry #{entry.id}: {e}") from e
        program = TrainingProgram(manifest, forward, backward)
        _programs[(entry.checksum, index)] = program
        return program

    def prewarm(self, artifact: Any, entry: Entry) -> None:
        """One forward and backward at the smallest accepted shape, on copies of the buffers (nothing moves)."""
        assert entry.guards is not None
        args = self._zeros(entry, {n: lo for n, (lo, _) in entry.guards.dim_ranges().items()})
        m = artifact.manifest
        built = self._build()
        # Every buffer the manifest names, non-persistent ones too (a state dict holds persistent ones only).
        tensors = {
            **dict(built.named_parameters(remove_duplicate=False)),
            **dict(built.named_buffers(remove_duplicate=False)),
        }
        # Before any native code runs: a manifest that disagrees with the blueprint (an unsigned row's, or one
        # whose blueprint changed) is Urza's content, so the kernel trains eager rather than raise at binding.
        problem = manifest_problem(m, built)
        if problem is not None:
            raise Unusable(telemetry.FORMAT, f"training entry #{entry.id}'s manifest {problem}")
        params = [tensors[s.name].detach() for s in m.params]
        buffers = [tensors[s.name].detach().clone() for s in m.buffers]
        try:
            with torch.no_grad():
                outputs, saved, shape = artifact.forward(args, params, buffers)
                artifact.backward(shape, saved, [torch.zeros_like(o) for o in outputs])
        except Exception as e:
            raise Unusable(telemetry.LOAD_FAILED, f"pre-warm of training entry #{entry.id} failed: {e}") from e

    def kernel(self, result: LoadResult) -> TrainingKernel:
        # What loaded serves, whatever other rows were refused on the way (they have their WARNING). The whole
        # range's route serves every call its specializations (routed first, exact sizes) do not hold.
        program = None
        whole = next((x for x in result.loaded if not is_specialization(x.entry.profile)), None)
        if whole is None and result.loaded:
            whole = result.loaded[0]  # one entry asked for by id, or only specializations certified
        if whole is None:
            entry = result.chosen[0] if result.chosen else None
            reason = result.problems[0].detail if result.problems else "no training entry loaded"
        elif whole.artifact is None:
            entry = whole.entry
            note = EntryMeta.from_entry(entry).training_reason or "measured faster than the compiled step"
            reason = f"certified to train eager (entry #{entry.id}): {note}"
        else:
            entry = whole.entry
            program = whole.artifact
            reason = f"training entry #{entry.id} ({entry.status})"
        special = [
            (x.artifact, x.entry) for x in result.loaded if x is not whole and isinstance(x.artifact, TrainingProgram)
        ]
        first = program or (special[0][0] if special else None)
        special = [(p, e) for p, e in special if first is None or same_weights(p.manifest, first.manifest)]
        if program is None and special:
            held = ", ".join(e.profile for _, e in special)
            reason = f"{reason}; compiled at the exact sizes of {held}"
        return TrainingKernel.create(
            result.name,
            program=program,
            entry=entry,
            reason=reason,
            build=self._build,
            inference=self._inference,
            weights=self._weights,
            specializations=special,
        )
