"""The release gate: this run's latency against a stored baseline, with a noise-aware rule.

Every certify run writes ``latency.json`` beside its summary: per blueprint, artifact kind, candidate and
representative shape, the per-round compiled/eager ratios of the interleaved comparison
(:func:`esper.timing.compare`), with the machine context. Keep one run's file as the baseline; a later run
given ``--certify-baseline FILE`` fails when any candidate, at any shape both runs measured, is slower than
the baseline by more than ``--certify-regression`` (default 20%) *with confidence*:
:func:`esper.timing.regressed` on the two runs' per-round ratios (a bootstrap interval of the ratio of their
medians, so the spread of both runs counts, not the medians alone). Ratios, not times: a neighbour that slows
a whole run slows its eager rounds too and cancels out.

Pure functions of plain dicts; the plugin reads and writes the files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from esper.timing import ratio_interval, regressed

VERSION = 1
DEFAULT_THRESHOLD = 0.2
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


def record(rows: Iterable[tuple[Key, Iterable[float]]], context: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document of one run: ``{"version", "context", "ratios": {"bp|artifact|candidate|shape": [...]}}``."""
    return {
        "version": VERSION,
        "context": dict(context),
        "ratios": {"|".join(key): [float(r) for r in ratios] for key, ratios in sorted(rows)},
    }


def load(path: Path) -> dict[str, list[float]]:
    """A stored run's ratios by key; refuses a newer or unknown format."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("ratios"), dict):
        raise ValueError(f"{path}: not an Esper latency record of version {VERSION}")
    return {str(k): [float(x) for x in v] for k, v in doc["ratios"].items()}


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
