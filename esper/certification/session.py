"""The certify session: one per certification run, whoever drives it (``pytest --certify`` through the plugin
in ``certify/``, or ``esper certify``).

It selects the blueprints of the run (validated, this run's shard of them), hands each its
:class:`BlueprintCertification` (one certification per artifact kind, whose checks record their own results),
runs the compile workers, writes ``latency.json`` and judges the release gate, and renders the end-of-run
summary (terminal table plus ``summary.json``/``summary.md``): inference columns, then training's beside them.
It knows no test runner: :meth:`CertifySession.certify` runs every check itself.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from esper.artifacts.compat import CompatKey
from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint, BlueprintError
from esper.catalog import load_catalog, load_file, module_file_name, validate_module
from esper.certification import gate, plan
from esper.certification.budgets import PROFILES, BudgetProfile
from esper.certification.compile_ahead import CompileAhead, CompilePool, workers
from esper.certification.kinds import TRAINING_ENV
from esper.certification.results import CheckResult, Fail
from esper.certification.run import BlueprintCertification, Certification
from esper.certification.shard import Shard
from esper.certification.timing import Comparison
from esper.kasmina import COMPILED, EAGER
from esper.profiles import contains, is_specialization
from esper.settings import Settings
from esper.tezzeret.aoti import Slot, urza_cache
from esper.urza import Entry, EntryEngine, EntryStatus, Urza
from esper.urza.evidence import Evidence, ShapeTiming, geomean, speedups

# Where generated modules, latency.json and the summary go, under the project root.
DEFAULT_BUILD_DIR = Path(".esper") / "certify"

log = logging.getLogger("esper.certify")


@dataclass
class CertifySession:
    """Settings for the run and the certification of every blueprint it touches."""

    settings: Settings
    build_dir: Path
    enabled: bool = False
    recheck: bool = False
    device: str = "cpu"
    runs: dict[str, BlueprintCertification] = field(default_factory=dict)
    errors: list[BlueprintError] = field(default_factory=list)
    baseline: Path | None = None  # the release gate's stored latency.json (see esper.certification.gate)
    regression: float = gate.DEFAULT_THRESHOLD
    verdict: gate.Verdict | None = None  # the release gate's, after finish() with a baseline
    inconclusive: gate.Policy = gate.Policy.PASS  # what a run the gate cannot judge does
    confirm_seconds: float = gate.DEFAULT_CONFIRM_SECONDS  # the gate's budget for measuring comparisons again
    # The collected ``test_compile`` items per blueprint, in order: (artifact, candidate).
    planned: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # the file declaring each planned blueprint
    pool: CompilePool | None = None
    ahead: CompileAhead | None = None  # the session's compile workers at work (None: none, or not yet started)
    compiles_started: bool = False  # the first certification has given the workers their plan
    shard: Shard | None = None  # certify only this shard of the selected blueprints

    @property
    def budget_profile(self) -> BudgetProfile:
        return PROFILES[self.settings.budget_profile]

    # -- selection ----------------------------------------------------------------------------------

    def select(self, names: Iterable[str] = ()) -> list[Blueprint]:
        """The blueprints of this run: the named ones (all by default), validated, this run's shard of them.

        Blueprints are validated here, before anything compiles; an invalid one, and a file that cannot be
        used, lands in :attr:`errors` (with names given, only the named blueprints' errors). Raises
        :class:`~esper.catalog.UnknownBlueprintError` for a name no folder declares.
        """
        chosen = list(names)
        catalog = load_catalog(self.settings.blueprint_paths, strict=False)
        errors = [] if chosen else list(catalog.errors)
        valid = []
        for bp in catalog.select(chosen):
            try:
                validate_module(bp)
            except BlueprintError as e:
                errors.append(e)
                continue
            valid.append(bp)
        if self.shard is not None:
            valid = self.shard.take(valid, lambda bp: bp.name)
            errors = self.shard.take(errors, error_name)
        self.errors = errors
        return valid

    def relative(self, source: str | None) -> str:
        """A blueprint file's path relative to the project root (as given when it lies outside)."""
        path = Path(source or "")
        try:
            return path.relative_to(self.settings.root).as_posix()
        except ValueError:
            return path.as_posix()

    # -- the run without a test runner ------------------------------------------------------------------

    def certify(self, names: Iterable[str] = ()) -> list[CheckResult]:
        """Run every check of the selected blueprints (see :meth:`select`) in the order a generated test
        module runs them, compile workers included; every result, in order. An invalid declaration is in
        :attr:`errors`, not a result."""
        chosen = self.select(names)
        self.plan_compiles(
            {bp.name: [(str(k), cid) for k in ArtifactKind for cid in plan.candidate_ids(bp, k)] for bp in chosen},
            {bp.name: bp.source or "" for bp in chosen},
        )
        # Every blueprint is loaded already: the workers' plan needs no file read again.
        for bp in chosen:
            if bp.name not in self.runs:
                self._created(bp)
        results: list[CheckResult] = []
        try:
            self._start_compiles()
            for bp in chosen:
                results += self.certification_of(bp).certify()
        finally:
            self.close()
        return results

    # -- per-blueprint state -----------------------------------------------------------------------

    def certification(self, name: str, source: str) -> BlueprintCertification:
        """The certification of blueprint ``name`` declared in ``source`` (relative to the project root)."""
        if name not in self.runs:
            self._create(name, source)
            self._start_compiles()
        return self.runs[name]

    def certification_of(self, bp: Blueprint) -> BlueprintCertification:
        """The certification of blueprint ``bp`` in this session (created on first use)."""
        if bp.name not in self.runs:
            self._created(bp)
            self._start_compiles()
        return self.runs[bp.name]

    def _create(self, name: str, source: str) -> BlueprintCertification:
        path = Path(source)
        if not path.is_absolute():
            path = self.settings.root / path
        declared = {bp.name: bp for bp in load_file(path)}
        if name not in declared:
            raise BlueprintError("name", f"{path} no longer declares {name!r}; regenerate with --certify")
        return self._created(declared[name])

    def _created(self, bp: Blueprint) -> BlueprintCertification:
        run = BlueprintCertification.create(
            bp, self.settings.urza, self.budget_profile, device=self.device, recheck=self.recheck
        )
        for kind in run:
            kind.ahead = self.ahead
        self.runs[bp.name] = run
        return run

    def plan_compiles(self, compiles: Mapping[str, list[tuple[str, str]]], sources: Mapping[str, str]) -> None:
        """Note the compiles this run will make, per blueprint ``(artifact, candidate)`` in run order (the
        ``test_compile`` items pytest collected, or every candidate of :meth:`certify`), and the file declaring
        each blueprint: what the compile workers may take (see :mod:`esper.certification.compile_ahead`)."""
        self.planned = {name: list(items) for name, items in compiles.items()}
        self.sources = {name: sources.get(name, "") for name in self.planned}

    def _start_compiles(self) -> None:
        """On the first certification: the compile workers take every planned compile of the run, in run order,
        so the next blueprint compiles while this one's checks run. Every planned blueprint's certification is
        created here (a file that no longer declares its blueprint is left to that blueprint's own checks)."""
        if self.compiles_started:
            return
        self.compiles_started = True
        n = workers()
        if n == 0:
            return
        for name, source in self.sources.items():
            if name not in self.runs and source:
                try:
                    self._create(name, source)
                except (BlueprintError, OSError) as e:
                    log.warning("not compiling %s ahead: %s", name, e)
        jobs = [
            job
            for name, items in self.planned.items()
            if name in self.runs
            for artifact, candidate in items
            if (job := self.runs[name][artifact].job(candidate)) is not None
        ]
        if not jobs:
            return
        self.pool = CompilePool(n)
        self.ahead = CompileAhead.start(jobs, self.pool, Slot(urza_cache(self.settings.urza)))
        for run in self.runs.values():
            for kind in run:
                kind.ahead = self.ahead

    def close(self) -> None:
        """Stop the compile workers (waiting for a compile under way: its entry is written whole or not)."""
        if self.ahead is not None:
            self.ahead.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def failures(self) -> list[str]:
        """One line per failed check of this session, and per unusable declaration."""
        lines = [
            f"{name} {kind} {check}{f' {cid}' if cid else ''}: {result.reason}"
            for name, run in sorted(self.runs.items())
            for (kind, check, cid), result in run.outcomes().items()
            if result.failed
        ]
        return lines + [f"invalid: {err}" for err in self.errors]

    # -- latency record and the release gate -------------------------------------------------------------

    def latency_rows(self) -> list[tuple[gate.Key, list[float], float]]:
        """Every interleaved comparison of this session: its key, per-round compiled/eager ratios and eager's
        median round time (ms)."""
        return [
            ((name, str(run.artifact), c.id, label), list(cmp.ratios), cmp.eager_p50 * 1e3)
            for name, bc in sorted(self.runs.items())
            for run in bc
            for c in run.candidates.values()
            for label, cmp in c.comparisons.items()
        ]

    def finish(self) -> bool:
        """Run the release gate against the baseline, measuring again the comparisons its load gauge rules out
        (:func:`~esper.certification.gate.reconcile`), and write ``latency.json`` (when anything was timed: the
        measurements the gate judged); whether the gate found a regression (see :meth:`exit_status`)."""
        rows = self.latency_rows()
        current = gate.Record({"|".join(k): list(r) for k, r, _ in rows}, {"|".join(k): ms for k, _, ms in rows})
        baseline = gate.load_record(self.baseline) if self.baseline is not None else None
        confirmation = None
        if baseline is not None and rows:
            current, confirmation = gate.reconcile(baseline, current, self.measure_again, budget_s=self.confirm_seconds)
        if rows:
            from esper.artifacts.context import machine_context

            self.build_dir.mkdir(parents=True, exist_ok=True)
            keys = [k for k, _, _ in rows]
            doc = gate.record(
                [(k, current.ratios["|".join(k)]) for k in keys],
                machine_context(),
                {k: current.eager_ms["|".join(k)] for k in keys if "|".join(k) in current.eager_ms},
            )
            write_if_changed(self.build_dir / "latency.json", json.dumps(doc, indent=1) + "\n")
        if baseline is None:
            return False
        self.verdict = gate.judge(baseline, current, self.regression)
        if confirmation is not None:
            self.verdict = replace(
                self.verdict, confirmed=len(confirmation.settled), confirm_seconds=confirmation.seconds
            )
        return self.verdict.failed

    def measure_again(self, key: str, look: int) -> Comparison | None:
        """One comparison of this session (``"bp|artifact|candidate|shape"``) measured afresh, or ``None`` when
        it cannot be (its kernel is not loaded, or the measurement fails)."""
        name, artifact, cid, label = key.split("|")
        if name not in self.runs:
            return None
        run = self.runs[name][artifact]
        c = run.candidates.get(cid)
        if c is None or c.kernel is None or label not in c.comparisons:
            return None
        try:
            # The gate judges the ratios, not the decision: no stricter confidence, a fresh seed.
            return run.measure_latency(cid, label, seed=look)
        except Fail:
            return None

    def exit_status(self) -> int:
        """The release gate's exit status: 0, 1 (a regression) or :data:`~esper.certification.gate.INCONCLUSIVE_EXIT`
        (a run it could not judge, under ``--certify-inconclusive=fail``); 0 before :meth:`finish` or without a
        baseline."""
        return gate.exit_status(self.verdict, self.inconclusive)

    def gate_report(self) -> list[str]:
        """The release gate's lines for the terminal (none without ``--certify-baseline``)."""
        if self.baseline is None:
            return []
        head = f"release gate against {self.baseline} (limit +{self.regression:.0%}, with confidence): "
        v = self.verdict
        if v is None:
            return [head + "nothing was timed"]
        lines = [head + (f"{len(v.regressions)} regression(s)" if v.regressions else "no regression")]
        lines += [f"  {r}" for r in v.regressions]
        if v.confirmed:
            lines.append(
                f"  {v.confirmed} comparison(s) measured again until eager's time was back within "
                f"{gate.LOAD_LIMIT}x the baseline's ({v.confirm_seconds:.1f} s)"
            )
        undecided = v.outcome is gate.Outcome.INCONCLUSIVE
        if undecided and self.inconclusive is gate.Policy.FAIL:
            why = v.inconclusive or "some comparisons could not be judged"
            lines.append(f"  INCONCLUSIVE, failed (exit {gate.INCONCLUSIVE_EXIT}: retry on a quieter machine): {why}")
        elif v.inconclusive:
            lines.append(f"  INCONCLUSIVE, not failed: {v.inconclusive}")
        elif undecided:
            lines.append("  INCONCLUSIVE, not failed: some comparisons could not be judged")
        if v.unjudged:
            lines.append(
                f"  {len(v.unjudged)} comparison(s) not judged: eager's time moved beyond {gate.LOAD_LIMIT}x the "
                f"baseline's there, even after measuring again for {self.confirm_seconds:g} s "
                f"({', '.join(v.unjudged[:3])}{', ...' if len(v.unjudged) > 3 else ''})"
            )
        return lines

    # -- summary -----------------------------------------------------------------------------------

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per blueprint, read back from Urza: what Kasmina will route, and the evidence for it."""
        from esper.artifacts.compat import current

        key = current(self.device)
        rows = []
        for name in sorted(self.runs):
            with Urza(self.settings.urza, readonly=True) as urza:
                entries = urza.entries(name)
            rows.append(summary_row(self.runs[name], entries, key))
        for err in self.errors:
            rows.append(
                {"blueprint": err.blueprint or Path(err.source or "?").name, "status": "invalid", "note": str(err)}
            )
        return rows

    def summary_table(self) -> str:
        """The summary as a text table: inference columns, then the training columns."""
        from tabulate import tabulate

        return tabulate([table_row(r) for r in self.summary_rows()], headers=TABLE_HEADERS)

    def write_summary(self) -> Path:
        rows = self.summary_rows()
        self.build_dir.mkdir(parents=True, exist_ok=True)
        (self.build_dir / "summary.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        path = self.build_dir / "summary.md"
        path.write_text(
            "# Certification summary\n\nLatency columns list the representative shapes in order "
            "(ms); `train route` and `train ratio` are the training artifact's route and its compiled/eager "
            "training-step ratio.\n\n```\n" + self.summary_table() + "\n```\n"
        )
        return path


# -- the summary, one small function per column group --------------------------------------------------------


def summary_row(run: BlueprintCertification, entries: list[Entry], key: CompatKey) -> dict[str, Any]:
    """The summary row of one blueprint: its inference routes and evidence, then its training route."""
    inference = run[ArtifactKind.INFERENCE]
    routes, why = _routes(entries, key, ArtifactKind.INFERENCE)
    latency = routed_latency(inference.bp, routes)
    max_abs, cases = parity_summary(inference, routes)
    ratios = speedups(latency)
    return {
        "blueprint": inference.bp.name,
        "status": inference_status(inference, routes, entries),
        "compile_s": round(sum(c.compile_seconds or 0 for c in inference.candidates.values() if not c.reused), 1),
        "parity_max_abs": max_abs,
        "cases": cases,
        "parity_rmse_ratio": parity_ratio(inference, routes),
        "p50_ms": {k: v.side(COMPILED).p50_ms for k, v in latency.items()},
        "p95_ms": {k: v.side(COMPILED).p95_ms for k, v in latency.items()},
        "eager_p50_ms": {k: v.side(EAGER).p50_ms for k, v in latency.items()},
        "eager_p95_ms": {k: v.side(EAGER).p95_ms for k, v in latency.items()},
        "speedup": round(geomean(ratios), 3) if ratios else None,
        **training_columns(run[ArtifactKind.TRAINING], entries, key),
        "entries": ",".join(f"#{e.id}" for e in routes),
        "note": "; ".join(inference_notes(inference, routes, entries, why)),
    }


def _routes(entries: list[Entry], key: CompatKey, artifact: ArtifactKind) -> tuple[list[Entry], str]:
    """The entries Kasmina routes ``artifact`` to in this process, or none and why."""
    from esper.kasmina.choose import choose_entries, choose_training_entry
    from esper.kasmina.unusable import Unusable

    choose = choose_training_entry if artifact is ArtifactKind.TRAINING else choose_entries
    try:
        return choose(entries, key), ""
    except Unusable as u:
        return [], u.detail


def inference_status(run: Certification, routes: list[Entry], entries: list[Entry]) -> str:
    """``certified`` (``(reused)`` when nothing was checked in this session), ``partial`` or the newest status."""
    # Specializations route beside their profile's route: the profiles counted are the bucket profiles.
    n_profiles = len([p for p in run.profiles() if not is_specialization(p)])
    tried = [c for c in run.candidates.values() if c.entry is not None]
    routed = len({r.profile for r in routes if not is_specialization(r.profile)})  # shared profiles count once
    if routed == n_profiles:
        return EntryStatus.CERTIFIED + (" (reused)" if tried and not run.checked else "")
    if routed:
        return f"partial ({routed}/{n_profiles} profiles)"
    inference = [e for e in entries if e.artifact == ArtifactKind.INFERENCE]
    return inference[0].status if inference else "error"


def routed_latency(bp: Blueprint, routes: list[Entry]) -> dict[str, ShapeTiming]:
    """Per representative shape, the figures of the route serving it as ``compiled`` beside eager's (an eager
    route's own figures are eager's)."""
    out: dict[str, ShapeTiming] = {}
    for label, sizes in plan.shape_labels(bp).items():
        # Guards, not profile names: a specialization's route (first among the routes) holds one exact size.
        holding = [e for e in routes if contains(_route_ranges(bp, e), sizes)]
        # Routes that share a profile's cells hold the same sizes: the one compiled there serves them.
        route = next((e for e in holding if Evidence.of(e).path_at(sizes) == COMPILED), holding[0] if holding else None)
        if route is None:
            out[label] = ShapeTiming()
            continue
        evidence = Evidence.of(route)
        row = evidence.latency().get(label, ShapeTiming())
        out[label] = ShapeTiming(compiled=row.side(evidence.path_at(sizes)), eager=row.side(EAGER))
    return out


def _route_ranges(bp: Blueprint, entry: Entry) -> dict[str, tuple[int, int]]:
    return entry.guards.dim_ranges() if entry.guards is not None else dict(bp.profiles().get(entry.profile, {}))


def parity_summary(run: Certification, routes: list[Entry]) -> tuple[float | None, int | None]:
    """Max abs error and cases: over the candidates checked in this session, else the routes' evidence."""
    stats = [c.parity for c in run.candidates.values() if c.parity.cases]
    if stats:
        return max(s.max_abs for s in stats), sum(s.cases for s in stats)
    figures = [Evidence.of(e).parity.error() for e in routes]
    errors = [err for err, _ in figures if err is not None]
    return (max(errors) if errors else None), (sum(n for _, n in figures if n) or None)


def parity_ratio(run: Certification, routes: list[Entry]) -> float | None:
    """The worst RMSE ratio to eager's own error against float64 (how close the kernel is to eager's best):
    over the candidates checked in this session, else the routes' evidence."""
    ratios = [run.certified_parity(c).rmse_ratio for c in run.candidates.values() if c.verdicts]
    if not ratios:
        ratios = [Evidence.of(e).parity.rmse_ratio() for e in routes]
    known = [r for r in ratios if r is not None]
    return round(max(known), 3) if known else None


def inference_notes(run: Certification, routes: list[Entry], entries: list[Entry], why: str) -> list[str]:
    """The decisions of this session (or the routes' variants), rejections, and why nothing routes."""
    notes = [f"{d.profile}: {d.note}" for d in run.decisions.values()]
    if not run.decisions:
        notes = [f"{e.profile}: {e.variant if e.engine == EntryEngine.AOTI else EAGER}" for e in routes]
    failed = [f"{c.id} {c.failed}" for c in run.candidates.values() if c.failed]
    if failed:
        notes.append("rejected: " + ", ".join(failed))
    newest = next((e for e in entries if e.artifact == ArtifactKind.INFERENCE), None)
    if not routes and newest is not None and newest.failure_reason:
        notes.append(newest.failure_reason.splitlines()[0])
    elif not routes:
        notes.append(why)
    return notes


def training_columns(run: Certification, entries: list[Entry], key: CompatKey) -> dict[str, Any]:
    """``train_route`` (compiled, eager, off, or the newest training entry's status) and ``train_ratio``
    (compiled/eager training-step p50, geomean over the representative shapes)."""
    routes, _ = _routes(entries, key, ArtifactKind.TRAINING)
    route = routes[0] if routes else None
    if route is None:
        training = [e for e in entries if e.artifact == ArtifactKind.TRAINING]
        off = run.kind.disabled()
        status = training[0].status if training else (f"off ({TRAINING_ENV}=0)" if off else "none")
        return {"train_route": status, "train_ratio": None}
    return {
        "train_route": COMPILED if route.engine == EntryEngine.AOTI else EAGER,
        "train_ratio": training_ratio(route),
    }


def training_ratio(route: Entry) -> float | None:
    """The compiled/eager training-step ratio certification decided on (an eager route carries the losing
    compiled figure), else the inverse of the route's measured speedup."""
    evidence = Evidence.of(route)
    decided = evidence.meta.decided_ratio()
    if decided is not None:
        return round(decided, 3)
    gain = evidence.speedup()
    return round(1 / gain, 3) if gain else None


TABLE_HEADERS = [
    "blueprint",
    "status",
    "compile s",
    "parity max|err| (cases) rmse x eager",
    "p50 ms",
    "p95 ms",
    "eager p50",
    "eager p95",
    "speedup",
    "train route",
    "train ratio",
    "entries",
    "note",
]


def table_row(r: Mapping[str, Any]) -> list[Any]:
    """A summary row as the text table's cells (:data:`TABLE_HEADERS`)."""
    parity = f"{r['parity_max_abs']:.2g} ({r['cases']})" if r.get("parity_max_abs") is not None else ""
    if r.get("parity_rmse_ratio") is not None:
        parity += f" {r['parity_rmse_ratio']:.3g}x"
    return [
        r["blueprint"],
        r["status"],
        r.get("compile_s"),
        parity,
        _joined(r.get("p50_ms")),
        _joined(r.get("p95_ms")),
        _joined(r.get("eager_p50_ms")),
        _joined(r.get("eager_p95_ms")),
        r.get("speedup"),
        r.get("train_route"),
        r.get("train_ratio"),
        r.get("entries"),
        (r.get("note") or "")[:110],
    ]


def _joined(d: Any) -> str:
    return "/".join(f"{v:.3g}" for v in d.values() if v is not None) if isinstance(d, dict) else ""


def error_name(error: BlueprintError) -> str:
    """A name for an unusable declaration: the validated blueprint name, else a sanitized file stem, so that
    nothing a file declares reaches a path."""
    return error.blueprint or module_file_name(error.source)


def write_if_changed(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` unless it holds it already (an unchanged file keeps its time stamp)."""
    if path.is_file() and path.read_text() == text:
        return path
    # Write-then-rename: parallel workers regenerate the same files and must never read half of one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gen-", suffix=path.suffix)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
