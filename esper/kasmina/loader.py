"""Kasmina: loads certified artifacts from Urza into kernels, without compiling anything.

Everything Kasmina loads is native code, so the order is fixed: choose a certified entry built for this
process's compatibility key, verify the artifact's size and sha256 against the row, only then load it, and
pre-warm it once. Any step that fails yields an eager kernel and a WARNING naming the reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from esper import compat
from esper.catalog import Catalog, load_catalog
from esper.kasmina import telemetry
from esper.kasmina.kernel import Kernel, Route
from esper.kasmina.runtime import CompiledPackage, PackageLoadError
from esper.kasmina.training_artifact import is_training_entry
from esper.settings import resolve
from esper.urza import ArtifactError, Entry, Urza, UrzaError
from esper.weights import load_state

if TYPE_CHECKING:
    from esper.kasmina.seeds import Weights
    from esper.kasmina.training import TrainingKernel
    from esper.signing import Verifier


class Unusable(Exception):
    """Why the compiled path cannot be used: a telemetry reason code and a detail."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def choose_entries(entries: Sequence[Entry], key: compat.CompatKey) -> list[Entry]:
    """The certified entries to route between: for each shape profile of the newest certified entry built
    for ``key``, the newest certified entry of that profile and blueprint version. :class:`Unusable` says why
    there are none. ``entries`` are one blueprint's, newest first.
    """
    # Training artifacts (esper.kasmina.training) are no inference route.
    entries = [e for e in entries if not is_training_entry(e)]
    certified = [e for e in entries if e.status == "certified"]
    if not certified:
        if not entries:
            raise Unusable(telemetry.NO_CERTIFIED_ENTRY, "Urza has no entry for it")
        latest = entries[0]
        why = f": {latest.failure_reason}" if latest.failure_reason else ""
        raise Unusable(
            telemetry.NO_CERTIFIED_ENTRY, f"no certified entry (newest is #{latest.id}, {latest.status}{why})"
        )
    usable = [e for e in certified if key.mismatch(e.compat) is None]
    if not usable:
        newest = certified[0]
        raise Unusable(
            telemetry.INCOMPATIBLE, f"certified entry #{newest.id} is incompatible: {key.mismatch(newest.compat)}"
        )
    newest = usable[0]
    chosen = []
    # Profiles of an older declaration (other buckets) may overlap the current ones: route only the set that
    # the newest certified entry was compiled for.
    for profile in newest.meta.get("profiles") or [newest.profile]:
        match = next(
            (e for e in usable if e.profile == profile and e.blueprint_version == newest.blueprint_version), None
        )
        if match is not None:
            chosen.append(match)
    return chosen


def _verifier(public_key: str | Path | Verifier | None) -> tuple[Verifier | None, str | None]:
    """The signature verifier for ``public_key`` (else ``$ESPER_PUBLIC_KEY``), or why the key is unusable.

    A bad key does not raise: the training run goes on, eager, with a WARNING naming the key problem.
    """
    if public_key is None and not os.environ.get("ESPER_PUBLIC_KEY"):  # esper.signing.PUBLIC_KEY_ENV
        return None, None  # signing not configured: cryptography is not even imported
    from esper.signing import SigningError, verifier_for

    try:
        return verifier_for(public_key), None
    except SigningError as e:
        return None, str(e)


class Kasmina:
    """The runtime loader. ``Kasmina(urza_path).load(name)`` returns a :class:`Kernel`.

    ``urza`` defaults to the resolved setting (``ESPER_URZA`` or ``.esper/urza.db``). The catalog (for
    rebuilding the eager module) is read from ``blueprint_paths`` (default: the project's setting), only
    when an eager module is first needed. ``public_key`` (default ``$ESPER_PUBLIC_KEY``): when set, only
    entries signed by the matching private key are loaded (see docs/security.md).
    """

    def __init__(
        self,
        urza: str | Path | None = None,
        *,
        blueprint_paths: Iterable[str | Path] | None = None,
        catalog: Catalog | None = None,
        device: str | torch.device = "cpu",
        public_key: str | Path | Verifier | None = None,
    ):
        settings = None
        if urza is None or (blueprint_paths is None and catalog is None):
            settings = resolve(urza=urza)
        self.urza_path = Path(urza) if urza is not None else settings.urza  # type: ignore[union-attr]
        self._blueprint_paths = (
            [Path(p) for p in blueprint_paths]
            if blueprint_paths is not None
            else list(settings.blueprint_paths)
            if settings is not None
            else []
        )
        self._catalog = catalog
        self.device = torch.device(device)
        self.key = compat.current(self.device)
        self.verifier, self._public_key_error = _verifier(public_key)

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog(self._blueprint_paths, strict=False)
        return self._catalog

    def load(self, name: str) -> Kernel:
        """A kernel for blueprint ``name``: its certified routes for this process, else eager."""
        return self._load(name, lambda entries: choose_entries(entries, self.key))

    def load_entry(self, name: str, entry_id: int) -> Kernel:
        """A kernel for one specific compiled entry of ``name``, whatever its status (certification tests an
        entry before it is certified, through exactly the path :meth:`load` uses). Compatibility applies."""

        def pick(entries: list[Entry]) -> list[Entry]:
            entry = next((e for e in entries if e.id == entry_id), None)
            if entry is None or entry.kind != "aoti" or is_training_entry(entry):
                raise Unusable(telemetry.NO_CERTIFIED_ENTRY, f"entry #{entry_id} is not a compiled entry of {name!r}")
            mismatch = self.key.mismatch(entry.compat)
            if mismatch:
                raise Unusable(telemetry.INCOMPATIBLE, f"entry #{entry_id} is incompatible: {mismatch}")
            return [entry]

        return self._load(name, pick)

    def load_seeds(self, name: str) -> Kernel:
        """Like :meth:`load`, for binding seeds (``.bind(weights)``): where a profile's certified winner folds
        the weights into its code, the newest swappable candidate that passed every check routes instead."""
        from esper.kasmina.seeds import choose_seed_entries

        return self._load(name, lambda entries: choose_seed_entries(entries, self.key))

    def load_training(self, name: str, weights: Weights | None = None) -> TrainingKernel:
        """A training kernel for a seed of ``name`` holding ``weights`` (the seed's module, or a state dict;
        the builder's weights when ``None``): compiled forward and backward when Urza holds a certified
        training artifact for this process, else eager with a WARNING. See :mod:`esper.kasmina.training`."""
        from esper.kasmina.training import load_training

        return load_training(self, name, weights)

    def _load(self, name: str, pick: Callable[[list[Entry]], list[Entry]]) -> Kernel:
        started = time.perf_counter()
        entries: list[Entry] = []
        routes: list[Route] = []
        problems: list[Unusable] = []
        try:
            urza = self._open()
            try:
                entries = urza.entries(name)
                chosen = pick(entries)
                verified = []
                for entry in chosen:
                    try:
                        verified.append((entry, self._verified(urza, entry) if entry.kind == "aoti" else None))
                    except Unusable as u:
                        problems.append(u)
            finally:
                urza.close()
            for entry, path in verified:
                try:
                    routes.append(self._route(entry, path))
                except Unusable as u:
                    problems.append(u)
        except Unusable as u:
            problems.append(u)
        weights = next((e for e in entries if e.kind == "eager"), None)
        kernel_args = {"eager_factory": lambda: self._eager_module(name, weights), "routes": routes}
        for u in problems:
            telemetry.fallback(name, u.code, u.detail)
        for r in routes:
            if r.package is None:
                telemetry.eager_by_evidence(name, r.entry.profile, r.entry.id)
        if not any(r.package is not None for r in routes):
            reason = problems[0].detail if problems else "certification measured eager as fastest"
            return Kernel(name, reason=reason, **kernel_args)
        telemetry.loaded(name, [r.entry.id for r in routes], time.perf_counter() - started)
        ids = ", ".join(f"#{r.entry.id}" for r in routes)
        return Kernel(name, reason=f"certified entries {ids}", **kernel_args)

    def _route(self, entry: Entry, path: Path | None) -> Route:
        if entry.guards is None:
            raise Unusable(telemetry.INTEGRITY, f"entry #{entry.id} has no guard schema")
        if path is None:
            return Route.of(entry, None)
        package = self._load_package(path)
        self._prewarm(package, entry)
        return Route.of(entry, package)

    def _open(self) -> Urza:
        try:
            return Urza(self.urza_path, readonly=True)
        except UrzaError as e:
            raise Unusable(telemetry.URZA_UNAVAILABLE, str(e)) from e

    def _verified(self, urza: Urza, entry: Entry) -> Path:
        """The entry's artifact, once its signature (when a public key is configured) and its sha256 check."""
        self._check_signature(entry)
        try:
            return urza.store.verify(entry.checksum, entry.artifact_size)
        except ArtifactError as e:
            raise Unusable(telemetry.INTEGRITY, f"entry #{entry.id}: {e}") from e

    def _check_signature(self, entry: Entry) -> None:
        """With a public key, refuse an entry that is unsigned, signed by another key, or altered since."""
        if self._public_key_error is not None:
            raise Unusable(telemetry.SIGNATURE, f"public key unusable: {self._public_key_error}")
        if self.verifier is None:
            return
        from esper.signing import SignatureError

        try:
            self.verifier.verify(entry)
        except SignatureError as e:
            raise Unusable(telemetry.SIGNATURE, f"entry #{entry.id}: {e}") from e

    def _load_package(self, path: Path) -> CompiledPackage:
        index = -1 if self.device.type == "cpu" else (self.device.index or 0)
        try:
            return CompiledPackage(path, device_index=index)
        except PackageLoadError as e:
            raise Unusable(telemetry.LOAD_FAILED, str(e)) from e

    def _prewarm(self, package: CompiledPackage, entry: Entry) -> None:
        assert entry.guards is not None
        reps = entry.meta.get("representative") or [{n: lo for n, (lo, _) in entry.guards.dim_ranges().items()}]
        shapes = entry.guards.shapes(reps[0])
        args = [
            torch.zeros(s, dtype=getattr(torch, g.dtype), device=self.device)
            for s, g in zip(shapes, entry.guards.inputs, strict=True)
        ]
        try:
            package(args)
        except Exception as e:
            raise Unusable(telemetry.LOAD_FAILED, f"pre-warm of entry #{entry.id} failed: {e}") from e

    def _eager_module(self, name: str, weights: Entry | None) -> torch.nn.Module:
        """The builder's module; with a fallback entry's stored weights when it is the same blueprint version.

        Stored weights are read only after the store vouches for them; if it cannot, the builder's own
        (seeded, so identical for an unchanged blueprint) weights stay.
        """
        bp = self.catalog.get(name)
        module = bp.build().to(self.device).eval()
        if weights is not None and weights.blueprint_version == bp.version:
            try:
                self._check_signature(weights)
                with Urza(self.urza_path, readonly=True) as urza:
                    state = load_state(urza.store.verify(weights.checksum, weights.artifact_size))
                module.load_state_dict(state)
            except Exception as e:  # a damaged, unsigned or foreign weights file must not stop a training run
                telemetry.fallback(
                    name,
                    telemetry.INTEGRITY,
                    f"stored weights of entry #{weights.id} unusable ({e}); using the builder's weights",
                )
        return module
