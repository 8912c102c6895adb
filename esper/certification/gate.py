"""The release gate: this run's latency against a stored baseline, with a noise-aware rule.

Every certify run writes ``latency.json`` beside its summary: per blueprint, artifact kind, candidate and
representative shape, the per-round compiled/eager ratios of the interleaved comparison
(:func:`esper.certification.timing.compare`), with the machine context. Keep one run's file as the baseline; a later run
given ``--certify-baseline FILE`` fails when any candidate, at any shape both runs measured, is slower than
the baseline by more than ``--certify-regression`` (default 20%) *with confidence*:
:func:`~.timing.regressed` on the two runs' per-round ratios (a bootstrap interval of the ratio of their
medians, so the spread of both runs counts, not the medians alone). Ratios, not times: a neighbour that slows
a whole run slows its eager rounds too and cancels out.

Ratios do not cancel everything: measured beside a neighbour that keeps every core busy, eager itself ran 2.4x
(a second certification) to 5x (a matmul loop) slower than on a quiet machine, and a compiled kernel whose
parallel loops wait for a descheduled thread lost far more than eager's small single-threaded ops (tiny shapes:
compiled/eager 4-5x the quiet run's). An unchanged candidate then "regressed" with confidence. So the record
also keeps eager's own time per comparison (version 2), the gate's load gauge: a comparison whose eager time
differs from the baseline's by more than :data:`LOAD_LIMIT` either way was measured under other conditions and
is not judged, and a run whose median eager time does is *inconclusive* as a whole. A real regression makes the
compiled side slower, not eager's.

Before judging, :func:`reconcile` measures the comparisons the gauge rules out again (fresh interleaved rounds,
:func:`~.timing.confirm`) until eager's time is back in range or a time budget is spent: a neighbour's burst
usually passes within it. What stays out of range leaves the run :attr:`Outcome.INCONCLUSIVE`, and the user's
:class:`Policy` decides: ``pass`` (with a warning) or ``fail`` with :data:`INCONCLUSIVE_EXIT`, distinct from a
regression's exit 1 so that CI can retry the run rather than block the release.

Pure functions of plain dicts; the plugin reads and writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from esper.certification.timing import Comparison, Confirmation, confirm, ratio_interval, regressed

VERSION = 2
READABLE = (1, 2)  # version 1 has no eager timings: its comparisons are judged without the load gauge
DEFAULT_THRESHOLD = 0.2
# How far eager's own time may move between the two runs (either way) for their ratios to be compared.
LOAD_LIMIT = 1.5
Key = tuple[str, str, str, str]  # blueprint, artifact, candidate, shape
# How long the gate may spend measuring out-of-range comparisons again, by default (seconds).
DEFAULT_CONFIRM_SECONDS = 60.0
# Between passes over the comparisons still out of range: let a neighbour's burst pass, measuring nothing.
CONFIRM_PAUSE_SECONDS = 2.0
# The exit status of a run the gate could not judge under ``--certify-inconclusive=fail``: EX_TEMPFAIL of
# sysexits.h ("temporary failure; the user is invited to retry"), far from pytest's own 0-5 and from 1, a
# failed check or a regression.
INCONCLUSIVE_EXIT = 75


class Policy(StrEnum):
    """What a run the gate could not judge does: pass with a warning, or fail with :data:`INCONCLUSIVE_EXIT`."""

    PASS = "pass"
    FAIL = "fail"


class Outcome(StrEnum):
    """The gate's outcome (see :attr:`Verdict.outcome`)."""

    PASSED = "passed"
    REGRESSED = "regressed"
    INCONCLUSIVE = "inconclusive"


def policy(value: str) -> Policy:
    """``pass`` or ``fail`` (argparse type)."""
    try:
        return Policy(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"inconclusive policy {value!r} must be one of {', '.join(p.value for p in Policy)}"
        ) from None


def seconds(value: str) -> float:
    """A time budget in seconds, ``0`` or more (argparse type)."""
    try:
        x = float(value[:-1] if value.endswith("s") else value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"time budget {value!r} is not a number of seconds") from None
    if not 0 <= x < math.inf:
        raise argparse.ArgumentTypeError(f"time budget {value!r} must be 0 seconds or more")
    return x


def threshold(value: str) -> float:
    """``20%`` or ``0.2``: the slowdown the gate tolerates (argparse type)."""
    try:
        x = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"regression threshold {value!r} is not a number or a percentage") from None
    if not 0 <= x < 10:
        raise argparse.ArgumentTypeError(f"regression threshold {value!r} must be between 0% and 1000%")
    return x


@dataclass(frozen=True)
class Record:
    """One run's comparisons by key ``"bp|artifact|candidate|shape"``: per-round compiled/eager ratios, and
    eager's median round time in ms (empty for a version-1 record)."""

    ratios: dict[str, list[float]]
    eager_ms: dict[str, float] = field(default_factory=dict)


def record(
    rows: Iterable[tuple[Key, Iterable[float]]], context: Mapping[str, Any], eager_ms: Mapping[Key, float] | None = None
) -> dict[str, Any]:
    """The JSON document of one run: ``{"version", "context", "ratios": {"bp|artifact|candidate|shape": [...]},
    "eager_ms": {key: ms}}``."""
    return {
        "version": VERSION,
        "context": dict(context),
        "ratios": {"|".join(key): [float(r) for r in ratios] for key, ratios in sorted(rows)},
        "eager_ms": {"|".join(key): float(ms) for key, ms in sorted((eager_ms or {}).items())},
    }


def load_record(path: Path) -> Record:
    """A stored run's :class:`Record`; refuses a newer or unknown format."""
    return parse_record(json.loads(Path(path).read_text()), str(path))


def parse_record(doc: Any, source: str) -> Record:
    """The :class:`Record` of a document :func:`record` wrote (``source`` names it in errors)."""
    if not isinstance(doc, dict) or doc.get("version") not in READABLE or not isinstance(doc.get("ratios"), dict):
        raise ValueError(f"{source}: not an Esper latency record of version {', '.join(map(str, READABLE))}")
    eager = doc.get("eager_ms", {})
    if not isinstance(eager, dict):
        raise ValueError(f"{source}: eager_ms is not a mapping")
    return Record(
        {str(k): [float(x) for x in v] for k, v in doc["ratios"].items()},
        {str(k): float(v) for k, v in eager.items()},
    )


def load(path: Path) -> dict[str, list[float]]:
    """A stored run's ratios by key (see :func:`load_record`)."""
    return load_record(path).ratios


@dataclass(frozen=True)
class Verdict:
    """The gate's outcome: the regressions it found among the comparisons it judged, the comparisons it did
    not judge (eager's time moved beyond :data:`LOAD_LIMIT`), and the run's load against the baseline's
    (median of eager's time ratios; ``None`` without eager timings). ``inconclusive`` says why the whole run
    could not be judged ("" when it was): its regressions do not count. ``confirmed`` counts the comparisons
    :func:`reconcile` measured back into range, in ``confirm_seconds``."""

    regressions: list[str]
    unjudged: list[str]
    load: float | None
    inconclusive: str = ""
    confirmed: int = 0
    confirm_seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """Whether a regression was found on comparable measurements."""
        return bool(self.regressions) and not self.inconclusive

    @property
    def outcome(self) -> Outcome:
        """``regressed`` (:attr:`failed`), else ``inconclusive`` when the whole run or any comparison could not
        be judged (a regression may hide there), else ``passed``."""
        if self.failed:
            return Outcome.REGRESSED
        return Outcome.INCONCLUSIVE if self.inconclusive or self.unjudged else Outcome.PASSED


def exit_status(verdict: Verdict | None, inconclusive: Policy) -> int:
    """The exit status the gate asks for: 1 for a regression, :data:`INCONCLUSIVE_EXIT` for a run it could not
    judge under :attr:`Policy.FAIL`, else 0 (no gate: ``None``)."""
    if verdict is None:
        return 0
    if verdict.outcome is Outcome.REGRESSED:
        return 1
    if verdict.outcome is Outcome.INCONCLUSIVE and inconclusive is Policy.FAIL:
        return INCONCLUSIVE_EXIT
    return 0


def comparable(baseline: Record, key: str, eager_ms: float) -> bool:
    """The load gauge of one comparison: whether eager's time ``eager_ms`` lies within :data:`LOAD_LIMIT` of the
    baseline's at ``key`` (either way); true where the baseline kept no eager time."""
    base = baseline.eager_ms.get(key, 0)
    if base <= 0 or eager_ms <= 0:
        return True
    return abs(math.log(eager_ms / base)) <= math.log(LOAD_LIMIT)


def out_of_range(baseline: Record, current: Record) -> list[str]:
    """The keys both runs measured whose eager time the gauge rules out (see :func:`comparable`)."""
    return [
        k
        for k in sorted(set(baseline.ratios) & set(current.ratios))
        if k in current.eager_ms and not comparable(baseline, k, current.eager_ms[k])
    ]


def reconcile(
    baseline: Record,
    current: Record,
    measure: Callable[[str, int], Comparison | None],
    *,
    budget_s: float,
    pause_s: float = CONFIRM_PAUSE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    wait: Callable[[float], Any] = time.sleep,
) -> tuple[Record, Confirmation[str]]:
    """This run's record with its out-of-range comparisons (:func:`out_of_range`) measured again: ``measure(key,
    attempt)`` times one comparison afresh (``None``: it cannot), pass after pass over those still out of range,
    until each is back in range or ``budget_s`` is spent (:func:`~.timing.confirm`). A comparison measured back
    into range replaces the first measurement; the others keep theirs."""
    keys = out_of_range(baseline, current)
    if not keys:
        return current, Confirmation({}, {}, 0, 0.0)
    confirmation = confirm(
        keys,
        measure,
        lambda key, cmp: comparable(baseline, key, cmp.eager_p50 * 1e3),
        budget_s=budget_s,
        pause_s=pause_s,
        clock=clock,
        wait=wait,
    )
    ratios, eager_ms = dict(current.ratios), dict(current.eager_ms)
    for key, cmp in confirmation.settled.items():
        ratios[key] = list(cmp.ratios)
        eager_ms[key] = cmp.eager_p50 * 1e3
    return Record(ratios, eager_ms), confirmation


def judge(baseline: Record, current: Record, limit: float) -> Verdict:
    """The release gate on two runs' records (see the module docstring)."""
    shared = sorted(set(baseline.ratios) & set(current.ratios))
    slowdown = {
        k: current.eager_ms[k] / baseline.eager_ms[k]
        for k in shared
        if baseline.eager_ms.get(k, 0) > 0 and current.eager_ms.get(k, 0) > 0
    }
    load = statistics.median(slowdown.values()) if slowdown else None
    bound = math.log(LOAD_LIMIT)
    unjudged = out_of_range(baseline, current)
    judged = {k: baseline.ratios[k] for k in set(shared).difference(unjudged)}
    found = regressions(judged, current.ratios, limit)
    inconclusive = ""
    if load is not None and abs(math.log(load)) > bound:
        inconclusive = (
            f"eager ran {load:.2f}x its baseline time (median over {len(slowdown)} comparisons): the machine's load "
            "differs, and a parallel compiled kernel loses more to a busy neighbour than eager does, so the "
            "ratios are not comparable; rerun on a machine as quiet as the baseline's"
        )
    return Verdict(found, [k.replace("|", " ") for k in unjudged], load, inconclusive)


def regressions(baseline: Mapping[str, list[float]], current: Mapping[str, list[float]], limit: float) -> list[str]:
    """One line per key both runs measured whose ratio regressed by more than ``limit`` with confidence."""
    out = []
    for key in sorted(set(baseline) & set(current)):
        if baseline[key] and current[key] and regressed(baseline[key], current[key], limit):
            ratio, low, high = ratio_interval(baseline[key], current[key])
            out.append(
                f"{key.replace('|', ' ')}: compiled/eager {ratio:.2f}x the baseline's [{low:.2f}, {high:.2f}] "
                f"(limit {1 + limit:.2f}x)"
            )
    return out
