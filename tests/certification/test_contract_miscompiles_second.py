"""A second seeded defect per clause of the contract (tests/fixtures/contract/), each of another kind than the
first (test_contract_miscompiles_calls.py, test_contract_miscompiles_checks.py), through the real
certification: ``pytest --certify`` on a project whose blueprints are the fixtures, into a temporary Urza.
Each defect shows only when traced, and only the check that names it sees it:

- inputs: ``second_input_write`` (the kernel computes a sigmoid in place in its second input): ``contract``,
  mutation;
- aliasing: ``output_view`` (the kernel returns a flattened view of its input, where eager's is a copy):
  ``contract``, aliasing of an output with an input;
- metadata: ``broadcast_output`` (a stride-0 broadcast view where eager's output is dense): ``contract``,
  metadata;
- non-finite: ``nan_max`` (a max reduction that drops NaN): ``parity``, in the nonfinite value regime;
- weights: ``weight_range`` (weights saturated to the range the blueprint's own span): ``weights``;
- shapes: ``triple_residue`` (wrong at one residue of the product of three dims, reached by one shape):
  ``parity``, at a shape of the covering design;
- repeated calls: ``shape_history`` (an answer that depends on the previous call's shape): ``repeated``;
- the seed's state: ``buffer_write`` (an inference kernel that writes into a buffer of the seed it serves, which
  its output never reads): ``weights``, which holds every served seed's parameters and buffers to the
  contract's mutation clause.

Each clean twin is certified. Sixteen AOTInductor compiles in one certify run (inference; the training artifact
is off): minutes on 2 cores, so the module runs only when selected (``-m miscompiles``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from esper.artifacts.kinds import ArtifactKind
from tests.support import certify_fixture_project, entries_of, rejected_by, routed_certified

from ..conftest import FIXTURES

pytestmark = [pytest.mark.compiles, pytest.mark.miscompiles]

FILES = (
    "second_input_write.py",
    "output_view.py",
    "broadcast_output.py",
    "nan_max.py",
    "weight_range.py",
    "triple_residue.py",
    "shape_history.py",
    "buffer_write.py",
)
INFERENCE = ArtifactKind.INFERENCE


@pytest.fixture(autouse=True, scope="module")
def only_when_selected(request: pytest.FixtureRequest) -> None:
    if "miscompiles" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the contract defects' certification runs with -m miscompiles (minutes of compiling)")


@pytest.fixture(scope="module")
def certified(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``pytest --certify`` once, in a fresh project holding the fixtures, into its own Urza."""
    root = tmp_path_factory.mktemp("contract-second")
    return certify_fixture_project(root, [FIXTURES / "contract" / f for f in FILES], training=False), root / "urza.db"


CONTRACT = [
    ("contract_second_input_write", "mutation: input 1: written by the call"),
    ("contract_output_view", "aliasing: output[1]: shares memory with input 0"),
    ("contract_broadcast_output", "metadata: output[1]: not contiguous in torch.contiguous_format"),
]


@pytest.mark.parametrize(("name", "words"), CONTRACT)
def test_each_in_call_defect_is_rejected_by_contract(certified, name: str, words: str) -> None:  # type: ignore[no-untyped-def]
    _, urza = certified
    reason = rejected_by(urza, name, "contract")
    assert reason.startswith("inference default/default breaks the contract: ") and words in reason, reason


def test_a_max_that_drops_nan_is_rejected_by_parity_in_the_nonfinite_regime(certified) -> None:  # type: ignore[no-untyped-def]
    _, urza = certified
    reason = rejected_by(urza, "contract_nan_max", "parity")
    assert "non-finite placement differs" in reason and ", nonfinite seed " in reason, reason


def test_weights_saturated_to_the_blueprints_range_are_rejected_by_weights(certified) -> None:  # type: ignore[no-untyped-def]
    _, urza = certified
    reason = rejected_by(urza, "contract_weight_range", "weights")
    assert reason.startswith("inference default/default at weights ") and "output: " in reason, reason


def test_a_defect_at_a_residue_of_three_dims_product_is_rejected_by_parity(certified) -> None:  # type: ignore[no-untyped-def]
    _, urza = certified
    reason = rejected_by(urza, "contract_triple_residue", "parity")
    sizes = re.search(r"'batch': (\d+), 'seq': (\d+), 'heads': (\d+)", reason)
    assert sizes is not None and (int(sizes[1]), int(sizes[2]), int(sizes[3])) == (7, 9, 5), reason


def test_an_answer_that_depends_on_the_previous_shape_is_rejected_by_repeated(certified) -> None:  # type: ignore[no-untyped-def]
    _, urza = certified
    reason = rejected_by(urza, "contract_shape_history", "repeated")
    assert re.search(r"repeated: call \d+ \(", reason) and "its own answer to the same call earlier" in reason, reason


def test_an_inference_kernel_that_writes_into_the_seeds_buffer_is_rejected_by_weights(certified) -> None:  # type: ignore[no-untyped-def]
    _, urza = certified
    reason = rejected_by(urza, "contract_buffer_write", "weights")
    assert "breaks the contract with the seed" in reason and "mutation: buffer['peak']" in reason, reason


TWINS = [f"contract_{Path(f).stem}_clean" for f in FILES]


@pytest.mark.parametrize("name", TWINS)
def test_each_clean_twin_is_certified(certified, name: str) -> None:  # type: ignore[no-untyped-def]
    run, urza = certified
    assert routed_certified(urza, name), (
        name,
        [(e.status, e.failure_reason) for e in entries_of(urza, name)],
        run.stdout[-3000:],
    )
