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

from pathlib import Path

import pytest

from esper.artifacts.kinds import ArtifactKind
from tests.support import certify_fixture_project, entries_of, rejected_by, routed_certified

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
    run = certify_fixture_project(project, [FIXTURES / "contract" / f for f in FILES], training=True)
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-2000:]  # the defects fail their checks
    return project / "urza.db"


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
    reason = rejected_by(urza, name, check, ArtifactKind.INFERENCE)
    assert reason.startswith("inference default/default") and words in reason, reason
    if check == "parity":
        assert ", nonfinite seed " in reason


@pytest.mark.parametrize("name", [name for name, _, _ in DEFECTS])
@pytest.mark.parametrize("artifact", list(ArtifactKind))
def test_each_clean_twin_is_certified(urza: Path, name: str, artifact: ArtifactKind) -> None:
    clean = f"{name}_clean"
    found = [(e.status, e.failure_reason) for e in entries_of(urza, clean, artifact)]
    assert routed_certified(urza, clean, artifact), found
