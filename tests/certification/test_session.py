"""The certify session (esper.certification.session) without pytest: which blueprints a run (or one shard of
it) certifies, and that each check's result reaches the certification of its artifact kind."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint, Dim, Input
from esper.certification.extras import missing_library
from esper.certification.results import Check, CheckResult, Outcome
from esper.certification.run import BlueprintCertification
from esper.certification.session import CertifySession
from esper.certification.shard import Shard, parse_shard
from esper.settings import Settings
from tests.support import TINY

BP = Blueprint(
    name="b",
    version=1,
    build=lambda: None,
    inputs=(Input("x", "float32", (Dim("batch", 1, 64), 4)),),
    representative=({"batch": 2},),
)


def make_session(tmp_path: Path, *folders: Path, shard: Shard | None = None) -> CertifySession:
    settings = Settings(root=tmp_path, urza=tmp_path / "urza.db", blueprint_paths=folders, budget_profile="cpu-2core")
    return CertifySession(settings=settings, build_dir=tmp_path / "build", enabled=True, shard=shard)


@pytest.fixture
def session(tmp_path: Path) -> CertifySession:
    s = make_session(tmp_path)
    s.runs["b"] = BlueprintCertification.create(BP, s.settings.urza, s.budget_profile)
    return s


def test_a_result_is_kept_by_kind_check_and_candidate(session: CertifySession) -> None:
    skipped = CheckResult(Check.LATENCY, Outcome.SKIPPED, "s", "default/freezing")
    session.runs["b"].record("inference", skipped)
    session.runs["b"].record("training", CheckResult(Check.SELECT, Outcome.PASSED))
    assert set(session.runs["b"].outcomes()) == {
        (ArtifactKind.INFERENCE, Check.LATENCY, "default/freezing"),
        (ArtifactKind.TRAINING, Check.SELECT, None),
    }
    assert session.runs["b"]["inference"].outcomes[(Check.LATENCY, "default/freezing")] == skipped
    assert session.failures() == []


def test_failures_name_the_blueprint_kind_check_and_candidate(session: CertifySession) -> None:
    session.runs["b"].record("training", CheckResult(Check.PARITY, Outcome.FAILED, "off by one", "default/default"))
    assert session.failures() == ["b training parity default/default: off by one"]


def test_selection_validates_and_reports_unusable_files(tmp_path: Path) -> None:
    folder = tmp_path / "bps"
    folder.mkdir()
    (folder / "tiny_mlp.py").write_text((TINY / "tiny_mlp.py").read_text())
    (folder / "raises.py").write_text("raise ImportError('no such dependency')\n")
    session = make_session(tmp_path, folder)
    assert [bp.name for bp in session.select()] == ["tiny_mlp"]
    assert len(session.errors) == 1 and "no such dependency" in str(session.errors[0])
    assert session.failures() == [f"invalid: {session.errors[0]}"]
    # Named blueprints: the other files' errors are not this run's.
    assert [bp.name for bp in session.select(["tiny_mlp"])] == ["tiny_mlp"] and session.errors == []


def test_shards_split_the_catalog_by_sorted_name(tmp_path: Path) -> None:
    names = ["d", "a", "c", "b", "e"]
    first, second = Shard(1, 2).take(names, str), Shard(2, 2).take(names, str)
    assert (first, second) == (["a", "c", "e"], ["d", "b"])
    assert sorted(first + second) == sorted(names)
    assert [bp.name for bp in make_session(tmp_path, TINY, shard=Shard(2, 2)).select()] == ["tiny_odd"]


@pytest.mark.parametrize("bad", ["0/2", "3/2", "1", "a/b", "1/0", ""])
def test_a_bad_shard_is_a_clear_error(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="K/N"):
        parse_shard(bad)
    assert parse_shard("2/3") == Shard(2, 3) and str(Shard(2, 3)) == "2/3"


def test_the_library_needs_hypothesis_not_pytest() -> None:
    assert missing_library(lambda module: True) == []
    assert missing_library(lambda module: module != "hypothesis") == ["hypothesis"]
    assert missing_library(lambda module: module not in ("pytest", "pytest_benchmark")) == []


class Recording:
    """Stands in for the session's compile workers: what they were given, and how the checks shared the
    machine with them."""

    def __init__(self, jobs: list[object], pool: object, slot: object = None) -> None:
        self.jobs = jobs
        self.calls: list[str] = []

    def share(self) -> None:
        self.calls.append("share")

    def quiet(self) -> None:
        self.calls.append("quiet")

    def close(self) -> None:
        self.calls.append("close")


def test_the_workers_take_every_planned_blueprint_in_run_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next blueprint compiles while this one's checks run: on the first certification, the workers are
    given the plan of every blueprint of the run, in run order, and every blueprint's checks share them."""
    from esper.certification import session as session_module

    started: list[Recording] = []

    def start(jobs: list[object], pool: object, slot: object = None) -> Recording:
        started.append(Recording(jobs, pool, slot))
        return started[-1]

    monkeypatch.setattr(session_module.CompileAhead, "start", start)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # xdist's workers start no compile workers
    monkeypatch.setenv("ESPER_CERTIFY_COMPILE_WORKERS", "1")
    s = make_session(tmp_path, TINY)
    s.plan_compiles(
        {"tiny_odd": [("inference", "default/default")], "tiny_mlp": [("inference", "default/default")]},
        {"tiny_odd": str(TINY / "tiny_odd.py"), "tiny_mlp": str(TINY / "tiny_mlp.py")},
    )
    run = s.certification("tiny_mlp", str(TINY / "tiny_mlp.py"))
    [ahead] = started
    assert [(j.blueprint, j.profile) for j in ahead.jobs] == [("tiny_odd", "default"), ("tiny_mlp", "default")]  # type: ignore[attr-defined]
    assert set(s.runs) == {"tiny_odd", "tiny_mlp"}
    assert all(kind.ahead is ahead for r in s.runs.values() for kind in r)  # type: ignore[comparison-overlap]
    assert s.certification("tiny_odd", str(TINY / "tiny_odd.py")) is s.runs["tiny_odd"] and len(started) == 1
    # How each check shares the machine: timing quiet, compiling holding nothing, the rest beside compiles.
    inference = run["inference"]
    inference.compare_latency("default/default", "batch=4")
    inference.check_parity("default/default")
    inference.compare_regions("default/default")
    inference.check_guards("default/default")
    assert ahead.calls == ["quiet", "share", "quiet", "share"]
    s.close()
    assert ahead.calls[-1] == "close"


def test_no_workers_no_plan_given_to_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.certification import session as session_module

    monkeypatch.setattr(session_module.CompileAhead, "start", lambda *a, **k: pytest.fail("workers started"))
    monkeypatch.setenv("ESPER_CERTIFY_COMPILE_WORKERS", "0")
    s = make_session(tmp_path, TINY)
    s.plan_compiles({"tiny_mlp": [("inference", "default/default")]}, {"tiny_mlp": str(TINY / "tiny_mlp.py")})
    run = s.certification("tiny_mlp", str(TINY / "tiny_mlp.py"))
    assert s.ahead is None and run["inference"].ahead is None
