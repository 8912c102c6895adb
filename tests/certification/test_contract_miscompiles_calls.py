"""The contract's in-call clauses and the non-finite regime through the real certification: ``pytest --certify``
on a project whose blueprints are the contract fixtures (tests/fixtures/contract/), into a temporary Urza. Each
defect changes nothing but what it is named for, and only when traced, so only the check that names it sees it:

- ``input_write`` (the kernel halves its input after computing an exact output): ``contract``, mutation;
- ``output_alias`` (the kernel hands on its input where eager hands on a copy): ``contract``, aliasing;
- ``column_major`` (eager's values in column-major order): ``contract``, metadata;
- ``nonfinite`` (the kernel turns NaN and inf inputs into 0): ``parity``, in the nonfinite value regime.

Each clean twin is certified, for inference and training. Sixteen AOTInductor compiles in one certify run:
minutes on 2 cores, so the group runs only when selected (``-m miscompiles``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esper.artifacts.kinds import ArtifactKind
from esper.urza import Entry, Urza

from ..conftest import FIXTURES

pytestmark = [pytest.mark.compiles, pytest.mark.miscompiles]

FILES = ("input_write.py", "output_alias.py", "column_major.py", "nonfinite.py")


@pytest.fixture(autouse=True, scope="module")
def only_when_selected(request: pytest.FixtureRequest) -> None:
    if "miscompiles" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the seeded contract defects certify with -m miscompiles (minutes of compiling)")


@pytest.fixture(scope="module")
def urza(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``pytest --certify`` run over every fixture pair, inference and training, into its own Urza."""
    project = tmp_path_factory.mktemp("contract")
    (project / "pyproject.toml").write_text('[tool.esper]\nblueprint-paths = ["bps"]\n')
    (project / "bps").mkdir()
    for name in FILES:
        shutil.copy(FIXTURES / "contract" / name, project / "bps" / name)
    db = project / "urza.db"
    env = {**os.environ, "ESPER_CERTIFY_TRAINING": "1", "ESPER_HYPOTHESIS_PROFILE": "esper-ci"}
    # A subprocess: torch's operator registrations cannot be imported twice into one process.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--certify", "--certify-urza", str(db), "-p", "no:cacheprovider", "-q"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-2000:]  # the defects fail their checks
    return db


def entries(urza: Path, name: str, artifact: ArtifactKind) -> list[Entry]:
    with Urza(urza, readonly=True) as u:
        return [e for e in u.entries(name) if e.artifact == artifact]


def rejected_by(urza: Path, name: str, artifact: ArtifactKind, check: str) -> str:
    (entry,) = [e for e in entries(urza, name, artifact) if e.engine == "aoti"]
    assert (entry.status, entry.failed_check) == ("rejected", check), (name, artifact, entry.failure_reason)
    assert not [e for e in entries(urza, name, artifact) if e.status == "certified"]
    return entry.failure_reason or ""


def certified(urza: Path, name: str, artifact: ArtifactKind) -> bool:
    es = entries(urza, name, artifact)
    return any(e.status == "certified" for e in es) and not any(e.failed_check in ("parity", "contract") for e in es)


DEFECTS = [
    ("contract_input_write", "contract", "mutation: input 0: written by the call"),
    ("contract_output_alias", "contract", "aliasing: output[0]: shares memory with input 0"),
    ("contract_column_major", "contract", "metadata: output: not contiguous in torch.contiguous_format"),
    ("contract_nonfinite", "parity", "non-finite placement differs"),
]


@pytest.mark.parametrize(("name", "check", "words"), DEFECTS)
def test_each_inference_defect_is_rejected_by_the_check_that_names_it(
    urza: Path, name: str, check: str, words: str
) -> None:
    reason = rejected_by(urza, name, ArtifactKind.INFERENCE, check)
    assert reason.startswith("inference default/default") and words in reason, reason
    if check == "parity":
        assert ", nonfinite seed " in reason


@pytest.mark.parametrize("name", [name for name, _, _ in DEFECTS])
@pytest.mark.parametrize("artifact", list(ArtifactKind))
def test_each_clean_twin_is_certified(urza: Path, name: str, artifact: ArtifactKind) -> None:
    clean = f"{name}_clean"
    assert certified(urza, clean, artifact), [(e.status, e.failure_reason) for e in entries(urza, clean, artifact)]
