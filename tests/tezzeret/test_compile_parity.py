"""Tezzeret's compile-time parity is certification's rule (esper.numerics.parity.judge), far looser: a training step
whose gradients are plainly wrong gets an eager fallback with Esper's own reason naming the gradient, and an
honest one is stored compiled with the judgement per verified shape as its evidence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from esper.artifacts.kinds import ArtifactKind
from esper.catalog import load_catalog
from esper.kasmina.training_kernel import TrainingKernel
from esper.tezzeret import training_compile
from esper.tezzeret.compiler import Tezzeret
from esper.urza import EntryEngine, EntryStatus, Urza
from esper.urza.evidence import Evidence
from tests.support import CATALOG, TRAINING


def test_an_honest_training_step_is_stored_with_the_judgement_per_shape(training_urza: Path) -> None:
    with Urza(training_urza, readonly=True) as urza:
        (entry,) = [e for e in urza.entries("tiny_bn") if e.artifact == ArtifactKind.TRAINING]
    assert entry.engine == EntryEngine.AOTI
    shapes = Evidence.of(entry).parity.representative
    assert shapes and all(p.passed for p in shapes.values())
    assert all(p.max_abs is not None and p.max_abs < 1e-3 for p in shapes.values())


def test_plainly_wrong_gradients_get_an_eager_fallback_naming_the_gradient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = training_compile.gradients

    def doubled(module: Any, args: Any, **kw: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        out, grads = honest(module, args, **kw)
        if isinstance(module, TrainingKernel):  # the compiled step only: a seeded wrong backward
            grads = {n: 2 * g for n, g in grads.items()}
        return out, grads

    monkeypatch.setattr(training_compile, "gradients", doubled)
    bp = load_catalog([TRAINING, CATALOG]).get("tiny_bn")
    with Urza(tmp_path / "urza.db") as urza:
        entry = Tezzeret(urza).compile(bp, artifact=ArtifactKind.TRAINING).entry
    assert (entry.engine, entry.status, entry.failed_check) == (
        EntryEngine.EAGER,
        EntryStatus.FALLBACK,
        "train_compile",
    )
    assert entry.meta["failed_stage"] == "verify"
    reason = entry.failure_reason or ""
    assert "plainly wrong" in reason and "gradient[" in reason and "assert_close" not in reason
    assert entry.meta["training"] == {"route": "eager", "reason": reason}
