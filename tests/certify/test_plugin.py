"""``pytest --certify`` driven through real pytest runs (pytester): what gets certified, rejected or recorded
as fallback, and what a generated module does when run alone."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from esper.artifacts.compat import current
from esper.kasmina import EAGER, Kasmina, choose_entries
from esper.urza import Urza
from tests.support import BROKEN, TINY

pytestmark = pytest.mark.compiles

FAST_BENCH = [
    "--benchmark-max-time=0.02",
    "--benchmark-min-rounds=3",
    "--benchmark-warmup=off",
    "-p",
    "no:cacheprovider",
]


PROJECT_FILES = {
    "tiny_mlp.py": (TINY / "tiny_mlp.py").read_text(),
    "tiny_odd.py": (TINY / "tiny_odd.py").read_text(),
    "not_exportable.py": (BROKEN / "not_exportable.py").read_text(),
    "tiny_over_budget.py": (TINY / "tiny_mlp.py")
    .read_text()
    .replace('name="tiny_mlp"', 'name="tiny_over_budget"')
    .replace("    description=", '    budget=Budget(p95_ms={"batch=4": 1e-6}),\n    description=')
    .replace("import Blueprint,", "import Blueprint, Budget,"),
    "raises.py": "raise ImportError('no such dependency')\n",
    # A name that would leave the build folder, and a file that exits the interpreter.
    "evil.py": (TINY / "tiny_mlp.py").read_text().replace('name="tiny_mlp"', 'name="../../etc/evil"'),
    "quits.py": "import sys\nsys.exit(3)\n",
}


@pytest.fixture(scope="module")
def urza_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Urza for the module: the first certify run compiles, later runs reuse (as a user's would)."""
    return tmp_path_factory.mktemp("shared") / "urza.db"


@pytest.fixture
def project(pytester: pytest.Pytester, urza_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project: its own pyproject and blueprints folder (good, wrong, over budget, broken)."""
    pytester.makepyprojecttoml('[tool.esper]\nblueprint-paths = ["bps"]\n')
    bps = pytester.mkdir("bps")
    for name, text in PROJECT_FILES.items():
        (bps / name).write_text(text)
    monkeypatch.setenv("ESPER_URZA", str(urza_path))
    return pytester.path


@pytest.fixture
def certify_run(project: Path, pytester: pytest.Pytester) -> pytest.RunResult:
    # A subprocess: pytester's in-process mode unloads modules between runs, and torch's operator
    # registrations cannot be imported twice into one process.
    return pytester.runpytest_subprocess("--certify", *FAST_BENCH)


def entries(urza_path: Path, name: str) -> list:  # type: ignore[type-arg]
    with Urza(urza_path, readonly=True) as urza:
        return urza.entries(name)


def test_good_blueprint_is_certified_with_evidence(certify_run: pytest.RunResult, urza_path: Path) -> None:
    with Urza(urza_path, readonly=True) as urza:
        all_entries = urza.entries("tiny_mlp")
        routes = choose_entries(all_entries, current())
    # tiny_mlp is too small for compiled code to win by the margin on every machine: either its compiled
    # entry is certified, or an eager route is, chosen by measurement. Both carry the evidence.
    (route,) = routes
    assert route.status == "certified", certify_run.outlines[-40:]
    (compiled,) = [e for e in all_entries if e.engine == "aoti"]
    assert compiled.status == "certified" or (compiled.status, compiled.failed_check) == ("rejected", "selection")
    cert = compiled.parity["certify"]
    assert cert["cases"] >= 9 and cert["max_abs"] <= 1e-5 and cert["guards_refused"] >= 5
    # Every size of batch 1..32 was tried; both RMSEs against float64 and their ratio are in the evidence.
    assert cert["coverage"]["values_tried"] == {"batch": [32, 32]} and cert["parts"]["output"]["failures"] == 0
    assert {"rmse_ratio", "rmse_compiled", "rmse_eager"} <= set(cert) and cert["nondeterministic"] is False
    comparison = compiled.performance["certify"]["batch=4"]["comparison"]
    assert comparison["rounds"] >= 8 and comparison["decision"] in ("wins", "loses", "even", "inconclusive")
    assert set(compiled.performance["certify"]) == {"batch=4", "batch=16"}
    decision = compiled.meta["certification"]["decision"]
    assert decision["ratio"] > 0 and route.meta["certification"]["budget_profile"] == "cpu-2core"
    assert (route.engine == "aoti") == (decision["winner"] == "default/default")


def test_wrong_only_off_the_representative_shapes_is_rejected(certify_run: pytest.RunResult, urza_path: Path) -> None:
    (entry,) = entries(urza_path, "tiny_odd")
    # Tezzeret's own check at the representative (even) shapes saw nothing wrong ...
    assert all(v["max_abs"] == 0.0 for v in entry.parity["representative"].values())
    # ... the planned cases (every size of the range) did, judged against float64.
    assert (entry.status, entry.failed_check) == ("rejected", "parity")
    assert entry.parity["certify"]["max_abs"] == pytest.approx(1.0, abs=1e-5)  # the injected `+ batch % 2`
    reason = entry.failure_reason or ""
    assert reason.startswith("inference default/default at ")  # Esper's words, not pytest's "Failed: ..."
    assert "output: " in reason and int(re.search(r"'batch': (\d+)", reason).group(1)) % 2 == 1  # type: ignore[union-attr]
    certify_run.stdout.fnmatch_lines(
        ["FAILED .esper/certify/test_certify_tiny_odd.py::test_parity[[]inference-default/default[]]*"]
    )


def test_rejected_blueprint_is_served_eagerly_with_a_warning(
    certify_run: pytest.RunResult, project: Path, urza_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "esper.kasmina")
    kernel = Kasmina(urza_path, blueprint_paths=[project / "bps"]).load("tiny_odd")
    assert kernel.route == EAGER
    (record,) = [r for r in caplog.records if r.name == "esper.kasmina"]
    assert "no certified entry" in record.getMessage() and "rejected" in record.getMessage()


def test_over_budget_is_rejected_with_the_figure(certify_run: pytest.RunResult, urza_path: Path) -> None:
    (entry,) = [e for e in entries(urza_path, "tiny_over_budget") if e.engine == "aoti"]
    assert (entry.status, entry.failed_check) == ("rejected", "budgets")
    # No route meets the budget: eager's figures and the candidate's are both named.
    assert re.search(r"eager: batch=4: p95 ms [\d.e-]+ exceeds the limit 1e-06", entry.failure_reason or "")
    assert re.search(r"default/default: batch=4: p95 ms [\d.e-]+ exceeds the limit 1e-06", entry.failure_reason or "")
    assert not [e for e in entries(urza_path, "tiny_over_budget") if e.status == "certified"]
    assert "certify" in entry.performance  # the losing figures are kept


def test_unexportable_is_fallback_not_certified(certify_run: pytest.RunResult, urza_path: Path) -> None:
    (entry,) = entries(urza_path, "not_exportable")
    assert (entry.engine, entry.status) == ("eager", "fallback")
    certify_run.stdout.fnmatch_lines(["*not_exportable*fallback*"])


def test_broken_file_fails_by_name_and_the_rest_still_certify(certify_run: pytest.RunResult, project: Path) -> None:
    certify_run.stdout.fnmatch_lines(["FAILED .esper/certify/test_certify_error_raises*.py::test_declaration*"])
    certify_run.stdout.fnmatch_lines(["*raises.py*raised on import: ImportError: no such dependency*"])
    # A hostile name or a file calling sys.exit fails its own declaration test; the run goes on (no
    # INTERNALERROR, no exit status 3), and nothing is written outside the build folder.
    certify_run.stdout.fnmatch_lines(["FAILED .esper/certify/test_certify_error_evil_*.py::test_declaration*"])
    certify_run.stdout.fnmatch_lines(["*quits.py*raised on import: SystemExit: 3*"])
    assert "INTERNALERROR" not in certify_run.stdout.str() and certify_run.ret == 1
    assert not (project / ".esper" / "etc").exists() and not list(project.parent.glob("**/test_certify_*evil.py"))


def test_exit_code_and_summary(certify_run: pytest.RunResult) -> None:
    assert certify_run.ret == 1
    certify_run.stdout.fnmatch_lines(
        ["*Esper certification*", "blueprint*status*compile s*parity*speedup*train route*train ratio*entries*note"]
    )
    certify_run.stdout.fnmatch_lines(["tiny_mlp*certified*off (ESPER_CERTIFY_TRAINING=0)*"])


def test_generated_module_is_deterministic_and_reruns_alone(
    certify_run: pytest.RunResult, project: Path, urza_path: Path, pytester: pytest.Pytester
) -> None:
    module = project / ".esper" / "certify" / "test_certify_tiny_mlp.py"
    text = module.read_text()
    assert 'BLUEPRINT = "tiny_mlp"' in text.replace("'", '"') and "x: float32[batch(1..32), 8]" in text
    alone = pytester.runpytest_subprocess(str(module), *FAST_BENCH)
    assert alone.ret == 0, alone.outlines[-30:]
    # The inference checks pass; the training ones skip, saying why (this suite turns them off).
    # contract, weights and repeated included; the specializations of each representative size skip (tiny_mlp
    # stays dynamic, so none compiles)
    alone.stdout.fnmatch_lines(["*12 passed, 28 skipped*"])
    again = pytester.runpytest_subprocess("--certify", *FAST_BENCH)
    assert module.read_text() == text
    # Nothing changed: nothing is compiled again and certified entries are not re-checked.
    again.stdout.fnmatch_lines(["tiny_mlp*certified (reused)*"])
    assert len([e for e in entries(urza_path, "tiny_mlp") if e.engine == "aoti"]) == 1
    assert len(entries(urza_path, "tiny_odd")) == 1


def test_plain_pytest_does_not_certify(project: Path, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert not (project / ".esper").exists()
    assert not any("Esper certification" in line for line in result.outlines)


def test_a_bad_compile_worker_count_is_a_usage_error(
    project: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPER_CERTIFY_COMPILE_WORKERS", "many")
    # Under pytest-xdist the run below would inherit this worker's variable, and take no compile workers at all.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    result = pytester.runpytest_subprocess("--certify")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ESPER_CERTIFY_COMPILE_WORKERS must be a whole number of processes, not 'many'*"])
    assert not (project / ".esper" / "certify").exists()


def test_release_gate_against_a_stored_latency_record(project: Path, pytester: pytest.Pytester) -> None:
    checks = ["--certify", "--certify-recheck", "-k", "tiny_mlp", *FAST_BENCH]
    first = pytester.runpytest_subprocess(*checks)
    assert first.ret == 0, first.outlines[-20:]
    record = json.loads((project / ".esper" / "certify" / "latency.json").read_text())
    assert [k for k in record["ratios"] if k.startswith("tiny_mlp|inference|default/default|")]
    baseline = project / "baseline-latency.json"
    baseline.write_text(json.dumps(record))
    gate = [*checks, f"--certify-baseline={baseline}"]
    # The same code measured again: its per-round ratios sit inside the baseline's spread.
    same = pytester.runpytest_subprocess(*gate)
    assert same.ret == 0, same.outlines[-20:]
    same.stdout.fnmatch_lines(["release gate against *no regression"])
    # A baseline five times faster: the candidate regressed beyond 20% with confidence, and the run fails
    # (judged on ratios alone: this baseline keeps no eager timings, as a version-1 record).
    faster = {k: [r / 5 for r in v] for k, v in record["ratios"].items()}
    baseline.write_text(json.dumps({**record, "ratios": faster, "eager_ms": {}}))
    slower = pytester.runpytest_subprocess(*gate)
    assert slower.ret == 1
    slower.stdout.fnmatch_lines(
        ["release gate against *regression(s)", "  tiny_mlp inference default/default batch=4: *"]
    )
    # The same baseline, but its eager ran 100x faster than this run's: this run was measured on a busier
    # machine, its ratios are not comparable even when measured again, and the gate says so instead of failing.
    assert set(record["eager_ms"]) == set(record["ratios"])
    quiet = {k: ms / 100 for k, ms in record["eager_ms"].items()}
    baseline.write_text(json.dumps({**json.loads(baseline.read_text()), "eager_ms": quiet}))
    busy = pytester.runpytest_subprocess(*gate, "--certify-confirm-seconds=0.5")
    assert busy.ret == 0, busy.outlines[-20:]
    busy.stdout.fnmatch_lines(
        [
            "release gate against *: no regression",
            "  INCONCLUSIVE, not failed: eager ran *x its baseline time*",
            "  2 comparison(s) not judged: * even after measuring again for 0.5 s *",
        ]
    )
    # Under --certify-inconclusive=fail the same run exits with its own status, one CI can retry on.
    retry = pytester.runpytest_subprocess(*gate, "--certify-confirm-seconds=0", "--certify-inconclusive=fail")
    assert retry.ret == 75, retry.outlines[-20:]
    retry.stdout.fnmatch_lines(["  INCONCLUSIVE, failed (exit 75: retry on a quieter machine): eager ran *"])
