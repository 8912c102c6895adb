"""Tezzeret's training artifacts: gradients match eager at every dim edge; randomness routes eager."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint
from esper.kasmina.training_kernel import COMPILED, EAGER
from esper.numerics.coverage import edge_sizes
from esper.numerics.gradients import exact_gradients, gradients, tolerance
from esper.tezzeret.content import source_digest
from esper.urza import Urza
from tests.support import build_training as build
from tests.support import kasmina_warnings as warnings_of
from tests.support import load_training as load
from tests.support import training_catalog

pytestmark = pytest.mark.compiles

CATALOG_TRAINING = training_catalog()


@pytest.mark.parametrize("name", ["lora_adapter", "tiny_bn"])
def test_gradient_parity_at_dynamic_dim_edges(training_urza: Path, name: str) -> None:
    bp = CATALOG_TRAINING.get(name)
    base = load(training_urza, name)
    tol = bp.tolerance
    gen = torch.Generator().manual_seed(0)
    for sizes in edge_sizes({n: (d.min, d.max) for n, d in bp.dims.items()}):
        args = tuple(torch.randn(s, generator=gen) for s in bp.shapes(sizes).values())
        seed = base.bind(build(name))
        reference = build(name).train()
        got_out, got = gradients(seed, args, seed=3, weights=seed.seed)
        exact_out, exact = exact_gradients(reference, args, seed=3)
        want_out, want = gradients(reference, args, seed=3)
        assert seed.last_path == COMPILED, (sizes, seed.check(*args))
        atol, rtol = tolerance(tol.atol, tol.rtol, want_out, exact_out)
        torch.testing.assert_close(got_out, want_out, atol=atol, rtol=rtol)
        assert set(got) == set(want) and "input 0" in want
        for n in want:
            atol, rtol = tolerance(tol.atol, tol.rtol, want[n], exact[n])
            torch.testing.assert_close(got[n], want[n], atol=atol, rtol=rtol, msg=f"{name} {sizes} {n}")
        for (n, b), (_, c) in zip(seed.seed.named_buffers(), reference.named_buffers(), strict=True):
            torch.testing.assert_close(b, c, atol=tol.atol, rtol=tol.rtol, msg=n)
    if name == "lora_adapter":
        # The base is frozen: the artifact computes gradients for the low-rank factors only.
        assert base.program.manifest.trainable == ("lora_a.weight", "lora_b.weight")  # type: ignore[union-attr]


def test_a_dropout_blueprint_takes_the_eager_training_route_with_its_reason(
    training_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Urza(training_urza, readonly=True) as urza:
        (entry,) = [e for e in urza.entries("tiny_dropout") if e.artifact == ArtifactKind.TRAINING]
    assert entry.engine == "eager" and entry.status == "fallback"
    assert (entry.artifact, entry.variant, entry.failed_check) == ("training", "default", "train_compile")
    assert "failed_stage" not in entry.meta  # a decision, not a failing stage
    assert "aten.native_dropout.default" in (entry.failure_reason or "")
    assert entry.meta["training"]["route"] == "eager"
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = load(training_urza, "tiny_dropout")
    assert kernel.route == EAGER and "random numbers" in kernel.reason
    (record,) = warnings_of(caplog)
    assert record.esper["reason"] == "no-training-artifact" and "native_dropout" in record.esper["detail"]
    y = kernel(torch.randn(4, 8, requires_grad=True))
    assert kernel.last_path == EAGER and y.requires_grad


def test_a_compiled_training_entry_names_its_kind_variant_and_sources(training_urza: Path) -> None:
    bp = CATALOG_TRAINING.get("tiny_bn")
    with Urza(training_urza, readonly=True) as urza:
        (entry,) = urza.entries("tiny_bn", artifact="training")
    assert (entry.engine, entry.artifact, entry.variant, entry.profile) == ("aoti", "training", "default", "default")
    assert entry.meta["source_digest"] == source_digest(bp, bp.build())
    assert entry.meta["training"]["route"] == "compiled" and entry.meta["training"]["mutated_buffers"]
    assert set(entry.parity["representative"]) >= {Blueprint.shape_label(r) for r in bp.representative}
