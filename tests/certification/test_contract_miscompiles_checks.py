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

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esper.artifacts.kinds import ArtifactKind
from esper.urza import Entry, Urza

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
    (root / "pyproject.toml").write_text('[tool.esper]\nblueprint-paths = ["bps"]\n')
    (root / "bps").mkdir()
    for name in FILES:
        shutil.copy(CONTRACT / name, root / "bps" / name)
    urza = root / "urza.db"
    path = os.pathsep.join(p for p in (str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "ESPER_CERTIFY_TRAINING": "0", "ESPER_HYPOTHESIS_PROFILE": "esper-ci", "PYTHONPATH": path}
    # A subprocess: torch's operator registrations cannot be imported twice into one process.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--certify", "--certify-urza", str(urza), "-p", "no:cacheprovider", "-q"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return run, urza


def entries(urza: Path, name: str) -> list[Entry]:
    with Urza(urza, readonly=True) as u:
        return [e for e in u.entries(name) if e.artifact == INFERENCE]


def compiled(urza: Path, name: str) -> Entry:
    (entry,) = [e for e in entries(urza, name) if e.engine == "aoti"]
    return entry


def rejected_by(urza: Path, name: str, check: str) -> str:
    entry = compiled(urza, name)
    assert (entry.status, entry.failed_check) == ("rejected", check), (name, entry.failed_check, entry.failure_reason)
    assert not [e for e in entries(urza, name) if e.status == "certified"]
    return entry.failure_reason or ""


def is_certified(urza: Path, name: str) -> bool:
    """A certified route (the compiled entry, or an eager route chosen by measurement), no check failed."""
    es = entries(urza, name)
    failed = [e.failed_check for e in es if e.failed_check not in (None, "selection")]
    return any(e.status == "certified" for e in es) and not failed


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
        assert is_certified(urza, name), (
            name,
            [(e.status, e.failure_reason) for e in entries(urza, name)],
            run.stdout[-3000:],
        )
        evidence = compiled(urza, name).parity["certify"]
        assert evidence["weights"]["certified_for"][0] == "own" and len(evidence["weights"]["certified_for"]) == 5
        design = evidence["coverage"]["design"]
        assert design["residues_covered"] == design["residues_total"]
