"""The seeded contract defects of the weights, shapes and repeated-calls clauses (tests/fixtures/contract/)
through the real certification: ``pytest --certify`` on a project whose blueprints are the fixtures, into a
temporary Urza. Each defect is rejected by the check that names it, and each clean twin certified:

- a kernel exact at the blueprint's weights and wrong once they grow: ``weights`` (a seed bound with weights
  ten times the blueprint's), after ``parity`` certified it at the blueprint's own;
- a kernel wrong only at one residue of the product of two dims: ``parity``, at a shape of the covering
  design (the per-dim sweeps and the sampled pairs never meet it);
- a kernel whose answers drift with state it keeps across calls: ``repeated``.

Six AOTInductor compiles (inference; the training artifact is off): minutes on 2 cores, so the module runs only
when selected (``-m miscompiles``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from esper.artifacts.kinds import ArtifactKind
from esper.urza import Entry
from tests.support import certify_fixture_project, entries_of, rejected_by, routed_certified

from ..conftest import FIXTURES

pytestmark = [pytest.mark.compiles, pytest.mark.miscompiles]

CONTRACT = FIXTURES / "contract"
FILES = ("weight_growth.py", "product_residue.py", "stateful.py")
INFERENCE = ArtifactKind.INFERENCE


@pytest.fixture(autouse=True, scope="module")
def only_when_selected(request: pytest.FixtureRequest) -> None:
    if "miscompiles" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the contract defects' certification runs with -m miscompiles (minutes of compiling)")


@pytest.fixture(scope="module")
def certified(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``pytest --certify`` once, in a fresh project holding the fixtures, into its own Urza (one run for the
    module: pytester is per test)."""
    root = tmp_path_factory.mktemp("contract-project")
    return certify_fixture_project(root, [CONTRACT / f for f in FILES], training=False), root / "urza.db"


def compiled(urza: Path, name: str) -> Entry:
    (entry,) = [e for e in entries_of(urza, name) if e.engine == "aoti"]
    return entry


def test_a_kernel_wrong_once_the_weights_grow_is_rejected_by_weights(certified) -> None:  # type: ignore[no-untyped-def]
    _, urza = certified
    reason = rejected_by(urza, "contract_weight_growth", "weights")
    assert reason.startswith("inference default/default at weights ") and "output: " in reason, reason
    assert compiled(urza, "contract_weight_growth").parity["certify"]["cases"] > 0  # parity passed at its own


def test_a_defect_at_a_residue_of_a_product_is_rejected_by_parity(certified) -> None:  # type: ignore[no-untyped-def]
    _, urza = certified
    reason = rejected_by(urza, "contract_product_residue", "parity")
    sizes = re.search(r"'batch': (\d+), 'seq': (\d+)", reason)
    assert sizes is not None and int(sizes[1]) * int(sizes[2]) % 16 == 11, reason


def test_state_kept_across_calls_is_rejected_by_repeated(certified) -> None:  # type: ignore[no-untyped-def]
    _, urza = certified
    reason = rejected_by(urza, "contract_stateful", "repeated")
    assert re.search(r"repeated: call \d+ \(", reason), reason


def test_the_clean_twins_are_certified_with_the_contract_evidence(certified) -> None:  # type: ignore[no-untyped-def]
    run, urza = certified
    for name in ("contract_weight_growth_clean", "contract_product_residue_clean", "contract_stateful_clean"):
        assert routed_certified(urza, name), (
            name,
            [(e.status, e.failure_reason) for e in entries_of(urza, name)],
            run.stdout[-3000:],
        )
        evidence = compiled(urza, name).parity["certify"]
        assert evidence["weights"]["certified_for"][0] == "own" and len(evidence["weights"]["certified_for"]) == 5
        design = evidence["coverage"]["design"]
        assert design["residues_covered"] == design["residues_total"]
