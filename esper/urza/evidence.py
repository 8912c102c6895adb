"""An entry's evidence as typed values: what Tezzeret and certification write, and the one reader everything shares.

Writers build the frozen dataclasses here and store their ``to_json()`` in the entry's ``parity``, ``performance``
and ``meta`` columns; ``esper urza list``/``show``, ``esper report`` and certification's summary read them back
through :meth:`Evidence.of`, never by indexing the JSON themselves.

- :class:`Performance`: Tezzeret's own quick measurement right after compiling (``tezzeret``) and
  certification's interleaved comparison with eager per representative shape (``certify``); certification's
  figures win where both exist.
- :class:`Parity`: Tezzeret's compile-time judgement at each verified shape (``representative``) and
  certification's over every planned and drawn case (``certify``).
- :class:`CompileRecord` and :class:`CertificationRecord`: the flat ``meta`` keys Tezzeret adds after compiling
  and certification's ``meta["certification"]``; :class:`Meta` reads the figures a listing shows.
- :class:`RouteTable`: ``meta["route_table"]``, certification's decision by region of the shape space (compiled
  where the candidate won with confidence, eager elsewhere), with every grid point's comparison. Kasmina serves
  a certified entry's compiled code only in its compiled cells; a row without a table is compiled everywhere.

Every value carries ``version`` (:data:`EVIDENCE_VERSION`). The reader is tolerant: rows written before the
version field existed, fields of the wrong type, and keys it does not know read as "not recorded" (``None``, empty)
rather than failing, and unknown keys are kept so that rewriting a row loses nothing.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from esper.urza.schema import Entry, EntryEngine

__all__ = [
    "EVIDENCE_VERSION",
    "CertificationRecord",
    "CertifiedContract",
    "CertifiedParity",
    "CertifiedWeights",
    "CompileRecord",
    "Conditioning",
    "DecisionRecord",
    "Evidence",
    "Meta",
    "Parity",
    "PartConditioning",
    "Performance",
    "RegionCell",
    "RouteTable",
    "ShapeParity",
    "ShapeTiming",
    "Timing",
    "geomean",
    "own_route_table",
    "route_group",
    "route_table",
    "speedups",
    "summarize",
]

#: The evidence layout this release writes. Rows without a ``version`` are the layout of the releases before it
#: (the same keys, unversioned), which the reader reads alike. Version 2 adds certification's ``weights`` (which
#: weight sets a compiled entry is certified for); rows of version 1 read it as not recorded. Version 3 adds
#: certification's ``conditioning`` (per part, the cases judged against the calibrated yardstick) and ``contract``
#: (the contract clauses' figures); rows of earlier versions read them as not recorded.
EVIDENCE_VERSION = 3

COMPILED = "compiled"
EAGER = "eager"
JSON = dict[str, Any]


# -- tolerant field readers ----------------------------------------------------------------------------------


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    """A finite number, else ``None`` (bools, text, NaN and inf are not recorded figures)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _version(raw: Mapping[str, Any]) -> int:
    """The recorded version; 0 for the unversioned layout of earlier releases."""
    return _count(raw.get("version")) or 0


def _extra(raw: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    skip = {*known, "version"}
    return {k: v for k, v in raw.items() if k not in skip}


def _put(out: JSON, **values: Any) -> JSON:
    """``out`` with every value that is not ``None``."""
    out.update({k: v for k, v in values.items() if v is not None})
    return out


# -- performance ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """One side's latency at one shape, in milliseconds; ``extra`` keeps what else the measurement recorded
    (sample counts, rounds)."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any) -> Timing | None:
        if not isinstance(raw, Mapping):
            return None
        return cls(_number(raw.get("p50_ms")), _number(raw.get("p95_ms")), _extra(raw, ("p50_ms", "p95_ms")))

    def to_json(self) -> JSON:
        return _put(dict(self.extra), p50_ms=self.p50_ms, p95_ms=self.p95_ms)


@dataclass(frozen=True)
class ShapeTiming:
    """Compiled and eager latency at one representative shape. ``ratio`` (compiled/eager) and ``comparison``
    (the interleaved comparison's figures) are certification's; Tezzeret records the two sides only. An eager
    route records eager's side alone."""

    compiled: Timing | None = None
    eager: Timing | None = None
    ratio: float | None = None
    comparison: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, raw: Any) -> ShapeTiming:
        raw = _mapping(raw)
        comparison = raw.get("comparison")
        return cls(
            Timing.from_json(raw.get(COMPILED)),
            Timing.from_json(raw.get(EAGER)),
            _number(raw.get("ratio")),
            dict(comparison) if isinstance(comparison, Mapping) else None,
        )

    def to_json(self) -> JSON:
        return _put(
            {},
            compiled=self.compiled.to_json() if self.compiled else None,
            eager=self.eager.to_json() if self.eager else None,
            ratio=self.ratio,
            comparison=dict(self.comparison) if self.comparison is not None else None,
        )

    def side(self, path: str) -> Timing:
        """``compiled`` or ``eager``'s figures (empty when not measured)."""
        got = self.compiled if path == COMPILED else self.eager
        return got or Timing()

    def speedup(self) -> float | None:
        """Eager p50 / compiled p50, where both were measured."""
        c, e = self.side(COMPILED).p50_ms, self.side(EAGER).p50_ms
        return e / c if c and e and c > 0 and e > 0 else None


def _table(raw: Any) -> dict[str, ShapeTiming]:
    return {str(k): ShapeTiming.from_json(v) for k, v in _mapping(raw).items()}


@dataclass(frozen=True)
class Performance:
    """The ``performance`` column: latency tables by shape label, Tezzeret's and certification's."""

    tezzeret: Mapping[str, ShapeTiming] = field(default_factory=dict)
    certify: Mapping[str, ShapeTiming] = field(default_factory=dict)
    version: int = EVIDENCE_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any) -> Performance:
        raw = _mapping(raw)
        return cls(
            _table(raw.get("tezzeret")),
            _table(raw.get("certify")),
            _version(raw),
            _extra(raw, ("tezzeret", "certify")),
        )

    def to_json(self) -> JSON:
        out: JSON = {**self.extra, "version": EVIDENCE_VERSION}
        if self.tezzeret:
            out["tezzeret"] = {k: v.to_json() for k, v in self.tezzeret.items()}
        if self.certify:
            out["certify"] = {k: v.to_json() for k, v in self.certify.items()}
        return out

    def best(self) -> Mapping[str, ShapeTiming]:
        """Certification's table where it measured, else Tezzeret's."""
        return self.certify or self.tezzeret


# -- parity --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeParity:
    """Tezzeret's compile-time parity at one verified shape: the largest |compiled - eager| and, judged against
    float64 (:func:`esper.numerics.parity.judge`), the worst RMSE ratio to eager's own and whether it passed.
    Rows of earlier releases recorded ``max_rel`` instead of the judgement."""

    max_abs: float | None = None
    rmse_ratio: float | None = None
    passed: bool | None = None
    max_rel: float | None = None

    @classmethod
    def from_json(cls, raw: Any) -> ShapeParity:
        raw = _mapping(raw)
        return cls(
            _number(raw.get("max_abs")),
            _number(raw.get("rmse_ratio")),
            _flag(raw.get("passed")),
            _number(raw.get("max_rel")),
        )

    def to_json(self) -> JSON:
        return _put({}, max_abs=self.max_abs, rmse_ratio=self.rmse_ratio, passed=self.passed, max_rel=self.max_rel)


def _names(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list | tuple) else ()


@dataclass(frozen=True)
class CertifiedWeights:
    """Which weight sets certification judged a compiled entry at, through the path Kasmina serves a seed's
    weights (esper.certification.contract.weight_sets): ``certified_for`` names them (``own`` first);
    ``folded`` is true where the compiled code folded the weights in, so that it is certified for its own
    weights only (Kasmina runs any other seed eager); ``held_own`` names the weights a swappable entry folded,
    held at the blueprint's values in every set; ``cases`` counts the parity cases judged at the other sets."""

    certified_for: tuple[str, ...] = ()
    folded: bool | None = None
    held_own: tuple[str, ...] = ()
    cases: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("certified_for", "folded", "held_own", "cases")

    @classmethod
    def from_json(cls, raw: Any) -> CertifiedWeights | None:
        if not isinstance(raw, Mapping) or not raw:
            return None
        return cls(
            certified_for=_names(raw.get("certified_for")),
            folded=_flag(raw.get("folded")),
            held_own=_names(raw.get("held_own")),
            cases=_count(raw.get("cases")),
            extra=_extra(raw, cls._KEYS),
        )

    def to_json(self) -> JSON:
        out = {**self.extra, "certified_for": list(self.certified_for), "held_own": list(self.held_own)}
        return _put(out, folded=self.folded, cases=self.cases)


class Conditioning(StrEnum):
    """Whether the legitimate float32 executions of a part agreed with each other, as recorded: the values of
    :class:`esper.numerics.executions.Conditioning` (the store reads them without torch)."""

    WELL = "well-conditioned"
    ILL = "ill-conditioned"
    UNRESOLVED = "unresolved"  # the float64 value is no larger than eager's own rounding: nothing to measure


def _conditioning(value: Any) -> Conditioning | None:
    return Conditioning(value) if value in {c.value for c in Conditioning} else None


@dataclass(frozen=True)
class PartConditioning:
    """One part's (output, gradient, buffer) cases that failed the RMSE rule alone and were judged again against
    the spread of eager's legitimate float32 executions (esper.numerics.executions): how many (``rejudged``) and
    how many of them passed (``admitted``), the executions' worst spread ratio (largest over smallest RMSE
    against float64) and worst disagreement with eager (ulps of the reference's RMS) over those cases, and the
    part's conditioning (ill where any case's executions disagreed beyond rounding)."""

    rejudged: int | None = None
    admitted: int | None = None
    spread_ratio: float | None = None
    disagreement_ulps: float | None = None
    conditioning: Conditioning | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("rejudged", "admitted", "spread_ratio", "disagreement_ulps", "conditioning")

    @classmethod
    def from_json(cls, raw: Any) -> PartConditioning | None:
        if not isinstance(raw, Mapping):
            return None
        return cls(
            rejudged=_count(raw.get("rejudged")),
            admitted=_count(raw.get("admitted")),
            spread_ratio=_number(raw.get("spread_ratio")),
            disagreement_ulps=_number(raw.get("disagreement_ulps")),
            conditioning=_conditioning(raw.get("conditioning")),
            extra=_extra(raw, cls._KEYS),
        )

    def to_json(self) -> JSON:
        return _put(
            dict(self.extra),
            rejudged=self.rejudged,
            admitted=self.admitted,
            spread_ratio=self.spread_ratio,
            disagreement_ulps=self.disagreement_ulps,
            conditioning=None if self.conditioning is None else str(self.conditioning),
        )


@dataclass(frozen=True)
class CertifiedContract:
    """The contract clauses (esper.certification.contract) judged on a candidate's parity calls: how many calls
    (``cases``) and tensors, and the breaches per clause (none on a certified entry)."""

    cases: int | None = None
    tensors: int | None = None
    breaches: Mapping[str, int] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("cases", "tensors", "breaches")

    @classmethod
    def from_json(cls, raw: Any) -> CertifiedContract | None:
        if not isinstance(raw, Mapping) or not raw:
            return None
        breaches = {str(k): n for k, v in _mapping(raw.get("breaches")).items() if (n := _count(v)) is not None}
        return cls(_count(raw.get("cases")), _count(raw.get("tensors")), breaches, _extra(raw, cls._KEYS))

    def to_json(self) -> JSON:
        return _put({**self.extra, "breaches": dict(self.breaches)}, cases=self.cases, tensors=self.tensors)


@dataclass(frozen=True)
class CertifiedParity:
    """Certification's parity over every case it judged: cases, the largest |compiled - eager|, the worst RMSE
    against float64 (compiled's, eager's, their ratio), and the detail it was judged with (``parts``: per part
    output/gradient/buffer; ``coverage``; ``rule``; ``tolerance``), kept as recorded; ``conditioning``: per
    part, the cases judged again against the calibrated yardstick (absent: none was); ``contract``: the
    contract clauses' figures on the same calls."""

    cases: int | None = None
    max_abs: float | None = None
    rmse_ratio: float | None = None
    rmse_compiled: float | None = None
    rmse_eager: float | None = None
    drawn: int | None = None
    nondeterministic: bool | None = None
    guards_refused: int | None = None
    parts: Mapping[str, Any] = field(default_factory=dict)
    coverage: Mapping[str, Any] = field(default_factory=dict)
    rule: Mapping[str, Any] = field(default_factory=dict)
    tolerance: Mapping[str, Any] = field(default_factory=dict)
    weights: CertifiedWeights | None = None
    conditioning: Mapping[str, PartConditioning] = field(default_factory=dict)
    contract: CertifiedContract | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _SCALARS = (
        "cases", "max_abs", "rmse_ratio", "rmse_compiled", "rmse_eager", "drawn", "nondeterministic", "guards_refused"
    )  # fmt: skip
    _DETAIL = ("parts", "coverage", "rule", "tolerance")

    @classmethod
    def from_json(cls, raw: Any) -> CertifiedParity | None:
        if not isinstance(raw, Mapping) or not raw:
            return None
        return cls(
            cases=_count(raw.get("cases")),
            max_abs=_number(raw.get("max_abs")),
            rmse_ratio=_number(raw.get("rmse_ratio")),
            rmse_compiled=_number(raw.get("rmse_compiled")),
            rmse_eager=_number(raw.get("rmse_eager")),
            drawn=_count(raw.get("drawn")),
            nondeterministic=_flag(raw.get("nondeterministic")),
            guards_refused=_count(raw.get("guards_refused")),
            **{k: dict(_mapping(raw.get(k))) for k in cls._DETAIL},
            weights=CertifiedWeights.from_json(raw.get("weights")),
            conditioning={
                str(k): part
                for k, v in _mapping(raw.get("conditioning")).items()
                if (part := PartConditioning.from_json(v)) is not None
            },
            contract=CertifiedContract.from_json(raw.get("contract")),
            extra=_extra(raw, (*cls._SCALARS, *cls._DETAIL, "weights", "conditioning", "contract")),
        )

    def to_json(self) -> JSON:
        # Every figure is written, ``None`` included: a ratio of None is a recorded figure (eager was exact).
        out = {**self.extra, **{k: getattr(self, k) for k in self._SCALARS}}
        out.update({k: dict(getattr(self, k)) for k in self._DETAIL})
        if self.weights is not None:
            out["weights"] = self.weights.to_json()
        if self.conditioning:
            out["conditioning"] = {k: v.to_json() for k, v in self.conditioning.items()}
        if self.contract is not None:
            out["contract"] = self.contract.to_json()
        return out

    def ill_conditioned(self) -> tuple[str, ...]:
        """The parts recorded as ill-conditioned."""
        return tuple(k for k, v in self.conditioning.items() if v.conditioning is Conditioning.ILL)


@dataclass(frozen=True)
class Parity:
    """The ``parity`` column: Tezzeret's per-shape judgement and certification's over every case."""

    representative: Mapping[str, ShapeParity] = field(default_factory=dict)
    certify: CertifiedParity | None = None
    version: int = EVIDENCE_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any) -> Parity:
        raw = _mapping(raw)
        return cls(
            {str(k): ShapeParity.from_json(v) for k, v in _mapping(raw.get("representative")).items()},
            CertifiedParity.from_json(raw.get("certify")),
            _version(raw),
            _extra(raw, ("representative", "certify")),
        )

    def to_json(self) -> JSON:
        out: JSON = {**self.extra, "version": EVIDENCE_VERSION}
        if self.representative:
            out["representative"] = {k: v.to_json() for k, v in self.representative.items()}
        if self.certify is not None:
            out["certify"] = self.certify.to_json()
        return out

    def error(self) -> tuple[float | None, int | None]:
        """Max |compiled - eager| and the number of cases it covers: certification's, else Tezzeret's."""
        if self.certify is not None:
            return self.certify.max_abs, self.certify.cases
        errors = [p.max_abs for p in self.representative.values() if p.max_abs is not None]
        if not errors:
            return None, None
        return max(errors), len(self.representative)

    def rmse_ratio(self) -> float | None:
        """Certification's worst RMSE ratio to eager's own error against float64."""
        return self.certify.rmse_ratio if self.certify is not None else None


# -- meta ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileRecord:
    """What Tezzeret adds to ``meta`` once a compile is done: its wall time and what torch's compiler warned.
    Stored as flat keys beside the rest of ``meta`` (Kasmina reads that column's other fields)."""

    compile_seconds: float
    compile_warnings: tuple[str, ...] = ()

    def to_json(self) -> JSON:
        return {
            "evidence_version": EVIDENCE_VERSION,
            "compile_seconds": round(self.compile_seconds, 3),
            "compile_warnings": list(self.compile_warnings),
        }


@dataclass(frozen=True)
class DecisionRecord:
    """Certification's routing decision for one profile: the winning candidate (``None``: eager), the
    compiled/eager ratio it decided on, and why."""

    winner: str | None
    ratio: float | None
    note: str

    @classmethod
    def from_json(cls, raw: Any) -> DecisionRecord | None:
        if not isinstance(raw, Mapping):
            return None
        return cls(_text(raw.get("winner")), _number(raw.get("ratio")), _text(raw.get("note")) or "")

    def to_json(self) -> JSON:
        return {"winner": self.winner, "ratio": self.ratio, "note": self.note}


@dataclass(frozen=True)
class CertificationRecord:
    """``meta["certification"]``: when and where certification measured, under which budget and limits, and its
    decision (where the session decided one)."""

    at: str | None
    artifact: str | None
    budget_profile: str | None
    limits: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)
    decision: DecisionRecord | None = None
    version: int = EVIDENCE_VERSION
    # Whether the timed package was compiled by another process than the one that timed it, as Kasmina serves
    # it (None: nothing timed, or a record written before this was kept).
    timed_apart: bool | None = None

    @classmethod
    def from_json(cls, raw: Any) -> CertificationRecord | None:
        if not isinstance(raw, Mapping):
            return None
        apart = raw.get("timed_apart")
        return cls(
            at=_text(raw.get("at")),
            artifact=_text(raw.get("artifact")),
            budget_profile=_text(raw.get("budget_profile")),
            limits=dict(_mapping(raw.get("limits"))),
            context=dict(_mapping(raw.get("context"))),
            decision=DecisionRecord.from_json(raw.get("decision")),
            version=_version(raw),
            timed_apart=apart if isinstance(apart, bool) else None,
        )

    def to_json(self) -> JSON:
        out: JSON = {
            "version": EVIDENCE_VERSION,
            "at": self.at,
            "artifact": self.artifact,
            "budget_profile": self.budget_profile,
            "limits": dict(self.limits),
            "context": dict(self.context),
        }
        if self.decision is not None:
            out["decision"] = self.decision.to_json()
        if self.timed_apart is not None:
            out["timed_apart"] = self.timed_apart
        return out


@dataclass(frozen=True)
class Meta:
    """The ``meta`` figures a listing shows (Kasmina's own fields are :class:`esper.urza.schema.EntryMeta`)."""

    compile_seconds: float | None = None
    representative: tuple[str, ...] = ()  # shape labels, in the blueprint's order
    ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    certification: CertificationRecord | None = None
    eager_reason: str | None = None
    version: int = 0
    route_table: RouteTable | None = None

    @classmethod
    def from_json(cls, raw: Any) -> Meta:
        raw = _mapping(raw)
        reps = raw.get("representative")
        labels = tuple(
            ",".join(f"{k}={v}" for k, v in r.items()) or "static"
            for r in (reps if isinstance(reps, list) else [])
            if isinstance(r, Mapping)
        )
        ranges = {
            str(k): (int(r[0]), int(r[1]))
            for k, r in _mapping(raw.get("ranges")).items()
            if isinstance(r, list | tuple) and len(r) == 2 and all(_count(x) is not None for x in r)
        }
        return cls(
            compile_seconds=_number(raw.get("compile_seconds")),
            representative=labels,
            ranges=ranges,
            certification=CertificationRecord.from_json(raw.get("certification")),
            eager_reason=_text(raw.get("eager_reason")) or _text(_mapping(raw.get("training")).get("reason")),
            version=_count(raw.get("evidence_version")) or 0,
            route_table=RouteTable.from_json(raw.get(ROUTE_TABLE)),
        )

    def context(self) -> Mapping[str, Any]:
        """The machine certification measured on (empty when not certified)."""
        return self.certification.context if self.certification is not None else {}

    def decided_ratio(self) -> float | None:
        """The compiled/eager ratio certification decided on (an eager route carries the losing compiled one)."""
        c = self.certification
        return c.decision.ratio if c is not None and c.decision is not None else None


# -- route table ---------------------------------------------------------------------------------------------

#: The route-table layout this release writes; a newer one reads as "not recorded" (compiled everywhere).
ROUTE_TABLE_VERSION = 1
#: Stored under this ``meta`` key.
ROUTE_TABLE = "route_table"
#: Where certification shares a profile's cells between candidates, each certified entry's ``route_table`` holds
#: the cells routed to it, ``own_route_table`` the cells it won on its own (what a seed routes by: the entries it
#: shares with may not serve seeds), and ``route_group`` the ids of every entry of the share.
OWN_ROUTE_TABLE = "own_route_table"
ROUTE_GROUP = "route_group"
_MAX_GROUP = 16
# A table larger than this is no table certification wrote (it measures a few points per dim).
_MAX_DIMS = 8
_MAX_VALUES = 64
_MAX_CELLS = 4096


def threshold(low: int, high: int) -> int:
    """The smallest size that falls in ``high``'s cell rather than ``low``'s: the first integer at or above
    their geometric midpoint ``sqrt(low * high)``, computed exactly in integers."""
    return math.isqrt(low * high - 1) + 1


@dataclass(frozen=True)
class RegionCell:
    """One cell of a :class:`RouteTable`: its grid point (the full shape, ``sizes``), the route it serves
    (``compiled`` or ``eager``), the comparison measured there (``decision``: wins, loses, even, inconclusive;
    ``None`` when the point was not measured) with its paired ratio and confidence interval, and why.
    ``served_by``: in a profile shared between candidates, the candidate (``profile/variant``) whose compiled
    code serves this cell where that is another entry's (this table's cell then runs eager for its own entry)."""

    sizes: Mapping[str, int]
    path: str
    decision: str | None = None
    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    rounds: int | None = None
    why: str = ""
    served_by: str | None = None

    @property
    def label(self) -> str:
        """The point's full shape: ``"batch=2,seq=16"``."""
        return ",".join(f"{k}={v}" for k, v in self.sizes.items()) or "static"

    @classmethod
    def from_json(cls, raw: Any) -> RegionCell | None:
        raw = _mapping(raw)
        sizes = _mapping(raw.get("sizes"))
        path = raw.get("path")
        if path not in (COMPILED, EAGER) or not all(_count(v) for v in sizes.values()):
            return None
        return cls(
            {str(k): int(v) for k, v in sizes.items()},
            str(path),
            _text(raw.get("decision")),
            _number(raw.get("ratio")),
            _number(raw.get("low")),
            _number(raw.get("high")),
            _count(raw.get("rounds")),
            _text(raw.get("why")) or "",
            _text(raw.get("served_by")),
        )

    def to_json(self) -> JSON:
        return _put(
            {"sizes": dict(self.sizes), "path": self.path, "why": self.why},
            decision=self.decision,
            ratio=self.ratio,
            low=self.low,
            high=self.high,
            rounds=self.rounds,
            served_by=self.served_by,
        )


@dataclass(frozen=True)
class RouteTable:
    """Certification's route by region of one profile's shape space.

    ``dims`` are the profile's dynamic dims; ``values[d]`` the grid's sizes along dim ``d``, ascending. The cut
    points between adjacent sizes are their geometric midpoints (:meth:`cuts`); the cells are the product of the
    intervals they make, one per grid point, listed row-major over ``values`` (the last dim varies fastest). A
    size below the first cut falls in the first cell of its dim, above the last in the last; the guards bound
    the range. A cell serves compiled code only where its grid point won by the margin with confidence."""

    dims: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    cells: tuple[RegionCell, ...]
    margin: float | None = None
    version: int = ROUTE_TABLE_VERSION

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.values) or not self.dims:
            raise ValueError("one list of grid values per dim")
        for vs in self.values:
            if not vs or list(vs) != sorted(set(vs)) or vs[0] < 1:
                raise ValueError(f"grid values must be positive and strictly ascending, got {vs}")
        if len(self.cells) != math.prod(len(vs) for vs in self.values):
            raise ValueError(f"{len(self.cells)} cells for a grid of {[len(vs) for vs in self.values]} values")

    def cuts(self) -> tuple[tuple[int, ...], ...]:
        """Per dim, the integer cut points: a size at or above the ``i``-th falls past the ``i``-th cell."""
        return tuple(tuple(threshold(a, b) for a, b in itertools.pairwise(vs)) for vs in self.values)

    def cell_of(self, sizes: Mapping[str, int]) -> RegionCell:
        """The cell a shape falls in (each dim's size from ``sizes``)."""
        index = 0
        for d, cuts, vs in zip(self.dims, self.cuts(), self.values, strict=True):
            index = index * len(vs) + bisect.bisect_right(cuts, sizes[d])
        return self.cells[index]

    def compiled_cells(self) -> int:
        return sum(1 for c in self.cells if c.path == COMPILED)

    @property
    def compiled_anywhere(self) -> bool:
        return self.compiled_cells() > 0

    def describe(self) -> str:
        """``"regional: compiled in 3 of 5 cells"``."""
        return f"regional: compiled in {self.compiled_cells()} of {len(self.cells)} cells"

    def layout(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The table as plain integers for a generated lookup: the flattened cut points and, per dim, how many
        values it has."""
        return tuple(t for cuts in self.cuts() for t in cuts), tuple(len(vs) for vs in self.values)

    @classmethod
    def from_json(cls, raw: Any) -> RouteTable | None:
        """The stored table, or ``None`` (compiled everywhere, as before tables existed) for a missing, newer or
        malformed one."""
        if not isinstance(raw, Mapping) or _version(raw) > ROUTE_TABLE_VERSION:
            return None
        dims: Any = raw.get("dims")
        values: Any = raw.get("values")
        cells: Any = raw.get("cells")
        if not (_seq(dims, _MAX_DIMS) and _seq(values, _MAX_DIMS) and _seq(cells, _MAX_CELLS)):
            return None
        if not all(isinstance(d, str) and d.isidentifier() for d in dims):
            return None
        if not all(_seq(vs, _MAX_VALUES) and all(_count(v) for v in vs) for vs in values):
            return None
        read = [RegionCell.from_json(c) for c in cells]
        if any(c is None for c in read):
            return None
        try:
            return cls(
                tuple(dims),
                tuple(tuple(int(v) for v in vs) for vs in values),
                tuple(c for c in read if c is not None),
                _number(raw.get("margin")),
                _version(raw),
            )
        except ValueError:
            return None

    def to_json(self) -> JSON:
        return _put(
            {
                "version": ROUTE_TABLE_VERSION,
                "dims": list(self.dims),
                "values": [list(vs) for vs in self.values],
                "cuts": [list(cs) for cs in self.cuts()],  # for readers; the reader derives them from the values
                "cells": [c.to_json() for c in self.cells],
            },
            margin=self.margin,
        )


def _seq(value: Any, limit: int) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes) and 0 < len(value) <= limit


def route_table(meta: Any) -> RouteTable | None:
    """An entry ``meta`` column's route table (``None``: none recorded, or unreadable)."""
    return RouteTable.from_json(_mapping(meta).get(ROUTE_TABLE))


def own_route_table(meta: Any) -> RouteTable | None:
    """Where an entry shares its profile's cells with others (:func:`route_group`), the table of the cells it won
    on its own; else, or unreadable, its :func:`route_table`."""
    return RouteTable.from_json(_mapping(meta).get(OWN_ROUTE_TABLE)) or route_table(meta)


def route_group(meta: Any) -> tuple[int, ...]:
    """The ids of the certified entries that share an entry's profile between them, in preference order (the
    entry among them); empty when it serves its profile alone, or the list is unreadable."""
    raw: Any = _mapping(meta).get(ROUTE_GROUP)
    if not _seq(raw, _MAX_GROUP) or not all(_count(i) for i in raw):
        return ()
    ids = tuple(int(i) for i in raw)
    return ids if len(set(ids)) == len(ids) else ()


# -- the reader ----------------------------------------------------------------------------------------------


def geomean(values: Iterable[float]) -> float:
    """The geometric mean of positive ``values``: how ratios and latencies over several shapes are combined
    everywhere in Esper (selection, speedups, the summary), so that one shape cannot dominate.

    Raises ``ValueError`` on no values or a non-positive one: a 0 ms latency is a measuring bug, not a speedup.
    """
    values = list(values)
    if not values or min(values) <= 0:
        raise ValueError(f"geometric mean needs positive values, got {values}")
    return math.exp(sum(map(math.log, values)) / len(values))


def speedups(table: Mapping[str, ShapeTiming]) -> list[float]:
    """Eager p50 / compiled p50 per shape of a latency table, where both were measured."""
    return [s for s in (t.speedup() for t in table.values()) if s is not None]


@dataclass(frozen=True)
class Evidence:
    """One entry's evidence, read: what ``esper urza list``/``show``, ``esper report`` and the certification
    summary all read an entry through."""

    entry: Entry
    parity: Parity
    performance: Performance
    meta: Meta

    @classmethod
    def of(cls, entry: Entry) -> Evidence:
        return cls(
            entry,
            Parity.from_json(entry.parity),
            Performance.from_json(entry.performance),
            Meta.from_json(entry.meta),
        )

    @property
    def certified(self) -> bool:
        """Whether certification measured this entry (its latency table is certification's)."""
        return bool(self.performance.certify)

    def latency(self) -> dict[str, ShapeTiming]:
        """The best latency table (:meth:`Performance.best`) in the blueprint's representative order."""
        table = self.performance.best()
        order = self.meta.representative
        return {k: table[k] for k in sorted(table, key=lambda k: order.index(k) if k in order else len(order))}

    def route_path(self) -> str:
        """``compiled`` for an entry holding compiled code, else ``eager``."""
        return COMPILED if self.entry.engine == EntryEngine.AOTI else EAGER

    def path_at(self, sizes: Mapping[str, int]) -> str:
        """The path a call of shape ``sizes`` takes on this route: :meth:`route_path`, except where the route
        table (if any) sends that shape's cell to eager."""
        table = self.meta.route_table
        if self.route_path() == EAGER or table is None or not all(d in sizes for d in table.dims):
            return self.route_path()
        return table.cell_of(sizes).path

    def speedup(self) -> float | None:
        """Geometric mean of eager p50 / compiled p50 over the representative shapes."""
        ratios = speedups(self.latency())
        return geomean(ratios) if ratios else None

    def summary(self) -> dict[str, Any]:
        """One flat row: identity, status and headline evidence."""
        e = self.entry
        table = self.latency()
        err, cases = self.parity.error()
        reason = (e.failure_reason or "").strip().splitlines()
        return {
            "id": e.id,
            "blueprint": e.blueprint,
            "v": e.blueprint_version,
            "artifact": str(e.artifact),
            "profile": e.profile,
            "variant": e.variant,
            "engine": str(e.engine),
            "status": str(e.status),
            "compat": f"{e.compat.isa}/{e.compat.device_type}",
            "compile_s": self.meta.compile_seconds,
            "parity_max_abs": _r(err),
            "cases": cases,
            "p50_ms": {k: _r(v.side(COMPILED).p50_ms) for k, v in table.items()},
            "p95_ms": {k: _r(v.side(COMPILED).p95_ms) for k, v in table.items()},
            "eager_p50_ms": {k: _r(v.side(EAGER).p50_ms) for k, v in table.items()},
            "speedup": _r(self.speedup(), 3),
            # Parts whose legitimate float32 executions disagree far beyond rounding: judged against their spread.
            "ill_conditioned": list(self.parity.certify.ill_conditioned()) if self.parity.certify else [],
            "failed_check": e.failed_check,
            "reason": reason[0][:120] if reason else None,
            "updated": e.updated_at,
        }


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def summarize(entry: Entry) -> dict[str, Any]:
    """:meth:`Evidence.summary` of ``entry``."""
    return Evidence.of(entry).summary()
