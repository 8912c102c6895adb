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
is not judged, and a run whose median eager time does is *inconclusive* as a whole: it passes, saying why, and
asks for a quiet rerun. A real regression makes the compiled side slower, not eager's.

Pure functions of plain dicts; the plugin reads and writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.certification.timing import ratio_interval, regressed

VERSION = 2
READABLE = (1, 2)  # version 1 has no eager timings: its comparisons are judged without the load gauge
DEFAULT_THRESHOLD = 0.2
# How far eager's own time may move between the two runs (either way) for their ratios to be compared.
LOAD_LIMIT = 1.5
Key = tuple[str, str, str, str]  # blueprint, artifact, candidate, shape


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
    could not be judged ("" when it was); an inconclusive run does not fail."""

    regressions: list[str]
    unjudged: list[str]
    load: float | None
    inconclusive: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.regressions) and not self.inconclusive


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
    unjudged = [k for k, s in slowdown.items() if abs(math.log(s)) > bound]
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
