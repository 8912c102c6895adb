"""Choosing which Urza entries a kernel routes to: pure functions of one blueprint's entries (newest first)
and this process's compatibility key, for every artifact kind.

Each raises :class:`~esper.kasmina.unusable.Unusable` with the reason code and the reason there is nothing
to route to; the loader turns that into an eager kernel. Nothing here reads files or loads code.
"""

from __future__ import annotations

from collections.abc import Sequence

from esper.artifacts.compat import CompatKey
from esper.artifacts.kinds import ArtifactKind, spec
from esper.kasmina import telemetry
from esper.kasmina.unusable import Unusable
from esper.profiles import is_specialization
from esper.urza import Entry, EntryEngine, EntryStatus
from esper.urza.evidence import route_group

# The reason code when a kind has no usable entry.
MISSING = {ArtifactKind.INFERENCE: telemetry.NO_CERTIFIED_ENTRY, ArtifactKind.TRAINING: telemetry.NO_TRAINING_ARTIFACT}


def of_kind(entries: Sequence[Entry], kind: ArtifactKind) -> list[Entry]:
    """The entries whose artifact is of ``kind`` (Urza's ``artifact`` column; never inferred from the variant)."""
    return [e for e in entries if e.artifact == kind]


def choose_entries(entries: Sequence[Entry], key: CompatKey) -> list[Entry]:
    """The certified inference entries to route between: for each shape profile of the newest certified
    entry built for ``key``, the newest certified entry of that profile and blueprint version.
    :class:`Unusable` says why there are none. ``entries`` are one blueprint's, newest first.

    Specializations (exact-size profiles, see :mod:`esper.profiles`) come first: they overlap their profile's
    route, and a kernel dispatches to the first route whose guards accept a call, so exactly their sizes reach
    them and every other size of the range the profile's own route.
    """
    entries = of_kind(entries, ArtifactKind.INFERENCE)
    certified = [e for e in entries if e.status == EntryStatus.CERTIFIED]
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
    return profile_routes(usable, usable[0])


def profile_routes(usable: Sequence[Entry], newest: Entry) -> list[Entry]:
    """For each shape profile ``newest`` was compiled for, the newest of ``usable`` of that profile and
    blueprint version, with the entries it shares the profile's cells with (its ``route_group``, in its order:
    each is compiled in its own cells); specializations first (see :func:`choose_entries`)."""
    chosen = []
    # Profiles of an older declaration (other buckets) may overlap the current ones: route only the set that
    # the newest certified entry was compiled for.
    for profile in newest.meta.get("profiles") or [newest.profile]:
        match = next(
            (e for e in usable if e.profile == profile and e.blueprint_version == newest.blueprint_version), None
        )
        if match is not None:
            chosen += shared_with(usable, match)
    return sorted(chosen, key=lambda e: not is_specialization(e.profile))


def shared_with(usable: Sequence[Entry], entry: Entry) -> list[Entry]:
    """``entry`` and the entries of ``usable`` it shares its profile's cells with, in its ``route_group``'s
    order. A member missing from ``usable`` (not certified, incompatible, refused) is left out: the cells routed
    to it run eager, as each member's table is compiled only in its own cells."""
    group = route_group(entry.meta)
    if entry.id not in group:
        return [entry]
    members = {
        e.id: e
        for e in usable
        if e.id in group and e.profile == entry.profile and e.blueprint_version == entry.blueprint_version
    }
    members[entry.id] = entry
    return [members[i] for i in group if i in members]


def choose_seed_entries(entries: Sequence[Entry], key: CompatKey) -> list[Entry]:
    """The inference routes for seeds: :func:`choose_entries`, except that where a profile's winner folds the
    weights into its code (``meta["swappable"]`` false, e.g. the ``freezing`` variant), the newest swappable
    candidate of that profile that passed every check and lost only the selection routes instead. Where a
    profile's cells are shared between entries, those that fold the weights are left out, and the others serve
    seeds (each where it won on its own: the loader routes seeds by
    :func:`~esper.urza.evidence.own_route_table`); only when none is left does the profile fall back as above."""
    inference = of_kind(entries, ArtifactKind.INFERENCE)
    routes = choose_entries(inference, key)
    folded = {e.id for e in routes if e.engine == EntryEngine.AOTI and not e.meta.get("swappable", True)}
    chosen = []
    for e in routes:
        share = [r for r in routes if r.profile == e.profile and len(route_group(r.meta)) > 1]
        if e.id in folded and any(r.id not in folded for r in share):
            continue  # a swappable entry of its share serves the profile's seeds
        if e.id in folded and share and share[0].id != e.id:
            continue  # the profile's one fallback below stands for every member of its share
        if e.id in folded:
            e = next(
                (
                    c
                    for c in inference
                    if c.profile == e.profile
                    and c.blueprint_version == e.blueprint_version
                    and c.engine == EntryEngine.AOTI
                    and c.failed_check == "selection"
                    and c.meta.get("swappable", True)
                    and c.guards is not None
                    and key.mismatch(c.compat) is None
                ),
                e,
            )
        chosen.append(e)
    return chosen


def choose_training_entry(entries: Sequence[Entry], key: CompatKey) -> list[Entry]:
    """The newest certified training entry built for ``key`` over the whole range (a compiled artifact, or an
    eager route certification chose by measurement), after the certified specializations compiled beside it
    (each serving exact sizes: a compiled step that cannot keep some dims dynamic). :class:`Unusable` says why
    there is none; a blueprint's recorded eager training route (dropout, a failed export) names its reason."""
    training = of_kind(entries, ArtifactKind.TRAINING)
    if not training:
        raise Unusable(telemetry.NO_TRAINING_ARTIFACT, "Urza has no training artifact for it")
    certified = [e for e in training if e.status == EntryStatus.CERTIFIED]
    usable = [e for e in certified if key.mismatch(e.compat) is None]
    if usable:
        # The whole range's route (compiled, or eager by evidence) serves every size its certified
        # specializations, routed first, do not hold exact.
        whole = next((e for e in usable if not is_specialization(e.profile)), usable[0])
        return profile_routes(usable, whole)
    if certified:
        newest = certified[0]
        raise Unusable(telemetry.INCOMPATIBLE, f"training entry #{newest.id}: {key.mismatch(newest.compat)}")
    newest = training[0]
    if newest.engine == EntryEngine.EAGER:
        raise Unusable(
            telemetry.NO_TRAINING_ARTIFACT, f"eager training route (entry #{newest.id}): {newest.failure_reason}"
        )
    why = f": {newest.failure_reason}" if newest.failure_reason else ""
    raise Unusable(
        telemetry.NO_TRAINING_ARTIFACT, f"no certified training artifact (newest is #{newest.id}, {newest.status}{why})"
    )


def choose_entry_id(entries: Sequence[Entry], key: CompatKey, entry_id: int, *, kind: ArtifactKind) -> list[Entry]:
    """One compiled entry of ``kind`` by id, whatever its status (certification tests an entry before it is
    certified, through the very path a run loads it by); compatibility still applies."""
    entry = next((e for e in entries if e.id == entry_id), None)
    if entry is None or entry.engine != EntryEngine.AOTI or entry.artifact != kind:
        raise Unusable(MISSING[kind], f"entry #{entry_id} is not a compiled {kind} artifact")
    mismatch = key.mismatch(entry.compat)
    if mismatch:
        raise Unusable(telemetry.INCOMPATIBLE, f"{spec(kind).noun} #{entry_id} is incompatible: {mismatch}")
    return [entry]
