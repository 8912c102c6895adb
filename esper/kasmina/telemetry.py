"""Kasmina's telemetry: one WARNING per distinct fallback, on logger ``esper.kasmina``.

Each record carries ``record.esper`` (a dict: event, blueprint, reason code, detail) for machine consumers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger("esper.kasmina")

# Why a kernel (or one call) runs eager. The codes are stable; the detail text is for people.
NO_CERTIFIED_ENTRY = "no-certified-entry"
INCOMPATIBLE = "incompatible"
INTEGRITY = "integrity"
LOAD_FAILED = "load-failed"
OUTSIDE_GUARDS = "outside-guards"
URZA_UNAVAILABLE = "urza-unavailable"
NEEDS_GRAD = "needs-grad"
SIGNATURE = "signature"
# A row whose values do not parse into what Kasmina acts on (damaged or hostile data).
FORMAT = "format"
# An entry compiled from other source than the blueprint's declaration now.
STALE = "stale"
# A snapshot older than the configured minimum version, or one whose version cannot be trusted.
ROLLBACK = "rollback"
# Training only: no certified training artifact, or the seed's weights no longer match the compiled step.
NO_TRAINING_ARTIFACT = "no-training-artifact"
WEIGHTS_CHANGED = "weights-changed"
# Seeds only: the artifact cannot take this seed's weights (a weight folded into the code differs).
UNBINDABLE = "unbindable"
# The calling thread's dispatch state changes what eager computes (autocast, a TorchFunctionMode or
# TorchDispatchMode, a process-wide forward hook): compiled code would not honour it.
MODE = "mode"
# A seed module whose forward may not be the blueprint's (another class, hooks, changed attributes, mode).
SEED_FORM = "seed-form"
# Training only: a backward with create_graph=True through a compiled step, recomputed eagerly.
DOUBLE_BACKWARD = "double-backward"
FROZEN_WEIGHTS = "frozen-weights"


class _Expected(logging.Filter):
    def __init__(self, codes: frozenset[str]):
        super().__init__()
        self.codes = codes

    def filter(self, record: logging.LogRecord) -> bool:
        info = getattr(record, "esper", None)
        return not (isinstance(info, dict) and info.get("reason") in self.codes)


@contextlib.contextmanager
def expected(*codes: str) -> Iterator[None]:
    """Drop fallback WARNINGs with these reason codes while the block runs: for a caller that provokes them on
    purpose (certification's guard check feeds inputs the guards must refuse), where they would only be noise."""
    dropping = _Expected(frozenset(codes))
    log.addFilter(dropping)
    try:
        yield
    finally:
        log.removeFilter(dropping)


def fallback(blueprint: str, code: str, detail: str) -> None:
    """Emit the WARNING that says ``blueprint`` runs eager, and why."""
    log.warning(
        "blueprint %r runs eager (%s): %s",
        blueprint,
        code,
        detail,
        extra={"esper": {"event": "fallback", "blueprint": blueprint, "reason": code, "detail": detail}},
    )


def refused(blueprint: str, code: str, detail: str, runs: str) -> None:
    """Emit the WARNING that Urza rows of ``blueprint`` were refused (reason ``code``) while something
    certified still runs (``runs`` says what): a refusal that leaves the kernel compiled must not say it runs
    eager."""
    log.warning(
        "blueprint %r: Urza row refused (%s): %s; %s",
        blueprint,
        code,
        detail,
        runs,
        extra={"esper": {"event": "refused", "blueprint": blueprint, "reason": code, "detail": detail, "runs": runs}},
    )


def loaded(blueprint: str, entry_ids: list[int | None], seconds: float) -> None:
    log.info(
        "blueprint %r runs compiled (Urza entries %s, ready in %.1f ms)",
        blueprint,
        entry_ids,
        seconds * 1e3,
        extra={"esper": {"event": "loaded", "blueprint": blueprint, "entries": entry_ids, "seconds": seconds}},
    )


def eager_by_evidence(blueprint: str, profile: str, entry_id: int | None, why: str | None = None) -> None:
    """INFO, not WARNING: certification chose eager for this profile, a decision with evidence; ``why`` is the
    decision's own note where the entry recorded one."""
    log.info(
        "blueprint %r, profile %s: certified to run eager (Urza entry #%s: %s)",
        blueprint,
        profile,
        entry_id,
        why or "no compiled variant beat eager",
        extra={"esper": {"event": "eager-by-evidence", "blueprint": blueprint, "profile": profile, "entry": entry_id}},
    )


def frozen_weights(blueprint: str) -> None:
    """INFO, not WARNING: a training kernel serves eager the calls that want only their inputs' gradients (every
    parameter the artifact trains is frozen), a choice made by design, not a fault."""
    log.info(
        "blueprint %r: the seed's trained weights are frozen; its training calls run eager (the certified step "
        "computes every weight's gradient, eager only the inputs')",
        blueprint,
        extra={"esper": {"event": FROZEN_WEIGHTS, "blueprint": blueprint}},
    )
