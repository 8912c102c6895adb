"""The certify session: one per pytest run. The plugin's hooks delegate here.

It generates one test module per blueprint, hands each module its :class:`BlueprintCertification`, records
test outcomes, and renders the end-of-run summary (terminal table plus ``summary.json``/``summary.md``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certify.generate import GENERATED_PREFIX, render_broken, render_module
from esper import evidence
from esper.blueprint import BlueprintError
from esper.budgets import PROFILES
from esper.catalog import load_catalog, load_file, validate_module
from esper.certification.run import BlueprintCertification, Outcome
from esper.settings import Settings


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

    def record(self, name: str, check: str, outcome: str, message: str) -> None:
        run = self.runs.get(name)
        if run is not None:
            run.record(Outcome(check, outcome, message))

    @property
    def rejected(self) -> list[str]:
        return [n for n, r in self.runs.items() if r.status == "rejected"]

    # -- summary -----------------------------------------------------------------------------------

    def summary_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name in sorted(self.runs):
            run = self.runs[name]
            if run.entry is None:
                failed = next((o for o in run.outcomes.values() if o.outcome == "failed"), None)
                rows.append(
                    {
                        "blueprint": name,
                        "status": "error",
                        "entry": None,
                        "reason": failed.message if failed else "not compiled",
                    }
                )
                continue
            s = evidence.summarize(run.entry)
            status = run.entry.status + (" (reused)" if run.reused and run.skip_reason else "")
            rows.append(
                {
                    "blueprint": name,
                    "status": status,
                    "compile_s": round(run.compile_seconds, 1) if not run.reused and run.compile_seconds else 0.0,
                    "parity_max_abs": s["parity_max_abs"],
                    "cases": s["cases"],
                    "p50_ms": s["p50_ms"],
                    "p95_ms": s["p95_ms"],
                    "eager_p50_ms": s["eager_p50_ms"],
                    "eager_p95_ms": {
                        k: v.get("eager", {}).get("p95_ms") for k, v in evidence.latency_table(run.entry).items()
                    },
                    "speedup": s["speedup"],
                    "entry": run.entry.id,
                    "failed_check": run.entry.failed_check,
                    "reason": s["reason"],
                }
            )
        for err in self.errors:
            rows.append(
                {"blueprint": err.blueprint or Path(err.source or "?").name, "status": "invalid", "reason": str(err)}
            )
        return rows

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
                r.get("entry"),
                (r.get("failed_check") or "") + (": " if r.get("failed_check") else "") + (r.get("reason") or "")[:60],
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
            "entry",
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
