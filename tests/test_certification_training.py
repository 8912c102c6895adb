"""Certification of training artifacts: the checks, the decision, a failed check, turning it off."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.catalog import load_catalog
from esper.coverage import edge_sizes
from esper.kasmina import Kasmina
from esper.kasmina.training import COMPILED, EAGER, TrainingKernel
from esper.kasmina.training_artifact import is_training_entry
from esper.urza import Urza

from .conftest import CATALOG, TRAINING

pytestmark = pytest.mark.compiles

CATALOG_TRAINING = load_catalog([TRAINING, CATALOG])


def load(urza: Path, name: str, weights: Any = None) -> TrainingKernel:
    return Kasmina(urza, blueprint_paths=[TRAINING, CATALOG]).load_training(name, weights)


def build(name: str) -> torch.nn.Module:
    return CATALOG_TRAINING.get(name).build()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


def perturbed(name: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in build(name).state_dict().items()
    }


@pytest.fixture
def training_copy(training_urza: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "urza"
    shutil.copytree(training_urza.parent, dest, ignore=shutil.ignore_patterns("inductor-cache"))
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest / "urza.db"


def test_training_certification_checks_and_decides(training_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.budgets import PROFILES
    from esper.certification import strategies as cs
    from esper.certification.run import Outcome
    from esper.certification.training import CHECKS, TrainingCertification

    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "1")
    monkeypatch.setenv("ESPER_HYPOTHESIS_PROFILE", "esper-ci")  # derandomized: the same cases every run
    bp = CATALOG_TRAINING.get("tiny_bn")
    cert = TrainingCertification(bp, training_copy, PROFILES["lenient"], recheck=True)
    entry = cert.compile()
    assert cert.reused and entry.kind == "aoti"  # same content hash: nothing compiles
    ranges = {n: (d.min, d.max) for n, d in bp.dims.items()}
    cs.check_cases(cert.check_grad_parity, ranges, edge_sizes(ranges))
    cert.check_guards()
    assert cert.parity.cases > 0 and cert.guards_refused >= 4

    class Bench:
        group = ""
        extra_info: dict[str, Any] = {}

        def __call__(self, fn: Any) -> None:
            fn()

    for label in cert.labels():
        for path in (COMPILED, EAGER):
            cert.benchmark(Bench(), path, label)
    for check in CHECKS[:-1]:
        cert.record(Outcome(check, "passed"))
    published = cert.publish()
    with Urza(training_copy, readonly=True) as urza:
        compiled = urza.get(entry.id)  # type: ignore[arg-type]
    assert compiled.parity["certify"]["cases"] == cert.parity.cases
    assert "certify" in compiled.performance
    if published.id == entry.id:
        assert compiled.status == "certified"
    else:  # eager measured faster: the artifact is rejected by selection and an eager route is certified
        assert compiled.status == "rejected" and compiled.failed_check == "selection"
        assert published.kind == "eager" and published.status == "certified" and is_training_entry(published)


def test_a_failed_training_check_rejects_the_artifact(training_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.budgets import PROFILES
    from esper.certification.run import Outcome
    from esper.certification.training import TrainingCertification

    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "1")
    cert = TrainingCertification(CATALOG_TRAINING.get("tiny_bn"), training_copy, PROFILES["lenient"], recheck=True)
    entry = cert.compile()
    cert.record(Outcome("grad_parity", "failed", "gradient of fc.weight differs"))
    with Urza(training_copy, readonly=True) as urza:
        rejected = urza.get(entry.id)  # type: ignore[arg-type]
    assert rejected.status == "rejected" and rejected.failed_check == "grad_parity"
    assert "fc.weight" in (rejected.failure_reason or "")


def test_training_certification_can_be_turned_off(training_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.budgets import PROFILES
    from esper.certification.training import TrainingCertification

    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "0")
    cert = TrainingCertification(CATALOG_TRAINING.get("tiny_bn"), training_copy, PROFILES["lenient"])
    with pytest.raises(pytest.skip.Exception, match="off"):
        cert.compile()
