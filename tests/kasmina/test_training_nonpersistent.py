"""Training artifacts with non-persistent buffers (rotary ``inv_freq``, masks): read and updated like any buffer,
absent from a seed's state dict.

One compile: ``tests/fixtures/nonpersistent/tiny_masked.py`` (two non-persistent buffers the forward reads,
one it updates, one persistent buffer) into a module-scoped temporary Urza, marked certified as the session
fixtures do; everything else loads it as a training run would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.tensors import WeightSchemaError
from esper.catalog import load_catalog
from esper.kasmina import Kasmina
from esper.kasmina.training_kernel import COMPILED, EAGER, TrainingKernel
from esper.numerics.gradients import exact_gradients, gradients, tolerance
from esper.urza import Urza
from tests.support import FIXTURES

pytestmark = pytest.mark.compiles

NONPERSISTENT = FIXTURES / "nonpersistent"
CATALOG = load_catalog([NONPERSISTENT])
NAME = "tiny_masked"
TRANSIENT = ("mask", "scale", "seen")


@pytest.fixture(scope="module")
def masked_urza(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> Path:
    from esper.tezzeret.compiler import Tezzeret

    path = tmp_path_factory.mktemp("nonpersistent-urza") / "urza.db"
    with Urza(path) as urza:
        entry = Tezzeret(urza).compile(CATALOG.get(NAME), artifact=ArtifactKind.TRAINING).entry
        assert entry.engine == "aoti", entry.failure_reason
        urza.update(entry.id, status="certified")  # type: ignore[arg-type]
    return path


def load(urza: Path, weights: object = None) -> TrainingKernel:
    return Kasmina(urza, blueprint_paths=[NONPERSISTENT]).load_training(NAME, weights)  # type: ignore[arg-type]


def perturbed(seed: int) -> dict[str, torch.Tensor]:
    """A seed's state dict: the persistent weights only, moved off the builder's."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in CATALOG.get(NAME).build().state_dict().items()}


def test_the_manifest_marks_nonpersistent_buffers_and_the_schema_leaves_them_out(masked_urza: Path) -> None:
    built = CATALOG.get(NAME).build()
    assert set(built.state_dict()) == {"fc.weight", "fc.bias", "shift"}
    with Urza(masked_urza, readonly=True) as urza:
        (entry,) = urza.entries(NAME, artifact="training")
    kernel = load(masked_urza)
    manifest = kernel.program.manifest  # type: ignore[union-attr]
    assert manifest.version == 2 and manifest.nonpersistent == TRANSIENT
    assert [s.name for s in manifest.buffers] == [*TRANSIENT, "shift"]
    assert set(manifest.weights()) == set(built.state_dict()) == set(entry.meta["constants"])
    reads = {s[1] for s in manifest.forward_inputs if s[0] == "buffer"}
    assert {"mask", "scale", "shift"} <= reads
    assert manifest.mutated() == ["seen"]


def test_a_state_dict_without_them_trains_like_eager(masked_urza: Path) -> None:
    """Seeds bound by state dict (no non-persistent buffers in it) get the build's: gradients and the updated
    buffer match eager's, at every dim edge and between."""
    bp = CATALOG.get(NAME)
    tol = bp.tolerance
    state = perturbed(1)
    kernel = load(masked_urza, state)
    eager = bp.build().train()
    eager.load_state_dict(state)
    gen = torch.Generator().manual_seed(0)
    rows = 0
    for batch in (1, 2, 7, 32):
        x = torch.randn(batch, 8, generator=gen)
        got_out, got = gradients(kernel, (x,), seed=batch, weights=kernel.seed)
        assert kernel.last_path == COMPILED, kernel.check(x)
        exact_out, exact = exact_gradients(eager, (x,), seed=batch)
        want_out, want = gradients(eager, (x,), seed=batch)
        atol, rtol = tolerance(tol.atol, tol.rtol, want_out, exact_out)
        torch.testing.assert_close(got_out, want_out, atol=atol, rtol=rtol)
        assert set(got) == set(want) == {"input 0", "fc.weight", "fc.bias"}
        for n in want:
            atol, rtol = tolerance(tol.atol, tol.rtol, want[n], exact[n])
            torch.testing.assert_close(got[n], want[n], atol=atol, rtol=rtol, msg=n)
        rows += batch
    # The seed's own counter moved as eager's did (exact_gradients stepped a float64 copy, not `eager`).
    assert float(kernel.seed.seen) == float(eager.seen) == rows
    assert torch.equal(kernel.seed.mask, eager.mask) and torch.equal(kernel.seed.scale, eager.scale)
    other = kernel.bind(perturbed(2))
    assert float(other.seed.seen) == 0.0 and other.program is kernel.program


def test_a_seed_module_must_bring_nonpersistent_buffers_of_the_artifacts_shape(
    masked_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = load(masked_urza)
    module = CATALOG.get(NAME).build()
    module.register_buffer("mask", torch.ones(4), persistent=False)
    with pytest.raises(WeightSchemaError, match=r"non-persistent buffer 'mask' is float32\[4\]; .* float32\[8\]"):
        kernel.bind(module)
    # Replaced after binding: that call trains eager, with the WARNING that names it.
    kernel.seed.register_buffer("scale", torch.ones(8, dtype=torch.float64), persistent=False)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel(torch.randn(3, 8))
    assert kernel.last_path == EAGER
    (record,) = [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]
    assert record.esper["reason"] == "weights-changed" and "buffer 'scale'" in record.esper["detail"]
