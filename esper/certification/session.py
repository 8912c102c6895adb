"""The certify session: one per pytest run. The plugin's hooks delegate here.

It generates one test module per blueprint, hands each module its :class:`BlueprintCertification`, records
test outcomes, and renders the end-of-run summary (terminal table plus ``summary.json``/``summary.md``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certify.generate import GENERATED_PREFIX, render_broken, render_module
from esper.blueprint import BlueprintError
from esper.budgets import PROFILES
from esper.catalog import load_catalog, load_file, validate_module
from esper.certification.run import BlueprintCertification, Outcome
from esper.profiles import contains
from esper.settings import Settings
from esper.urza import Urza


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

    @property
    def profile(self) -> Any:
        return PROFILES[self.settings.budget_profile]

    # -- generation --------------------------------------------------------------------------------

    def generate(self) -> list[Path]:
        """Write one module per blueprint (and one per unusable file) into the build folder.

        Blueprints are validated here, before anything compiles; an invalid one gets a module whose single
        test fails with the error. Files are rewritten only when their text changes, and generated files of
        blueprints that no longer exist are removed.
        """
        catalog = load_catalog(self.settings.blueprint_paths, strict=False)
        self.errors = list(catalog.errors)
        texts: dict[str, str] = {}
        for bp in catalog.select([]):
            try:
                validate_module(bp)
            except BlueprintError as e:
                self.errors.append(e)
                continue
            texts[f"{GENERATED_PREFIX}{bp.name}.py"] = render_module(bp, self._relative(bp.source))
        for err in self.errors:
            stem = Path(err.source or "unknown").stem
            texts[f"{GENERATED_PREFIX}error_{err.blueprint or stem}.py"] = render_broken(err)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.build_dir.glob(f"{GENERATED_PREFIX}*.py"):
            if stale.name not in texts:
                stale.unlink()
        paths = []
        for name, text in sorted(texts.items()):
            paths.append(_write_if_changed(self.build_dir / name, text))
        return paths

    def _relative(self, source: str | None) -> str:
        path = Path(source or "")
        try:
            return path.relative_to(self.settings.root).as_posix()
        except ValueError:
            return path.as_posix()

    # -- per-blueprint state -----------------------------------------------------------------------

    def certification(self, name: str, source: str) -> BlueprintCertification:
        """The certification of blueprint ``name`` declared in ``source`` (relative to the project root)."""
        if name not in self.runs:
            path = Path(source)
            if not path.is_absolute():
                path = self.settings.root / path
            declared = {bp.name: bp for bp in load_file(path)}
            if name not in declared:
                raise BlueprintError("name", f"{path} no longer declares {name!r}; regenerate with --certify")
            self.runs[name] = BlueprintCertification(
                bp=declared[name],
                urza_path=self.settings.urza,
                profile=self.profile,
                device=self.device,
                recheck=self.recheck,
            )
        return self.runs[name]

    def record(self, name: str, check: str, outcome: str, message: str, candidate: str | None = None) -> None:
        run = self.runs.get(name)
        if run is not None:
            run.record(Outcome(check, outcome, message, candidate))

    # -- summary -----------------------------------------------------------------------------------

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per blueprint, read back from Urza: what Kasmina will route, and the evidence for it."""
        rows = [self._summary_row(self.runs[name]) for name in sorted(self.runs)]
        for err in self.errors:
            rows.append(
                {"blueprint": err.blueprint or Path(err.source or "?").name, "status": "invalid", "note": str(err)}
            )
        return rows

    def _summary_row(self, run: BlueprintCertification) -> dict[str, Any]:
        from esper.compat import current
        from esper.kasmina.loader import Unusable, choose_entries

        name = run.bp.name
        with Urza(self.settings.urza, readonly=True) as urza:
            entries = urza.entries(name)
        try:
            routes = choose_entries(entries, current(self.device))
        except Unusable as u:
            routes, why = [], u.detail
        compiled_now = [c for c in run.candidates.values() if c.entry is not None and not c.reused]
        tried = [c for c in run.candidates.values() if c.entry is not None]
        n_profiles = len(run.bp.profiles())
        if len(routes) == n_profiles:
            status = "certified" + (" (reused)" if tried and not run.checked else "")
        elif routes:
            status = f"partial ({len(routes)}/{n_profiles} profiles)"
        else:
            status = entries[0].status if entries else "error"
        routed: dict[str, dict[str, Any]] = {}
        for label, sizes in run.labels().items():
            route = next((e for e in routes if contains(run.bp.profiles()[e.profile], sizes)), None)
            figures = (route.performance.get("certify") or {}).get(label, {}) if route else {}
            path = "compiled" if route is not None and route.kind == "aoti" else "eager"
            routed[label] = {"route": figures.get(path, {}), "eager": figures.get("eager", {})}
        parities = [c.parity for c in run.candidates.values() if c.parity.cases]
        if not parities:
            parities_evidence = [e.parity.get("certify") for e in routes if e.parity.get("certify")]
            max_abs = max((p["max_abs"] for p in parities_evidence), default=None)
            cases = sum(p["cases"] for p in parities_evidence) or None
        else:
            max_abs, cases = max(p.max_abs for p in parities), sum(p.cases for p in parities)
        ratios = [
            v["eager"]["p50_ms"] / v["route"]["p50_ms"]
            for v in routed.values()
            if v["route"].get("p50_ms") and v["eager"].get("p50_ms")
        ]
        notes = [f"{d.profile}: {d.note}" for d in run.decisions.values()]
        if not run.decisions and routes:
            notes = [f"{e.profile}: {e.variant if e.kind == 'aoti' else 'eager'}" for e in routes]
        failed = [f"{c.id} {c.failed}" for c in run.candidates.values() if c.failed]
        if failed:
            notes.append("rejected: " + ", ".join(failed))
        if not routes and entries and entries[0].failure_reason:
            notes.append(entries[0].failure_reason.splitlines()[0])
        elif not routes:
            notes.append(why)
        return {
            "blueprint": name,
            "status": status,
            "compile_s": round(sum(c.compile_seconds or 0 for c in compiled_now), 1),
            "parity_max_abs": max_abs,
            "cases": cases,
            "p50_ms": {k: v["route"].get("p50_ms") for k, v in routed.items()},
            "p95_ms": {k: v["route"].get("p95_ms") for k, v in routed.items()},
            "eager_p50_ms": {k: v["eager"].get("p50_ms") for k, v in routed.items()},
            "eager_p95_ms": {k: v["eager"].get("p95_ms") for k, v in routed.items()},
            "speedup": round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3) if ratios else None,
            "entries": ",".join(f"#{e.id}" for e in routes),
            "note": "; ".join(notes),
        }

    def summary_table(self) -> str:
        from tabulate import tabulate

        def joined(d: Any) -> str:
            return "/".join(f"{v:.3g}" for v in d.values() if v is not None) if isinstance(d, dict) else ""

        table = [
            [
                r["blueprint"],
                r["status"],
                r.get("compile_s"),
                f"{r['parity_max_abs']:.2g} ({r['cases']})" if r.get("parity_max_abs") is not None else "",
                joined(r.get("p50_ms")),
                joined(r.get("p95_ms")),
                joined(r.get("eager_p50_ms")),
                joined(r.get("eager_p95_ms")),
                r.get("speedup"),
                r.get("entries"),
                (r.get("note") or "")[:110],
            ]
            for r in self.summary_rows()
        ]
        headers = [
            "blueprint",
            "status",
            "compile s",
            "parity max|err| (cases)",
            "p50 ms",
            "p95 ms",
            "eager p50",
            "eager p95",
            "speedup",
            "entries",
            "note",
        ]
        return tabulate(table, headers=headers)

    def write_summary(self) -> Path:
        rows = self.summary_rows()
        (self.build_dir / "summary.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        path = self.build_dir / "summary.md"
        path.write_text(
            "# Certification summary\n\nLatency columns list the representative shapes in order "
            "(ms).\n\n```\n" + self.summary_table() + "\n```\n"
        )
        return path


def _write_if_changed(path: Path, text: str) -> Path:
    if path.is_file() and path.read_text() == text:
        return path
    # Write-then-rename: parallel workers regenerate the same files and must never read half of one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gen-", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
