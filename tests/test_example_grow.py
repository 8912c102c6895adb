"""examples/grow.py: a host that grows seeds served by Kasmina, checked against the same run with eager seeds.

The end-to-end test compiles ``tests/fixtures/grow/tiny_residual.py`` (the catalog's residual MLP at width 32)
into a temporary Urza, inference and training artifacts marked certified as the session fixtures do, then
runs a short version of the example in a fresh process. The other tests pin the agreement checks that make
the example fail loudly, without compiling anything.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from esper.blueprint import Tolerance

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "grow.py"
GROW = Path(__file__).parent / "fixtures" / "grow"


def example() -> ModuleType:
    """examples/grow.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("grow_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def grow_urza(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> Path:
    """An Urza holding ``tiny_residual``'s inference and training artifacts, compiled and marked certified."""
    from esper.artifacts.kinds import ArtifactKind
    from esper.catalog import load_catalog
    from esper.tezzeret.compiler import Tezzeret
    from esper.urza import Urza

    bp = load_catalog([GROW]).get("tiny_residual")
    path = tmp_path_factory.mktemp("grow-urza") / "urza.db"
    with Urza(path) as urza:
        tezzeret = Tezzeret(urza)
        for artifact in (ArtifactKind.INFERENCE, ArtifactKind.TRAINING):
            entry = tezzeret.compile(bp, artifact=artifact).entry
            assert entry.kind == "aoti", entry.failure_reason
            urza.update(entry.id, status="certified")  # type: ignore[arg-type]
    return path


@pytest.mark.compiles
def test_grown_host_with_compiled_seeds_matches_the_eager_seed_run(grow_urza: Path, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "grow.json"
    args = ["--urza", str(grow_urza), "--blueprints", str(GROW), "--blueprint", "tiny_residual"]
    done = run_example(*args, "--steps", "40", "--no-torch-compile", "--threads", "1", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    fig = json.loads(out.read_text())

    # The script checked every step taken from eager's state against its bound; the figures say so, and in
    # 40 steps on one thread the free-running runs stayed together too.
    assert 0 <= fig["max_bound_used"] <= 1 and fig["max_step_difference"] < 1e-5
    assert fig["max_loss_difference"] < 1e-3 and fig["parted_at"] is None
    acc = fig["validation_accuracy"]
    assert acc["compiled"].keys() == acc["eager"].keys()
    for step, compiled in acc["compiled"].items():
        assert abs(compiled - acc["eager"][step]) <= 1 / 360 + 1e-9, step  # at most one ambiguous digit
    # Three seeds in each compiled run (free-running, from eager's state), every call on compiled code, nothing
    # logged as a fallback.
    assert len(fig["seed_calls"]) == 6
    assert all(calls.get("compiled", 0) > 0 and calls.get("eager", 0) == 0 for calls in fig["seed_calls"])
    assert [m for m in fig["kasmina_messages"] if m["level"] != "INFO"] == []
    assert fig["compiler_imported"] == []
    assert abs(fig["served_accuracy"] - acc["compiled"]["40"]) <= 1 / 360 + 1e-9
    assert "agreement with the eager-seed run, step by step" in done.stdout


def test_without_an_urza_the_example_says_how_to_certify(tmp_path: Path) -> None:
    done = run_example("--urza", str(tmp_path / "missing.db"), "--steps", "20")
    assert done.returncode == 2
    assert "pytest --certify" in done.stderr and "-k residual_mlp" in done.stderr


def record(grow: ModuleType, loss: float, logits: list[list[float]], paths: list[str | None]) -> object:
    return grow.StepRecord(loss, torch.tensor(logits), 0.0, [], paths)


def test_a_loss_beyond_the_tolerance_is_a_disagreement() -> None:
    grow = example()
    tol = Tolerance(atol=1e-4, rtol=1e-4)
    logits = [[2.0, 0.0], [0.0, 3.0]]
    exact = record(grow, 1.0, logits, [])
    used = grow.check_step(0, record(grow, 1.0001, logits, ["compiled"]), record(grow, 1.0, logits, []), [exact], tol)
    assert 0.4 < used < 0.6  # 1e-4 of a 2e-4 bound
    with pytest.raises(grow.Disagreement, match=r"step 7: loss 1\.0003000"):
        grow.check_step(7, record(grow, 1.0003, logits, ["compiled"]), record(grow, 1.0, logits, []), [exact], tol)


def test_the_bound_widens_by_the_slack_times_eager_own_rounding_drift() -> None:
    grow = example()
    tol = Tolerance(atol=1e-4, rtol=1e-4)
    logits = [[2.0, 0.0]]
    eager = record(grow, 1.0, logits, [])
    # Eager's references: float64 moved 1e-5, reversed rows 2e-6: the larger one counts.
    references = [record(grow, 1.00001, logits, []), record(grow, 0.999998, logits, [])]
    # Bound: atol 1e-4 + 32 x 1e-5, plus rtol 1e-4 x 1.0 = 5.2e-4: a 3e-4 difference is within, 6e-4 is not.
    grow.check_step(0, record(grow, 1.0003, logits, ["compiled"]), eager, references, tol)
    with pytest.raises(grow.Disagreement, match="step 1"):
        grow.check_step(1, record(grow, 1.0006, logits, ["compiled"]), eager, references, tol)


def test_a_prediction_may_differ_only_where_eager_is_within_the_tolerance_of_a_tie() -> None:
    grow = example()
    tol = Tolerance(atol=1e-4, rtol=1e-4)
    eager = torch.tensor([[1.0, 1.00005], [0.0, 3.0]])
    grow.check_predictions(torch.tensor([[1.00006, 1.0], [0.0, 3.0]]), eager, tol, "near tie")
    with pytest.raises(grow.Disagreement, match=r"rows \[1\]"):
        grow.check_predictions(torch.tensor([[1.0, 1.00005], [3.0, 0.0]]), eager, tol, "clear case")


def test_a_seed_call_that_ran_eager_is_a_disagreement() -> None:
    grow = example()
    tol = Tolerance()
    same = [[1.0, 0.0]]
    with pytest.raises(grow.Disagreement, match="ran eager"):
        reference = record(grow, 0.5, same, [])
        grow.check_step(3, record(grow, 0.5, same, ["compiled", "eager"]), reference, [reference], tol)


def test_the_schedule_overlaps_seeds_ramps_alpha_and_fossilizes() -> None:
    grow = example()
    s = grow.schedule_for(100)
    assert s.germinate == (25, 35, 45) and s.ramp == 10 and s.train == 35
    assert [s.alpha(0, t) for t in (24, 25, 29, 34, 90)] == [0.0, 0.1, 0.5, 1.0, 1.0]
    assert s.fossilizes(2, 80) and not s.fossilizes(2, 79)
    live = [k for k in range(3) if s.germinate[k] <= 50 < s.germinate[k] + s.train]
    assert live == [0, 1, 2]


def test_batches_keep_one_shape_and_the_data_order_is_fixed() -> None:
    grow = example()
    a, b = grow.batch_order(100, 32, 7), grow.batch_order(100, 32, 7)
    assert [len(i) for i in a] == [32] * 7
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_hugging_face_blueprints_declare_cleanly_and_the_host_seeds_fit_it() -> None:
    pytest.importorskip("transformers")
    from esper.catalog import load_catalog

    grow = example()
    catalog = load_catalog([ROOT / "examples" / "hf_blueprints"])  # strict: the first declaration error raises
    host_seeds = ["hf_gpt2_mlp", "hf_llama_mlp", "hf_llama_rmsnorm"]
    assert sorted(catalog.blueprints) == [
        "hf_bert_output",
        "hf_gpt2_mlp",
        "hf_llama_attention",
        "hf_llama_mlp",
        "hf_llama_rmsnorm",
    ]
    for bp in catalog.blueprints.values():
        if bp.name in host_seeds:
            batch, width = grow.seed_input(bp)
            assert (batch.min, batch.max, width) == (1, 64, 256), bp.name
        else:  # sequence seeds, (batch, seq, hidden): a slot of the host cannot feed them, and grow.py says so
            with pytest.raises(SystemExit, match=bp.name):
                grow.seed_input(bp)
        # Every one returns its (last) input's shape, at a representative shape and at one token.
        for sizes in (bp.representative[0], {n: d.min for n, d in bp.dims.items()}):
            args = [torch.randn(s) for s in bp.shapes(sizes).values()]
            with torch.no_grad():
                assert bp.build()(*args).shape == args[-1].shape, (bp.name, sizes)
