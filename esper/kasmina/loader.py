"""Kasmina: loads certified artifacts from Urza into kernels, without compiling anything.

Everything Kasmina loads is native code, so the order is fixed, for every artifact kind: choose the entries
built for this process's compatibility key, verify each artifact's signature (when a public key is set),
size and sha256 against the row, only then load it, pre-warm it once, and build the kernel. Any step that
fails yields an eager kernel and a WARNING naming the reason; nothing in Urza makes ``load*`` raise. What
differs per kind (inference, training) lives in :mod:`esper.kasmina.kinds`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from esper.artifacts import compat
from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.validate import EntryFormatError
from esper.artifacts.weights import load_state
from esper.catalog import Catalog, UnknownBlueprintError, load_catalog
from esper.kasmina import telemetry
from esper.kasmina.base import COMPILED, KernelBase
from esper.kasmina.choose import choose_entries, choose_entry_id, choose_seed_entries, choose_training_entry
from esper.kasmina.kernel import Kernel
from esper.kasmina.kinds import ArtifactLoader, InferenceLoader, Loaded, LoadResult, TrainingLoader
from esper.kasmina.seeds import Weights
from esper.kasmina.training_kernel import TrainingKernel
from esper.kasmina.unusable import Unusable, removed_profiles
from esper.provenance import stale_reason
from esper.settings import resolve
from esper.urza import ArtifactError, ArtifactStore, Entry, EntryEngine, EntryStatus, Urza, UrzaError
from esper.urza.evidence import Meta
from esper.urza.schema import EntryMeta

if TYPE_CHECKING:
    from esper.artifacts.signing import Verifier
    from esper.blueprint import Blueprint

__all__ = ["Kasmina", "KernelSource", "Unusable", "choose_entries"]

K = TypeVar("K", bound=KernelBase)


def _verifier(public_key: str | Path | bytes | Verifier | None) -> tuple[Verifier | None, str | None]:
    """The signature verifier for ``public_key`` (a key file, PEM bytes of a public key, or a verifier; else
    ``$ESPER_PUBLIC_KEY``), or why the key is unusable.

    A bad key does not raise: the training run goes on, eager, with a WARNING naming the key problem. A key
    that is set but empty is such a problem, never "verification off" (a typo must not disable signing).
    """
    if public_key is None and "ESPER_PUBLIC_KEY" not in os.environ:  # esper.artifacts.signing.PUBLIC_KEY_ENV
        return None, None  # signing not configured: cryptography is not even imported
    from esper.artifacts.signing import SigningError, Verifier, key_id, verifier_for

    if isinstance(public_key, bytes):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(public_key)
        except (ValueError, TypeError) as e:
            return None, f"the public key given as bytes is not a PEM public key: {e}"
        if not isinstance(key, Ed25519PublicKey):
            return None, f"the public key given as bytes is a {type(key).__name__}, not an Ed25519 public key"
        return Verifier(key, key_id(key)), None
    try:
        return verifier_for(public_key), None
    except SigningError as e:
        return None, str(e)


def _key_material(verifier: Verifier) -> bytes:
    """A verifier's public key as PEM bytes: what a pickled :class:`Kasmina` carries for a key it was handed
    without a file (a key object itself cannot be pickled)."""
    from cryptography.hazmat.primitives import serialization

    return verifier.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _min_snapshot(value: int | str | None) -> tuple[int | None, str | None]:
    """The minimum snapshot version (else ``$ESPER_MIN_SNAPSHOT``), or why it is unusable: an unusable one
    refuses everything rather than turning the check off."""
    env = os.environ.get("ESPER_MIN_SNAPSHOT")  # esper.urza.snapshot.MIN_SNAPSHOT_ENV
    if value is None and env is None:
        return None, None
    from esper.urza.snapshot import SnapshotError, min_version_from

    try:
        return min_version_from(value if value is not None else env), None
    except SnapshotError as e:
        return None, str(e)


def _one_per_code(problems: list[Unusable]) -> list[Unusable]:
    """One problem per reason code (details joined): ten unsigned rows are one WARNING, not ten."""
    by_code: dict[str, list[str]] = {}
    for u in problems:
        by_code.setdefault(u.code, []).append(u.detail)
    return [Unusable(code, "; ".join(dict.fromkeys(details))) for code, details in by_code.items()]


def _still_runs(loaded: Sequence[Loaded], refused: Sequence[Unusable]) -> str:
    """What a kernel serves despite refused rows: its compiled and certified-eager entries, and the profiles
    the refusals took away (those run eager)."""
    compiled = [x.entry for x in loaded if x.artifact is not None]
    eager = [x.entry for x in loaded if x.artifact is None]
    parts = []
    if compiled:
        parts.append("runs compiled: " + ", ".join(f"entry #{e.id} (profile {e.profile})" for e in compiled))
    if eager:
        parts.append("certified eager: " + ", ".join(f"entry #{e.id} (profile {e.profile})" for e in eager))
    lost = sorted({u.profile for u in removed_profiles(refused, (x.entry.profile for x in loaded)) if u.profile})
    if lost:
        parts.append("eager for lack of a usable row: profile " + ", ".join(repr(p) for p in lost))
    return "; ".join(parts)


def _served_profile(status: str, profile: str | None) -> str | None:
    """The shape profile a refused row would have served: a certified row's (the others serve none)."""
    return profile if status == EntryStatus.CERTIFIED else None


class LoadMethod(StrEnum):
    """Which of :class:`Kasmina`'s load methods built a kernel."""

    LOAD = "load"
    LOAD_SEEDS = "load_seeds"
    LOAD_ENTRY = "load_entry"
    LOAD_TRAINING = "load_training"


@dataclass(frozen=True)
class KernelSource:
    """How to load a kernel again: ``source()`` runs the same load method of ``kasmina`` with the same
    blueprint and entry id, through the whole load path (choose, verify, load). Picklable: ``kasmina``
    pickles as its constructor arguments. A seed's weights are not part of it (the kernels carry those)."""

    kasmina: Kasmina
    method: LoadMethod
    name: str
    entry_id: int | None = None

    def __call__(self) -> KernelBase:
        k = self.kasmina
        if self.method is LoadMethod.LOAD_TRAINING:
            return k.load_training(self.name, entry_id=self.entry_id)
        if self.method is LoadMethod.LOAD_ENTRY and self.entry_id is not None:
            return k.load_entry(self.name, self.entry_id)
        if self.method is LoadMethod.LOAD_SEEDS:
            return k.load_seeds(self.name)
        return k.load(self.name)


def built(bp: Blueprint, device: torch.device) -> torch.nn.Module:
    """``bp``'s module on ``device``, built outside any functorch transform of the calling thread.

    Kasmina builds an eager module on the first call that needs it, which may come inside ``torch.func.vmap``
    or ``grad``: vmap refuses a builder's random initialisation, and grad would make the weights its own
    tensors. A build is the blueprint's, not the transform's."""
    # torch has no public form of this guard; it is what torch.func's own internals use to step outside.
    with torch._C._DisableFuncTorch():
        return bp.build().to(device)


class Kasmina:
    """The runtime loader. ``Kasmina(urza_path).load(name)`` returns a :class:`Kernel`.

    ``urza`` defaults to the resolved setting (``ESPER_URZA`` or ``.esper/urza.db``). The catalog (for
    rebuilding the eager module) is read from ``blueprint_paths`` (default: the project's setting), only
    when an eager module is first needed. ``public_key`` (default ``$ESPER_PUBLIC_KEY``; a key file, a
    public key's PEM bytes, or a :class:`~esper.artifacts.signing.Verifier`): when set, only entries signed by the
    matching private key are loaded (see docs/security.md). A Kasmina pickles as its constructor arguments.
    """

    def __init__(
        self,
        urza: str | Path | None = None,
        *,
        blueprint_paths: Iterable[str | Path] | None = None,
        catalog: Catalog | None = None,
        device: str | torch.device = "cpu",
        public_key: str | Path | bytes | Verifier | None = None,
        min_snapshot_version: int | str | None = None,
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
        self.min_snapshot_version, self._min_snapshot_error = _min_snapshot(min_snapshot_version)
        # What a copy is built from when the resolved value is unusable: the same value, so it refuses too.
        self._public_key_given = public_key if isinstance(public_key, str | Path | bytes) else None
        self._min_snapshot_given = (
            min_snapshot_version if min_snapshot_version is not None else os.environ.get("ESPER_MIN_SNAPSHOT")
        )

    def __reduce__(self) -> tuple[Callable[[], Kasmina], tuple[()]]:
        """A Kasmina pickles as its constructor arguments, resolved (settings and environment variables read
        once, here, so a copy in another process loads from the same Urza under the same key); the catalog is
        read again from its folders when a copy first needs it."""
        if self.verifier is not None:
            public_key: str | Path | bytes | None = (
                self.verifier.path if self.verifier.path is not None else _key_material(self.verifier)
            )
        else:
            public_key = self._public_key_given if self._public_key_error is not None else None
        min_snapshot = self.min_snapshot_version if self._min_snapshot_error is None else self._min_snapshot_given
        rebuild = partial(
            type(self),
            self.urza_path,
            blueprint_paths=self._folders(),
            device=str(self.device),
            public_key=public_key,
            min_snapshot_version=min_snapshot,
        )
        return rebuild, ()

    def _folders(self) -> list[Path]:
        """The folders the catalog is read from: the given ones, else those of a given catalog's files."""
        if self._blueprint_paths or self._catalog is None:
            return list(self._blueprint_paths)
        sources = (bp.source for bp in self._catalog.blueprints.values() if bp.source is not None)
        return list(dict.fromkeys(Path(src).parent for src in sources))

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog(self._blueprint_paths, strict=False)
        return self._catalog

    def load(self, name: str) -> Kernel:
        """A kernel for blueprint ``name``: its certified routes for this process, else eager."""
        return self._run(name, self._inference(choose_entries), KernelSource(self, LoadMethod.LOAD, name))

    def load_entry(self, name: str, entry_id: int) -> Kernel:
        """A kernel for one specific compiled entry of ``name``, whatever its status (certification tests an
        entry before it is certified, through exactly the path :meth:`load` uses). Compatibility applies."""
        choose = partial(choose_entry_id, entry_id=entry_id, kind=ArtifactKind.INFERENCE)
        return self._run(name, self._inference(choose), KernelSource(self, LoadMethod.LOAD_ENTRY, name, entry_id))

    def load_seeds(self, name: str) -> Kernel:
        """Like :meth:`load`, for binding seeds (``.bind(weights)``): where a profile's certified winner folds
        the weights into its code, the newest swappable candidate that passed every check routes instead; where
        a profile's cells are shared between certified entries, its swappable ones route, each compiled in the
        cells it won on its own (see :func:`~esper.kasmina.choose.choose_seed_entries`)."""
        loader = self._inference(choose_seed_entries, own_tables=True)
        return self._run(name, loader, KernelSource(self, LoadMethod.LOAD_SEEDS, name))

    def load_training(
        self, name: str, weights: Weights | None = None, *, entry_id: int | None = None
    ) -> TrainingKernel:
        """A training kernel for a seed of ``name`` holding ``weights`` (the seed's module, or a state dict;
        the builder's weights when ``None``): compiled forward and backward when Urza holds a certified
        training artifact for this process, else eager with a WARNING (none when certification chose eager
        by measurement). ``entry_id`` loads that artifact whatever its status (certification tests an
        artifact through this very path before certifying it). See :mod:`esper.kasmina.training_kernel`.

        A ``weights`` that does not match the blueprint's weight schema raises
        :class:`~esper.artifacts.tensors.WeightSchemaError` naming the tensor: that is the caller's input.
        """
        choose = (
            choose_training_entry
            if entry_id is None
            else partial(choose_entry_id, entry_id=entry_id, kind=ArtifactKind.TRAINING)
        )

        def build() -> torch.nn.Module:
            return built(self.catalog.get(name), self.device)

        loader = TrainingLoader(
            choose, self.device, build=build, inference=partial(self.load_seeds, name), weights=weights
        )
        return self._run(name, loader, KernelSource(self, LoadMethod.LOAD_TRAINING, name, entry_id))

    def _inference(
        self, choose: Callable[[Sequence[Entry], compat.CompatKey], list[Entry]], *, own_tables: bool = False
    ) -> InferenceLoader:
        return InferenceLoader(choose, self.device, eager_module=self._eager_module, own_tables=own_tables)

    def _run(self, name: str, kind: ArtifactLoader[K], source: KernelSource) -> K:
        """The one load path: choose, verify, load, pre-warm, build the kernel (see the module docstring).
        ``source`` loads the same kernel again (``kernel.source``: copies and pickles are built from it)."""
        started = time.perf_counter()
        entries: list[Entry] = []
        chosen: list[Entry] = []
        # Per chosen entry: its verified artifact, None (an eager route), or what loads it on first use.
        verified: list[tuple[Entry, Path | Callable[[], object] | None]] = []
        problems: list[Unusable] = []
        try:
            urza = self._open()
            try:
                self._check_snapshot(urza)
                entries = self._trusted(self._entries(urza, name, problems), problems)
                try:
                    chosen = self._choose(kind, entries)
                except Unusable:
                    if not problems:
                        raise
                    chosen = []  # the refused rows already say why nothing is left: one WARNING, not two
                later = kind.deferred_ids(chosen)
                for entry in chosen:
                    try:
                        if entry.id in later:  # checked now; hashed, loaded and pre-warmed on first use
                            self._checked(urza, entry, kind, verify=False)
                            verified.append((entry, partial(self._load_later, urza.store, kind, entry)))
                        else:
                            verified.append((entry, self._checked(urza, entry, kind)))
                    except Unusable as u:
                        problems.append(u)
            finally:
                urza.close()
        except Unusable as u:
            problems.append(u)
        except (OSError, sqlite3.Error, UrzaError) as e:  # whatever reading Urza raises: eager, never a crash
            problems.append(Unusable(telemetry.URZA_UNAVAILABLE, f"reading Urza failed: {type(e).__name__}: {e}"))
        loaded = []
        for entry, path in verified:
            try:
                if callable(path):
                    loaded.append(Loaded(entry, kind.defer(entry, path)))
                    continue
                loaded.append(Loaded(entry, None if path is None else self._ready(kind, entry, path)))
            except Unusable as u:
                problems.append(u)
        # Refused rows are reported as refusals while something certified still serves: they did not make
        # the kernel eager. When nothing serves, every problem is a reason it runs eager.
        refused = [p for p in problems if p.row_refused] if loaded else []
        for problem in _one_per_code(refused):
            telemetry.refused(name, problem.code, problem.detail, _still_runs(loaded, refused))
        for problem in _one_per_code([p for p in problems if p not in refused]):
            telemetry.fallback(name, problem.code, problem.detail)
        for x in loaded:
            if x.artifact is None:
                telemetry.eager_by_evidence(name, kind.evidence_label(x.entry), x.entry.id, _decision_note(x.entry))
        kernel = kind.kernel(LoadResult(name, entries, chosen, loaded, problems))
        kernel.source = source
        if kernel.route == COMPILED:
            telemetry.loaded(name, [x.entry.id for x in loaded], time.perf_counter() - started)
        return kernel

    def _trusted(self, entries: list[Entry], problems: list[Unusable]) -> list[Entry]:
        """The rows that may be used at all: signed by the configured key (every row kind: an eager row
        changes what runs as much as a compiled one) and whose ``meta`` parses into validated values. Rows
        are data: the refused ones are never read again, and each refusal is a problem on the record."""
        if self._public_key_error is not None:
            raise Unusable(telemetry.SIGNATURE, f"public key unusable: {self._public_key_error}; refusing every row")
        trusted = []
        for entry in entries:
            refusal = partial(Unusable, entry_id=entry.id, profile=_served_profile(entry.status, entry.profile))
            try:
                self._check_signature(entry)
                EntryMeta.from_entry(entry)
            except Unusable as u:
                problems.append(refusal(u.code, u.detail))
                continue
            except EntryFormatError as e:
                problems.append(refusal(telemetry.FORMAT, f"entry #{entry.id}: {e}"))
                continue
            trusted.append(entry)
        return trusted

    def _check_snapshot(self, urza: Urza) -> None:
        """With a minimum snapshot version, refuse a snapshot older than it (or whose version cannot be trusted)."""
        if self._min_snapshot_error is not None:
            raise Unusable(telemetry.ROLLBACK, f"{self._min_snapshot_error}; refusing every row")
        if self.min_snapshot_version is None:
            return
        from esper.urza.snapshot import check

        try:
            check(urza, self.verifier, self.min_snapshot_version)
        except Exception as e:  # SnapshotError, or anything a damaged snapshot provokes: eager, never a crash
            raise Unusable(telemetry.ROLLBACK, str(e)) from e

    def _choose(self, kind: ArtifactLoader[K], entries: list[Entry]) -> list[Entry]:
        # Choosing reads only validated rows; anything else it raises is still no reason to crash a run.
        try:
            return kind.choose(entries, self.key)
        except Unusable:
            raise
        except Exception as e:
            raise Unusable(telemetry.FORMAT, f"cannot choose an entry: {type(e).__name__}: {e}") from e

    def _check_stale(self, entry: Entry) -> None:
        """Refuse an entry compiled from other source than the blueprint's declaration now: serving it inside
        the guards and the new eager code outside them would mix two versions of one blueprint."""
        try:
            bp = self.catalog.get(entry.blueprint)
        except UnknownBlueprintError:
            return  # no declaration to compare with (and none to run eager): the certified entry stands
        reason = stale_reason(bp, EntryMeta.from_entry(entry).source_digest)
        if reason is not None:
            raise Unusable(telemetry.STALE, f"entry #{entry.id}: {reason}")

    def _checked(
        self, urza: Urza, entry: Entry, kind: ArtifactLoader[KernelBase], *, verify: bool = True
    ) -> Path | None:
        """The entry's verified artifact (``None`` for an eager route, or with ``verify`` off), once it has
        the guards it needs."""
        if entry.guards is None and (entry.engine == EntryEngine.AOTI or kind.guarded_eager):
            raise Unusable(telemetry.INTEGRITY, f"{kind.noun} #{entry.id} has no guard schema")
        self._check_stale(entry)
        return self._verified(urza.store, entry) if entry.engine == EntryEngine.AOTI and verify else None

    def _load_later(self, store: ArtifactStore, kind: ArtifactLoader[KernelBase], entry: Entry) -> object:
        """A deferred entry's remaining steps on its first call, in the load path's order: signature and
        sha256 (before anything native loads), load, pre-warm. Raises :class:`Unusable`."""
        return self._ready(kind, entry, self._verified(store, entry))

    @staticmethod
    def _ready(kind: ArtifactLoader[KernelBase], entry: Entry, path: Path) -> object:
        try:
            artifact = kind.open(path, entry)
            kind.prewarm(artifact, entry)
        except Unusable:
            raise
        except Exception as e:  # a verified artifact that still cannot run: eager, never a crash
            raise Unusable(telemetry.LOAD_FAILED, f"{kind.noun} #{entry.id}: {type(e).__name__}: {e}") from e
        return artifact

    def _open(self) -> Urza:
        try:
            return Urza(self.urza_path, readonly=True)
        except UrzaError as e:
            raise Unusable(telemetry.URZA_UNAVAILABLE, str(e)) from e

    @staticmethod
    def _entries(urza: Urza, name: str, problems: list[Unusable]) -> list[Entry]:
        """The blueprint's entries, newest first. A row Urza cannot parse is a problem on the record, not a
        crash, and does not hide the blueprint's other rows."""
        try:
            rows = urza.stored_rows(name, newest_first=True)
        except (UrzaError, sqlite3.Error) as e:
            raise Unusable(telemetry.URZA_UNAVAILABLE, str(e)) from e
        for row in rows:
            if row.entry is None:
                problems.append(
                    Unusable(
                        telemetry.FORMAT,
                        f"entry #{row.id} is unreadable: {row.problem}",
                        entry_id=row.id,
                        profile=_served_profile(row.status, row.profile),
                    )
                )
        return [row.entry for row in rows if row.entry is not None]

    def _verified(self, store: ArtifactStore, entry: Entry) -> Path:
        """The entry's artifact, once its signature (when a public key is configured) and its sha256 check."""
        self._check_signature(entry)
        try:
            return store.verify(entry.checksum, entry.artifact_size)
        except (ArtifactError, OSError) as e:
            raise Unusable(telemetry.INTEGRITY, f"entry #{entry.id}: {e}") from e

    def _check_signature(self, entry: Entry) -> None:
        """With a public key, refuse an entry that is unsigned, signed by another key, or altered since."""
        if self._public_key_error is not None:
            raise Unusable(telemetry.SIGNATURE, f"public key unusable: {self._public_key_error}")
        if self.verifier is None:
            return
        from esper.artifacts.signing import SignatureError

        try:
            self.verifier.verify(entry)
        except SignatureError as e:
            raise Unusable(telemetry.SIGNATURE, f"entry #{entry.id}: {e}") from e

    @staticmethod
    def _same_source(bp: Blueprint, entry: Entry) -> bool:
        """Whether ``entry`` was stored from ``bp``'s source as it is now (not stale)."""
        try:
            return stale_reason(bp, EntryMeta.from_entry(entry).source_digest) is None
        except EntryFormatError:
            return False

    def _eager_module(self, name: str, weights: Entry | None) -> torch.nn.Module:
        """The builder's module; with a fallback entry's stored weights when they were stored by the same
        blueprint: its version and its source (the digest the stale check compares). A blueprint whose builder
        changed runs its new code with its new weights, as its training kernel and its certification do.

        Stored weights are read only after the store vouches for them; if it cannot, the builder's own
        (seeded, so identical for an unchanged blueprint) weights stay.
        """
        bp = self.catalog.get(name)
        module = built(bp, self.device).eval()
        if weights is not None and weights.blueprint_version == bp.version and self._same_source(bp, weights):
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


# The log line keeps at most this much of a decision note (row text: a damaged row must not flood the log).
_NOTE_CHARS = 600


def _decision_note(entry: Entry) -> str | None:
    """The note certification recorded with an eager route's decision (row text, logged, never acted on)."""
    record = Meta.from_json(entry.meta).certification
    note = record.decision.note if record is not None and record.decision is not None else None
    return note[:_NOTE_CHARS] if note else None
