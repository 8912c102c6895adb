"""A seeded defect of the training artifact (tests/fixtures/contract/grad_growth.py) through the real
certification: ``pytest --certify`` with training certification on, into a temporary Urza.

``grad_growth``: a training step whose forward output is exact everywhere and whose gradients are halved once
the weights grow past the blueprint's range. Parity at the blueprint's own weights certifies it; ``weights``
(a training step of a seed bound with weights ten times the blueprint's, its gradients judged against eager
autograd and the float64 step) rejects it. Its inference artifact has no defect and is certified, and so is
the clean twin's, of both kinds.

Four AOTInductor compiles (inference and training: inference certification has no switch): minutes on 2
cores, so the module runs only when selected (``-m miscompiles``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from esper.artifacts.kinds import ArtifactKind
from tests.support import certify_fixture_project, entries_of, routed_certified

from ..conftest import FIXTURES

pytestmark = [pytest.mark.compiles, pytest.mark.miscompiles]

FILES = ("grad_growth.py",)


@pytest.fixture(autouse=True, scope="module")
def only_when_selected(request: pytest.FixtureRequest) -> None:
    if "miscompiles" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the training defect's certification runs with -m miscompiles (minutes of compiling)")


@pytest.fixture(scope="module")
def certified(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``pytest --certify`` once, training on, in a fresh project holding the fixture, into its own Urza."""
    root = tmp_path_factory.mktemp("contract-training")
    return certify_fixture_project(root, [FIXTURES / "contract" / f for f in FILES], training=True), root / "urza.db"


def test_gradients_wrong_once_the_weights_grow_are_rejected_by_weights(certified) -> None:  # type: ignore[no-untyped-def]
    run, urza = certified
    training = ArtifactKind.TRAINING
    (entry,) = [e for e in entries_of(urza, "contract_grad_growth", training) if e.engine == "aoti"]
    assert (entry.status, entry.failed_check) == ("rejected", "weights"), (entry.failure_reason, run.stdout[-3000:])
    reason = entry.failure_reason or ""
    assert reason.startswith("training default/default at weights scaled-x10") and "gradient" in reason, reason
    assert entry.parity["certify"]["cases"] > 0  # parity passed at the blueprint's own weights
    assert not [e for e in entries_of(urza, "contract_grad_growth", training) if e.status == "certified"]


@pytest.mark.parametrize(
    ("name", "artifact"),
    [
        ("contract_grad_growth", ArtifactKind.INFERENCE),
        ("contract_grad_growth_clean", ArtifactKind.INFERENCE),
        ("contract_grad_growth_clean", ArtifactKind.TRAINING),
    ],
)
def test_the_clean_artifacts_are_certified(certified, name: str, artifact: ArtifactKind) -> None:  # type: ignore[no-untyped-def]
    run, urza = certified
    assert routed_certified(urza, name, artifact), (
        [(e.status, e.failure_reason) for e in entries_of(urza, name, artifact)],
        run.stdout[-3000:],
    )
