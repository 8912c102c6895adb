"""Certification as a library (esper.certification): the checks as plain calls on the tiny fixture blueprint,
``esper certify`` (without pytest) against ``pytest --certify``, and two shards merged against one run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from esper.artifacts.compat import current
from esper.artifacts.kinds import ArtifactKind
from esper.certification.budgets import PROFILES
from esper.certification.results import Check, CheckResult, Outcome
from esper.certification.run import BlueprintCertification
from esper.kasmina import choose_entries
from esper.kasmina.unusable import Unusable
from esper.urza import Urza
from tests.support import TINY

pytestmark = pytest.mark.compiles

# The order a generated module runs one inference candidate's checks in (tiny_mlp: one candidate, two shapes).
MODULE_ORDER = [
    Check.COMPILE,
    Check.PARITY,
    Check.PARITY,  # the hypothesis draws, after the planned cases passed
    Check.CONTRACT,  # judged on the calls parity made
    Check.WEIGHTS,
    Check.REPEATED,
    Check.GUARDS,
    Check.LATENCY,
    Check.LATENCY,
    Check.REGIONS,  # the grid across the profile's range
    Check.SELECT,
    Check.BUDGETS,
    Check.PUBLISH,
]


def test_every_check_is_a_plain_call_returning_a_recorded_result(
    tiny_catalog, urza_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ESPER_HYPOTHESIS_PROFILE", "esper-ci")
    bp = tiny_catalog.get("tiny_mlp")
    certification = BlueprintCertification.create(bp, urza_copy, PROFILES["cpu-2core"], recheck=True)
    results = certification.certify()
    inference = [r for r in results if r.candidate in (None, "default/default") and r.outcome is not Outcome.SKIPPED]
    assert [r.check for r in inference] == MODULE_ORDER, results
    assert all(isinstance(r, CheckResult) and r.passed and r.reason == "" for r in inference)
    compiled = inference[0].figures
    assert compiled["reused"] is True and compiled["engine"] == "aoti"  # compiled once for the session
    assert inference[1].figures["cases"] >= 9 and inference[2].figures["drawn"] > 0
    contract = inference[3].figures
    assert contract["cases"] == inference[1].figures["cases"] + inference[2].figures["drawn"]
    assert contract["tensors"] >= 2 * contract["cases"] and contract["breaches"] == {}
    weights, repeated = inference[4].figures, inference[5].figures
    assert weights["weights"] == ["own", "scaled-x10#0", "scaled-x0.1#0", "perturbed#0", "outliers#0"]
    assert weights["cases"] == 4 * 3 and repeated["calls"] >= 2 * len(repeated["shapes"]) * 2
    assert inference[6].figures["refused"] >= 5 and {r.figures["shape"] for r in inference[7:9]} == {
        "batch=4",
        "batch=16",
    }
    grid = inference[9].figures  # tiny_mlp's batch 1..32: log-spaced sizes with both ends and 4 and 16
    assert grid["dims"] == ["batch"] and grid["values"][0][0] == 1 and grid["values"][0][-1] == 32
    assert {4, 16} <= set(grid["values"][0]) and grid["measured"] >= len(grid["values"][0])
    # Training is off in this suite: its checks skip, saying why, and nothing of it fails.
    training = certification[ArtifactKind.TRAINING]
    assert {r.outcome for r in training.outcomes.values()} == {Outcome.SKIPPED}
    assert "ESPER_CERTIFY_TRAINING=0" in training.outcomes[(Check.COMPILE, "default/default")].reason
    # Each check recorded its own result; the published route is in Urza.
    run = certification[ArtifactKind.INFERENCE]
    assert run.outcomes[(Check.PUBLISH, None)] == inference[-1]
    (published,) = run.published
    with Urza(urza_copy, readonly=True) as urza:
        assert urza.get(published.id).status == "certified"  # type: ignore[arg-type]


# -- the CLI against the plugin, and shards ---------------------------------------------------------------------

NAMES = ("tiny_mlp", "tiny_odd")
# `esper certify` with pytest unimportable: the library must not need it.
WITHOUT_PYTEST = (
    "import sys; sys.modules['pytest'] = sys.modules['_pytest'] = None; "
    "from esper.cli import main; sys.argv[0] = 'esper'; main()"
)


def project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text('[tool.esper]\nblueprint-paths = ["bps"]\n')
    (folder / "bps").mkdir()
    for name in NAMES:
        (folder / "bps" / f"{name}.py").write_text((TINY / f"{name}.py").read_text())
    return folder


def esper(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ESPER_HYPOTHESIS_PROFILE": "esper-ci"}
    env.pop("ESPER_URZA", None)
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PYTEST, *args], cwd=folder, env=env, capture_output=True, text=True
    )


def decided(urza_path: Path) -> set[tuple[str, str, str, str, str, str]]:
    """Every compiled candidate: blueprint, artifact, profile, variant, content hash, and its status. A
    candidate that lost to eager by measurement counts as decided like a certified one (the route is timed)."""
    with Urza(urza_path, readonly=True) as urza:
        entries = [e for name in NAMES for e in urza.entries(name) if e.engine == "aoti"]
    return {
        (
            e.blueprint,
            str(e.artifact),
            e.profile,
            e.variant,
            e.content_hash,
            "decided" if e.status == "certified" or e.failed_check == "selection" else f"{e.status} {e.failed_check}",
        )
        for e in entries
    }


def routed(urza_path: Path) -> set[str]:
    """The blueprints Kasmina routes to a certified entry (compiled or eager) in this process."""
    out = set()
    with Urza(urza_path, readonly=True) as urza:
        for name in NAMES:
            try:
                choose_entries(urza.entries(name), current())
            except Unusable:
                continue
            out.add(name)
    return out


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``esper certify`` of both tiny blueprints into one Urza."""
    folder = project(tmp_path_factory.mktemp("cli") / "project")
    done = esper(folder, "certify", *NAMES, "--urza", "urza.db")
    assert done.returncode == 1, done.stderr[-3000:]  # tiny_odd is wrong off its representative shapes
    assert "FAILED tiny_odd inference parity default/default: " in done.stderr
    assert "tiny_mlp" in done.stdout and "certified" in done.stdout
    return folder / "urza.db"


def test_esper_certify_and_pytest_certify_give_the_same_entries(
    one_run: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyprojecttoml('[tool.esper]\nblueprint-paths = ["bps"]\n')
    bps = pytester.mkdir("bps")
    for name in NAMES:
        (bps / f"{name}.py").write_text((TINY / f"{name}.py").read_text())
    monkeypatch.setenv("ESPER_URZA", str(pytester.path / "urza.db"))
    monkeypatch.setenv("ESPER_HYPOTHESIS_PROFILE", "esper-ci")
    result = pytester.runpytest_subprocess("--certify", "-k", " or ".join(NAMES), "-p", "no:cacheprovider")
    assert result.ret == 1, result.outlines[-30:]
    plugin_run = pytester.path / "urza.db"
    assert decided(plugin_run) == decided(one_run) and len(decided(one_run)) == 2
    assert ("tiny_odd", "inference", "default", "default") in {d[:4] for d in decided(one_run)}
    assert routed(plugin_run) == routed(one_run) == {"tiny_mlp"}
    # Both store Esper's own reason for the rejected candidate, never pytest's ("Failed: ...").
    for path in (plugin_run, one_run):
        with Urza(path, readonly=True) as urza:
            (odd,) = urza.entries("tiny_odd")
        assert (odd.status, odd.failed_check) == ("rejected", "parity")
        assert (odd.failure_reason or "").startswith("inference default/default at {'batch': ")


def test_two_shards_merged_hold_what_one_run_holds(one_run: Path, tmp_path: Path) -> None:
    folder = project(tmp_path / "project")
    for k in (1, 2):
        done = esper(folder, "certify", "--shard", f"{k}/2", "--urza", f"shard{k}.db")
        assert done.returncode in (0, 1), done.stderr[-3000:]
    # Round-robin by sorted name: one blueprint per shard.
    assert routed(folder / "shard1.db") == {"tiny_mlp"} and not decided(folder / "shard1.db") & {
        d for d in decided(one_run) if d[0] == "tiny_odd"
    }
    merged = esper(folder, "urza", "merge", "shard1.db", "shard2.db", "--into", "merged.db")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert decided(folder / "merged.db") == decided(one_run)
    assert routed(folder / "merged.db") == routed(one_run)


def test_a_bad_shard_is_refused_by_both_front_ends(tmp_path: Path, pytester: pytest.Pytester) -> None:
    done = esper(project(tmp_path / "project"), "certify", "--shard", "3/2")
    assert done.returncode == 2 and "K/N with 1 <= K <= N" in done.stderr
    result = pytester.runpytest_subprocess("--certify", "--certify-shard", "0/2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--certify-shard*K/N with 1 <= K <= N*"])


def test_the_plugin_generates_only_its_shards_modules(pytester: pytest.Pytester) -> None:
    project(pytester.path / "p")
    result = pytester.runpytest_subprocess(
        "--rootdir", str(pytester.path / "p"), "--certify", "--certify-shard", "2/2", "--collect-only", "-q"
    )
    assert result.ret == 0, result.outlines[-20:]
    generated = sorted(p.name for p in (pytester.path / "p" / ".esper" / "certify").glob("test_certify_*.py"))
    assert generated == ["test_certify_tiny_odd.py"]
