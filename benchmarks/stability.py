"""Certificate stability: the catalog certified cold several times beside a neighbour that keeps
every core busy, and what changed between runs.

    .venv/bin/python -m benchmarks.stability [--runs N] [--neighbour matmul|certify|none] [--threads N]
        [--out DIR] [-k EXPR] [--ci]
    .venv/bin/python -m benchmarks.stability --runs N --neighbour pair   # two at once, both judged

Each run is a real ``pytest --certify`` in a subprocess, cold: a fresh Urza in ``<out>/run-<i>/`` with its own
Inductor cache beside it (``TORCHINDUCTOR_CACHE_DIR`` is unset, so Tezzeret puts it there), nothing reused
from an earlier run. While it runs, the neighbour runs too:

- ``matmul``: a process multiplying 1024x1024 float32 matrices in a loop with ``--threads`` intra-op threads
  (default: every core), the shared CI runner's other job at its most demanding. Its throughput (GFLOP/s) is
  reported, proof that it competed;
- ``certify``: a second cold ``pytest --certify`` of the catalog into its own Urza (its outcome is not judged);
- ``pair``: two cold certifications started together, each the other's neighbour, both judged (two CI jobs
  sharing a runner, the report that asked for this study); ``--runs`` counts both;
- ``none``: a quiet baseline.

Each run's latency record (``latency.json``) also goes through the release gate (:mod:`esper.certification.gate`,
20% with confidence) against ``--baseline`` (a stored record, e.g. a quiet run's) or else the first run's: every
run certifies the same code, so a regression it reports is a *gate false alarm*.

Each run also records how busy the machine's CPUs were over its wall time (``cpu_busy``, from
``/proc/stat``: 1.0 is every core busy all the time), proof that the neighbour competed.

After each run (its neighbour stopped), P2 is measured on the run's Urza (:mod:`benchmarks.grid`, in a
subprocess; ``--no-p2`` skips it): the Kasmina kernel against the bare module at the representative shapes and over
a grid of the declared ranges. The runs' P2 must agree within :data:`P2_SPREAD` (max minus min over runs).

Every catalog blueprint is correct, so a blueprint that is not certified for an artifact kind is a *false
rejection*. A route that differs between runs (compiled in one, eager in another) is *explained* when the
measurements lie at the margin: the best candidate's ratio intervals over the runs reach across ``1 - margin``
(:func:`explained`); an unexplained change is a certificate that did not reproduce.

Reported per run: the exit status, the failed checks, the wall time, and the route Urza certified per (blueprint,
artifact kind, shape profile): a variant name, or ``eager``. Between runs: verdict changes (certified in one run,
not in another) and routing changes. Writes ``<out>/stability.json`` and ``stability.md`` (default
``.esper/bench/stability``). Not part of CI: one run is a cold certification of the catalog.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MATMUL_SIZE = 1024
P2_SPREAD = 0.05  # the most P2 may differ between runs (max minus min)

Key = tuple[str, str, str]  # (blueprint, artifact, profile)


@dataclass(frozen=True)
class Run:
    """One cold certification: its outcome and the routes Urza certified."""

    index: int
    returncode: int
    seconds: float
    failed: tuple[str, ...]
    routes: dict[str, str]  # "blueprint/artifact/profile" -> variant or "eager"
    certified: dict[str, list[str]]  # blueprint -> artifact kinds with a certified route
    neighbour: dict[str, Any] = field(default_factory=dict)
    cpu_busy: float | None = None  # busy fraction of all CPUs over the run (None where /proc/stat is not)
    gate: list[str] | None = None  # the release gate's regressions against the baseline (None: not judged)
    gate_note: str = ""  # what the gate judged (its load gauge, inconclusive or not)
    # Per route key, the best candidate's comparison at a representative shape: variant, ratio, low, high, margin.
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    p2: dict[str, float | None] | None = None  # {"representative": ..., "grid": ...} (None: not measured)


def key_label(key: Key) -> str:
    return "/".join(key)


def routes_from_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The route each (blueprint, artifact, profile) serves: the newest certified row's variant, or ``eager``
    for a certified eager route (an eager fallback or an eager choice); where the newest row shares its
    profile's cells with others (its ``group`` of ids), their variants in the group's order, joined by ``+``."""
    routes: dict[str, str] = {}
    certified = {row["id"]: row for row in rows if row["status"] == "certified"}
    for row in sorted(certified.values(), key=lambda r: r["id"]):
        route = "eager" if row["kind"] != "aoti" else str(row["variant"])
        members = [certified[i] for i in row.get("group") or () if i in certified]
        if len(members) > 1:
            route = "+".join(str(m["variant"]) for m in members)
        routes[key_label((row["blueprint"], row["artifact"], row["profile"]))] = route
    return dict(sorted(routes.items()))


def certified_kinds(routes: Mapping[str, str]) -> dict[str, list[str]]:
    """Blueprint -> the artifact kinds that have a certified route for at least one profile."""
    out: dict[str, set[str]] = {}
    for label in routes:
        bp, artifact, _ = label.split("/", 2)
        out.setdefault(bp, set()).add(artifact)
    return {bp: sorted(kinds) for bp, kinds in sorted(out.items())}


def failed_tests(junit: Path) -> tuple[str, ...]:
    """The ids of the failed or erroring tests in a JUnit XML report (``()`` when it is missing)."""
    if not junit.exists():
        return ()
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return tuple(failed)


def false_rejections(run: Run, expected: Mapping[str, Sequence[str]]) -> list[str]:
    """``blueprint/artifact`` pairs the catalog declares that this run did not certify."""
    return [
        f"{bp}/{kind}"
        for bp, kinds in sorted(expected.items())
        for kind in kinds
        if kind not in run.certified.get(bp, [])
    ]


def changes(runs: Sequence[Run]) -> dict[str, dict[str, str]]:
    """Per route key whose route differs between runs: ``{key: {run index: route}}`` (``-`` where absent)."""
    keys = sorted({k for r in runs for k in r.routes})
    out = {}
    for k in keys:
        seen = {str(r.index): r.routes.get(k, "-") for r in runs}
        if len(set(seen.values())) > 1:
            out[k] = seen
    return out


def expected_kinds(runs: Sequence[Run]) -> dict[str, list[str]]:
    """What a clean catalog should certify: every artifact kind any run certified for each blueprint (a kind
    no run certified, e.g. training skipped, is not expected)."""
    out: dict[str, set[str]] = {}
    for r in runs:
        for bp, kinds in r.certified.items():
            out.setdefault(bp, set()).update(kinds)
    return {bp: sorted(k) for bp, k in sorted(out.items())}


def best_ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per route key, the candidate whose comparison with eager at a representative shape has the lowest ratio
    (over every candidate measured, certified or not): ``{"variant", "shape", "ratio", "low", "high", "margin"}``.
    ``rows``: ``{"blueprint", "artifact", "profile", "variant", "comparisons": {shape: evidence}}``, each
    comparison as :meth:`esper.certification.timing.Comparison.evidence` writes it."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = key_label((row["blueprint"], row["artifact"], row["profile"]))
        for shape, c in sorted(row.get("comparisons", {}).items()):
            if not c or "ratio" not in c:
                continue
            best = out.get(key)
            if best is None or c["ratio"] < best["ratio"]:
                out[key] = {
                    "variant": row["variant"],
                    "shape": shape,
                    "ratio": float(c["ratio"]),
                    "low": float(c.get("ratio_low", c["ratio"])),
                    "high": float(c.get("ratio_high", c["ratio"])),
                    "margin": float(c.get("margin", 0.05)),
                }
    return dict(sorted(out.items()))


def explained(intervals: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a route that changed between runs did so where the ratio lies inside the margin: the runs'
    intervals of the best candidate's ratio together reach across the winning line ``1 - margin`` (one run's
    measurement, or the spread between runs, is consistent with a ratio at the line). ``False`` when a run
    measured nothing: a change there is not explained by the margin."""
    if not intervals:
        return False
    line = 1.0 - max(float(i["margin"]) for i in intervals)
    return min(float(i["low"]) for i in intervals) <= line <= max(float(i["high"]) for i in intervals)


def route_changes(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per route key that is compiled in one run and eager (or absent) in another: the routes, each run's best
    ratio, and whether the change is :func:`explained`. Keys whose compiled variant alone changed (compiled in
    every run) are listed too, with ``variant_only``: the route stays compiled."""
    out: dict[str, dict[str, Any]] = {}
    for key, seen in changes(runs).items():
        compiled = {i: r not in ("eager", "-") for i, r in seen.items()}
        intervals = [r.ratios[key] for r in runs if key in r.ratios]
        out[key] = {
            "routes": seen,
            "ratios": {str(r.index): r.ratios.get(key) for r in runs},
            "variant_only": all(compiled.values()),
            "explained": all(compiled.values()) or (len(intervals) == len(runs) and explained(intervals)),
        }
    return out


def p2_spread(runs: Sequence[Run]) -> dict[str, float | None]:
    """Per P2 (``representative``, ``grid``): max minus min over the runs that measured it (``None``: fewer
    than two did)."""
    out: dict[str, float | None] = {}
    for kind in ("representative", "grid"):
        values = [v for r in runs if r.p2 and (v := r.p2.get(kind)) is not None]
        out[kind] = round(max(values) - min(values), 4) if len(values) > 1 else None
    return out


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from ``/proc/stat`` (``None`` where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The busy fraction of all CPUs between two :func:`cpu_times` readings."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 3)


def latency_record(folder: Path) -> Path:
    """Where a run's certification wrote its latency record."""
    return folder / "certify" / "latency.json"


def record_from_urza(urza: Path) -> Any:
    """A :class:`esper.certification.gate.Record` rebuilt from the comparisons an Urza's evidence keeps (the
    same per-round ratios and eager p50 a version-2 ``latency.json`` holds): for runs whose record predates
    eager timings, and for a baseline given as a run's ``urza.db``."""
    from esper.certification.gate import Record
    from esper.urza import Urza

    ratios: dict[str, list[float]] = {}
    eager: dict[str, float] = {}
    with Urza(urza, readonly=True) as store:
        for e in store.entries():
            for label, shape in ((e.performance or {}).get("certify") or {}).items():
                cmp = shape.get("comparison") if isinstance(shape, dict) else None
                if cmp and cmp.get("ratios"):
                    key = "|".join((e.blueprint, str(e.artifact), f"{e.profile}/{e.variant}", label))
                    ratios[key] = [float(r) for r in cmp["ratios"]]
                    eager[key] = float(cmp["eager_p50_ms"])
    return Record(ratios, eager)


def load_gate_record(path: Path) -> Any:
    """A run's record for the gate: a ``latency.json`` that keeps eager timings, else the ``urza.db`` beside
    it (or ``path`` itself when it is an Urza); ``None`` when there is neither."""
    from esper.certification.gate import load_record

    if path.suffix == ".db":
        return record_from_urza(path) if path.exists() else None
    record = load_record(path) if path.exists() else None
    urza = path.parent.parent / "urza.db"  # <run>/certify/latency.json -> <run>/urza.db
    if (record is None or not record.eager_ms) and urza.exists():
        return record_from_urza(urza)
    return record


def gate_alarms(baseline: Path, current: Path) -> tuple[list[str] | None, str]:
    """The release gate on ``current`` against ``baseline``: the regressions that would fail it (``None`` when
    either record is missing), and a line on what it judged."""
    from esper.certification.gate import DEFAULT_THRESHOLD, judge

    base, now = load_gate_record(baseline), load_gate_record(current)
    if base is None or now is None:
        return None, "no record"
    v = judge(base, now, DEFAULT_THRESHOLD)
    load = "" if v.load is None else f"eager {v.load:.2f}x the baseline's; "
    if v.inconclusive:
        return [], (
            f"{load}inconclusive, not failed ({len(v.unjudged)} comparison(s) with eager's time beyond the limit, "
            f"{len(v.regressions)} ratio regression(s) among the others)"
        )
    return (v.regressions, f"{load}{len(v.unjudged)} comparison(s) not judged under load")


def gated(runs: Sequence[Run], out: Path, baseline: Path | None) -> list[Run]:
    """``runs`` with the gate's verdict on each against ``baseline`` (default: the first run's record; the
    first run itself is then not judged)."""
    if not runs:
        return []
    base = baseline or latency_record(out / f"run-{runs[0].index}")
    out_runs = []
    for r in runs:
        if baseline is None and r is runs[0]:
            out_runs.append(r)
            continue
        alarms, note = gate_alarms(base, latency_record(out / f"run-{r.index}"))
        out_runs.append(replace(r, gate=alarms, gate_note=note))
    return out_runs


# -- the neighbours ------------------------------------------------------------------------------------------


def matmul_loop(threads: int, report: Path) -> None:
    """The neighbour: square matmuls on ``threads`` threads until SIGTERM; writes its GFLOP/s to ``report``."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    t0, n = time.perf_counter(), 0
    while not stop:
        torch.mm(a, b)
        n += 1
    seconds = time.perf_counter() - t0
    flops = 2 * MATMUL_SIZE**3 * n
    figures = {"threads": threads, "matmuls": n, "seconds": seconds, "gflops": flops / seconds / 1e9}
    report.write_text(json.dumps(figures))


def certify_command(folder: Path, k: str | None) -> list[str]:
    """``pytest --certify`` writing its generated modules, summary and JUnit report into ``folder``."""
    cmd = [sys.executable, "-m", "pytest", "--certify", "-q", "-p", "no:cacheprovider"]
    cmd += [f"--certify-build-dir={folder / 'certify'}", f"--junitxml={folder / 'junit.xml'}"]
    return [*cmd, "-k", k] if k else cmd


def certify_env(urza: Path, ci: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # cold: Tezzeret's cache beside this run's fresh Urza
    env["ESPER_URZA"] = str(urza)
    if ci:
        env["CI"] = "true"
    else:
        env.pop("CI", None)
    return env


@contextmanager
def neighbour(kind: str, threads: int, folder: Path, ci: bool) -> Iterator[dict[str, Any]]:
    """Run the neighbour for the duration of the block; yields a dict filled with its figures afterwards."""
    figures: dict[str, Any] = {"kind": kind}
    if kind == "none":
        yield figures
        return
    folder.mkdir(parents=True, exist_ok=True)
    report: Path | None = None
    if kind == "matmul":
        report = folder / "neighbour.json"
        cmd = [sys.executable, "-m", "benchmarks.stability", "--matmul-loop", str(threads), "--report", str(report)]
        with (folder / "neighbour.log").open("w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    else:
        proc = start_certify(folder, None, ci, "neighbour.log")
    try:
        yield figures
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if report is not None and report.exists():
            figures.update(json.loads(report.read_text()))


# -- one run ---------------------------------------------------------------------------------------------------


def read_routes(urza: Path) -> dict[str, str]:
    """The certified routes in the Urza at ``urza`` (none when the run left no database)."""
    from esper.urza import Urza
    from esper.urza.evidence import route_group

    if not urza.exists():
        return {}
    with Urza(urza, readonly=True) as store:
        rows = [
            {
                "id": e.id,
                "status": e.status,
                "kind": e.engine,
                "variant": e.variant,
                "blueprint": e.blueprint,
                "artifact": e.artifact,
                "profile": e.profile,
                "group": list(route_group(e.meta)),
            }
            for e in store.entries(status="certified")
        ]
    return routes_from_rows(rows)


def read_ratios(urza: Path) -> dict[str, dict[str, Any]]:
    """:func:`best_ratios` of every candidate in the Urza at ``urza`` that certification measured."""
    from esper.urza import Urza

    if not urza.exists():
        return {}
    with Urza(urza, readonly=True) as store:
        rows = [
            {
                "blueprint": e.blueprint,
                "artifact": str(e.artifact),
                "profile": e.profile,
                "variant": e.variant,
                "comparisons": {
                    label: shape.get("comparison")
                    for label, shape in ((e.performance or {}).get("certify") or {}).items()
                    if isinstance(shape, dict)
                },
            }
            for e in store.entries()
            if e.engine == "aoti"
        ]
    return best_ratios(rows)


def measure_p2(folder: Path, k: str | None, rounds: int | None = None) -> dict[str, float | None] | None:
    """P2 on the run's Urza (:mod:`benchmarks.grid` in a subprocess, written to ``<run>/p2.json``): at the
    representative shapes and over the grid (``None`` when it could not be measured); ``rounds``: the grid's
    interleaved rounds per point (default: its own)."""
    target = folder / "p2.json"
    cmd = [sys.executable, "-m", "benchmarks.grid", "--urza", str(folder / "urza.db"), "--json", str(target)]
    cmd += ["--rounds", str(rounds)] if rounds else []
    cmd += ["-k", k] if k and k.isidentifier() else []  # a plain name only; an expression measures everything
    with (folder / "p2.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not target.exists():
        return None
    summary = json.loads(target.read_text())["summary"]
    return {"representative": summary["representative"], "grid": summary["grid"], "slower": len(summary["slower"])}


def fresh_folder(opts: argparse.Namespace, index: int) -> Path:
    folder = Path(opts.out) / f"run-{index}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def start_certify(folder: Path, k: str | None, ci: bool, log_name: str = "certify.log") -> subprocess.Popen[bytes]:
    """A cold ``pytest --certify`` into ``folder`` (its own Urza), logging to ``folder / log_name``."""
    with (folder / log_name).open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            certify_command(folder, k),
            cwd=ROOT,
            env=certify_env(folder / "urza.db", ci),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def outcome(index: int, folder: Path, returncode: int, seconds: float, **extra: Any) -> Run:
    routes = read_routes(folder / "urza.db")
    return Run(
        index=index,
        returncode=returncode,
        seconds=round(seconds, 1),
        failed=failed_tests(folder / "junit.xml"),
        routes=routes,
        certified=certified_kinds(routes),
        ratios=read_ratios(folder / "urza.db"),
        **extra,
    )


def with_p2(run: Run, opts: argparse.Namespace) -> Run:
    """``run`` with P2 measured on its Urza, unless ``--no-p2``."""
    if not getattr(opts, "p2", False):
        return run
    return replace(run, p2=measure_p2(Path(opts.out) / f"run-{run.index}", opts.k, getattr(opts, "p2_rounds", None)))


def certify_once(index: int, opts: argparse.Namespace) -> Run:
    folder = fresh_folder(opts, index)
    with neighbour(opts.neighbour, opts.threads, folder / "neighbour", opts.ci) as figures:
        time.sleep(2)  # let the neighbour take the cores before the certification starts
        t0, cpu0 = time.perf_counter(), cpu_times()
        returncode = start_certify(folder, opts.k, opts.ci).wait()
        seconds, busy = time.perf_counter() - t0, busy_fraction(cpu0, cpu_times())
    return with_p2(outcome(index, folder, returncode, seconds, neighbour=figures, cpu_busy=busy), opts)


def certify_pair(first: int, opts: argparse.Namespace) -> list[Run]:
    """Runs ``first`` and ``first + 1`` at once, each the other's neighbour; each timed to its own end."""
    folders = [fresh_folder(opts, first), fresh_folder(opts, first + 1)]
    t0, cpu0 = time.perf_counter(), cpu_times()
    procs = [start_certify(f, opts.k, opts.ci) for f in folders]
    ended: dict[int, tuple[int, float, float | None]] = {}
    while len(ended) < len(procs):
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = (proc.returncode, time.perf_counter() - t0, busy_fraction(cpu0, cpu_times()))
        time.sleep(1)
    return [
        with_p2(
            outcome(
                first + i,
                folder,
                *ended[i][:2],
                neighbour={"kind": "pair", "with": first + 1 - i},
                cpu_busy=ended[i][2],
            ),
            opts,
        )
        for i, folder in enumerate(folders)
    ]


def rejudged(recorded: Mapping[str, Any], out: Path) -> Run:
    """A recorded run with its routes read again from its Urza (the gate is judged by :func:`gated`)."""
    fields = {k: v for k, v in recorded.items() if k in Run.__dataclass_fields__ and k not in ("gate", "gate_note")}
    fields["failed"] = tuple(fields.get("failed", ()))
    urza = out / f"run-{recorded['index']}" / "urza.db"
    routes = read_routes(urza)
    return Run(**{**fields, "routes": routes, "certified": certified_kinds(routes), "ratios": read_ratios(urza)})


# -- the report --------------------------------------------------------------------------------------------------


def summarize(runs: Sequence[Run], opts: Mapping[str, Any]) -> dict[str, Any]:
    expected = expected_kinds(runs)
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "options": dict(opts),
        "runs": [asdict(r) for r in runs],
        "false_rejections": {str(r.index): false_rejections(r, expected) for r in runs},
        "verdict_changes": sorted({f for r in runs for f in false_rejections(r, expected)}),
        "routing_changes": changes(runs),
        "route_changes": (moved := route_changes(runs)),
        "unexplained_route_changes": sorted(k for k, v in moved.items() if not v["explained"]),
        "p2": {str(r.index): r.p2 for r in runs},
        "p2_spread": (spread := p2_spread(runs)),
        "p2_within": all(v is None or v <= P2_SPREAD for v in spread.values()),
        "gate_false_alarms": {str(r.index): r.gate for r in runs if r.gate},
    }


def markdown(summary: Mapping[str, Any]) -> str:
    runs = summary["runs"]
    opts = summary["options"]
    lines = [
        "# Certificate stability: the catalog certified cold beside a busy neighbour",
        "",
        f"{len(runs)} cold `pytest --certify` runs of the catalog; neighbour: `{opts['neighbour']}`"
        + (f" ({opts['threads']} threads)" if opts["neighbour"] == "matmul" else "")
        + (
            " (two certifications at once, each the other's neighbour, both judged)"
            if opts["neighbour"] == "pair"
            else ""
        )
        + f"; {summary['machine']['cpus']} CPUs; CI={'true' if opts['ci'] else 'unset'}.",
        "",
        "| run | exit | wall s | CPU busy | failed checks | false rejections | gate false alarms | neighbour GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        fr = summary["false_rejections"][str(r["index"])]
        gflops, busy = r["neighbour"].get("gflops"), r.get("cpu_busy")
        lines.append(
            f"| {r['index']} | {r['returncode']} | {r['seconds']:.0f} | {'' if busy is None else f'{busy:.0%}'} | "
            f"{len(r['failed'])} | {', '.join(fr) or 0} | {'' if r.get('gate') is None else len(r['gate'])} | "
            f"{'' if gflops is None else f'{gflops:.1f}'} |"
        )
    failed = sorted({f for r in runs for f in r["failed"]})
    if failed:
        lines += ["", "Failed checks:", *[f"- `{f}`" for f in failed]]
    notes = [(r["index"], r.get("gate_note")) for r in runs if r.get("gate_note")]
    if notes:
        lines += ["", "Release gate per run (against " + str(opts.get("baseline") or "run 1") + "):"]
        lines += [f"- run {i}: {n}" for i, n in notes]
    alarms = summary.get("gate_false_alarms", {})
    if alarms:
        lines += ["", "Release gate false alarms (20% with confidence):"]
        lines += [f"- run {i}: {a}" for i, found in alarms.items() for a in found]
    keys = sorted({k for r in runs for k in r["routes"]})
    lines += [
        "",
        "## Routes certified per run",
        "",
        "| blueprint/artifact/profile | " + " | ".join(f"run {r['index']}" for r in runs) + " | changed |",
        "|---|" + "---|" * len(runs) + "---|",
    ]
    for k in keys:
        row = [r["routes"].get(k, "-") for r in runs]
        lines.append(f"| {k} | " + " | ".join(row) + f" | {'yes' if len(set(row)) > 1 else ''} |")
    n_changed = len(summary["routing_changes"])
    lines += [
        "",
        f"Verdict changes between runs: {len(summary['verdict_changes'])}"
        + (f" ({', '.join(summary['verdict_changes'])})" if summary["verdict_changes"] else "")
        + f". Routing changes: {n_changed} of {len(keys)} routes.",
    ]
    lines += route_change_lines(summary)
    lines += p2_lines(summary, runs)
    lines.append("")
    return "\n".join(lines)


def route_change_lines(summary: Mapping[str, Any]) -> list[str]:
    """Each changed route with each run's best ratio [interval], and whether the margin explains it."""
    moved = summary.get("route_changes") or {}
    if not moved:
        return []
    unexplained = summary.get("unexplained_route_changes", [])
    lines = [
        "",
        f"Route changes the margin does not explain: {len(unexplained)}"
        + (f" ({', '.join(unexplained)})" if unexplained else "")
        + " (explained: the runs' intervals of the best candidate's ratio reach across 1 - margin; a change of"
        " compiled variant alone keeps the route compiled).",
        "",
        "| blueprint/artifact/profile | per run: route, best ratio [95%] | explained |",
        "|---|---|---|",
    ]
    for key, v in sorted(moved.items()):
        cells = []
        for i, route in v["routes"].items():
            r = v["ratios"].get(i)
            cells.append(f"{i}: {route}" + (f" {r['ratio']:.2f} [{r['low']:.2f}-{r['high']:.2f}]" if r else ""))
        why = "variant only" if v["variant_only"] else ("yes" if v["explained"] else "**no**")
        lines.append(f"| {key} | {'; '.join(cells)} | {why} |")
    return lines


def p2_lines(summary: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """P2 per run (representative shapes, grid of the declared ranges) and its spread against the limit."""
    if not any(r.get("p2") for r in runs):
        return []

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    lines = ["", "## P2 per run (Kasmina / bare module, measured after the run)", ""]
    lines += ["| run | representative | grid | slower by >5% |", "|---|---|---|---|"]
    for r in runs:
        p = r.get("p2") or {}
        lines.append(
            f"| {r['index']} | {fmt(p.get('representative'))} | {fmt(p.get('grid'))} | {p.get('slower', '')} |"
        )
    spread = summary.get("p2_spread", {})
    lines += [
        "",
        f"P2 spread (max - min): representative {fmt(spread.get('representative'))}, grid {fmt(spread.get('grid'))}"
        f"; limit {P2_SPREAD}: {'within' if summary.get('p2_within') else '**exceeded**'}.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--neighbour", choices=("matmul", "certify", "pair", "none"), default="matmul")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the matmul neighbour's threads")
    parser.add_argument("--out", default=str(ROOT / ".esper" / "bench" / "stability"))
    parser.add_argument("-k", default=None, help="pytest -k expression: certify only some blueprints")
    parser.add_argument("--ci", action="store_true", help="certify with CI=true (as .ci/run does)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a latency.json (or a run's urza.db) the release gate holds every run against",
    )
    parser.add_argument(
        "--rejudge",
        action="store_true",
        help="certify nothing: judge the runs recorded in <out>/stability.json again (routes, gate) and rewrite it",
    )
    parser.add_argument(
        "--p2",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure P2 on each run's Urza after it (benchmarks.grid; default on)",
    )
    parser.add_argument("--p2-rounds", type=int, default=None, help="the grid's interleaved rounds per point")
    parser.add_argument("--matmul-loop", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.matmul_loop is not None:
        matmul_loop(opts.matmul_loop, Path(opts.report))
        return 0
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    options = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(opts).items()
        if k not in ("matmul_loop", "report", "rejudge")
    }
    if opts.rejudge:
        recorded = json.loads((out / "stability.json").read_text())
        options = {**recorded["options"], "baseline": options["baseline"]}
        runs = gated([rejudged(r, out) for r in recorded["runs"]], out, opts.baseline)
        summary = summarize(runs, options)
        (out / "stability.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "stability.md").write_text(markdown(summary))
        print(markdown(summary))
        return 0
    step = 2 if opts.neighbour == "pair" else 1
    for i in range(1, opts.runs + 1, step):
        batch = certify_pair(i, opts) if step == 2 else [certify_once(i, opts)]
        runs = gated([*runs, *batch], out, opts.baseline)
        for run in runs[-len(batch) :]:
            gate = "" if run.gate is None else f", {len(run.gate)} gate alarm(s)"
            print(
                f"run {run.index}: exit {run.returncode}, {run.seconds:.0f} s, {len(run.failed)} failed{gate}",
                flush=True,
            )
        summary = summarize(runs, options)  # written after every run: a long study keeps what it measured
        (out / "stability.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "stability.md").write_text(markdown(summary))
    print(markdown(summarize(runs, options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
